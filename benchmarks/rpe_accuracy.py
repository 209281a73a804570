"""Approximation error of each RPE family against its closed form, and its cost.

For every Fourier family the Monte-Carlo estimate ``f_hat(Delta)`` (m frequencies) is
compared with the closed form ``f(Delta)`` on 400 random offsets ``Delta ~ N(0, 1.5^2 I)``;
the table shows the relative RMSE ``rms(f_hat - f) / rms(f)`` averaged over 16 frequency
draws, for m = 8 .. 512, the log-log slope (the Monte-Carlo rate is -0.5), and the time to
compute query and key features of 4096 tokens at m = 32. SPE rows compare the realised code
kernel ``Qbar . Kbar / R`` with its analytic ``P_d`` for R realisations; the periodic row
compares the truncated lattice series with an explicit image sum as ``max_index`` grows.
RoPE, STRING, LRPE and the FFT Toeplitz RPE are exact (no positional approximation) and
are not listed.

    python benchmarks/rpe_accuracy.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from geolinrpe.rpe import build

HEADS = 2


def fourier_cases() -> list[tuple[str, str, int, dict]]:
    """(label, registry name, pos_dim, options) with non-neutral parameters."""
    return [
        ("flt-kernel gaussian 3D", "flt-kernel", 3, dict(kernel="gaussian")),
        ("flt-kernel laplace 3D", "flt-kernel", 3, dict(kernel="laplace")),
        ("flt-kernel matern32 3D", "flt-kernel", 3, dict(kernel="matern32")),
        ("flt-kernel cauchy 3D", "flt-kernel", 3, dict(kernel="cauchy")),
        ("flt-gm mixture 2D (K=4)", "flt-gm", 2, dict(num_components=4, init_weight=1.0)),
        (
            "flt-gm proposal 2D (K=4)",
            "flt-gm",
            2,
            dict(num_components=4, init_weight=1.0, sampler="proposal"),
        ),
        ("flt-mlp 2D", "flt-mlp", 2, dict()),
        ("flt-local 1D", "flt-local", 1, dict(half_width=2.0)),
        ("flt-radial 3D (K=4)", "flt-radial", 3, dict(num_components=4)),
    ]


def relative_rmse(rpe, delta: torch.Tensor, draws: int) -> float:
    exact = rpe.closed_form(delta)
    errors = []
    for seed in range(draws):
        rpe.redraw(torch.Generator().manual_seed(seed))
        errors.append((rpe.estimate(delta) - exact).pow(2).mean())
    return (torch.stack(errors).mean().sqrt() / exact.pow(2).mean().sqrt()).item()


def feature_time(rpe, pos: torch.Tensor, repeats: int = 5) -> float:
    rpe.query_features(pos)
    start = time.perf_counter()
    for _ in range(repeats):
        rpe.query_features(pos)
        rpe.key_features(pos)
    return (time.perf_counter() - start) / repeats * 1e3


def slope(xs: list[int], ys: list[float]) -> float:
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def fourier_table(ms: list[int], draws: int) -> list[dict]:
    rows = []
    for label, name, pos_dim, options in fourier_cases():
        gen = torch.Generator().manual_seed(0)
        delta = torch.randn(400, pos_dim, generator=gen, dtype=torch.float64) * 1.5
        errors = []
        for m in ms:
            torch.manual_seed(0)
            rpe = build(name, pos_dim=pos_dim, num_heads=HEADS, num_frequencies=m, **options)
            errors.append(relative_rmse(rpe.double(), delta, draws))
        torch.manual_seed(0)
        rpe = build(name, pos_dim=pos_dim, num_heads=HEADS, num_frequencies=32, **options)
        ms_time = feature_time(rpe, torch.randn(4096, pos_dim))
        rows.append(
            dict(family=label, m=ms, rel_rmse=errors, slope=slope(ms, errors), feature_ms=ms_time)
        )
    return rows


def spe_table(rs: list[int], draws: int) -> list[dict]:
    rows = []
    for label, name, options in (
        ("spe-sine (K=4)", "spe-sine", dict(num_sines=4)),
        ("spe-conv (kernel 8)", "spe-conv", dict(grid_size=64, kernel_size=8)),
    ):
        pos = torch.arange(32, dtype=torch.float64)[:, None]
        delta = pos[:, None] - pos[None]
        errors = []
        for r in rs:
            trial = []
            for seed in range(draws):
                torch.manual_seed(seed)
                spe = build(
                    name,
                    pos_dim=1,
                    num_heads=HEADS,
                    dim=4,
                    num_realizations=r,
                    gated=False,
                    **options,
                ).double()
                q, k = spe.codes(pos, query=True), spe.codes(pos, query=False)  # [n, h, d, R]
                realised = torch.einsum("ihdr,jhdr->ijhd", q, k) / r
                exact = spe.code_kernel(delta)
                trial.append(((realised - exact).pow(2).mean() / exact.pow(2).mean()).sqrt())
            errors.append(torch.stack(trial).mean().item())
        rows.append(dict(family=label, R=rs, rel_rmse=errors, slope=slope(rs, errors)))
    return rows


def periodic_table(indices: list[int]) -> dict:
    cell = torch.tensor([[3.0, 0.0, 0.0], [0.5, 3.2, 0.0], [0.2, 0.3, 2.9]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    frac = torch.rand(40, 3, generator=gen, dtype=torch.float64)
    pos = frac @ cell
    batch = torch.zeros(40, dtype=torch.long)
    errors = []
    for k in indices:
        rpe = build("flt-periodic", pos_dim=3, num_heads=1, max_index=k, lengthscale=0.6).double()
        enc = rpe.encode_positions(pos, batch=batch, cell=cell[None])
        series = rpe.pairwise(enc[None])[0, 0]
        delta = pos[:, None] - pos[None]
        images = rpe.image_sum(delta, cell, num_images=4)[..., 0]
        errors.append(((series - images).abs().max() / images.abs().max()).item())
    return dict(family="flt-periodic crystal (l=0.6)", max_index=indices, rel_max_err=errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and draws")
    parser.add_argument("--json", help="write all rows to this file")
    args = parser.parse_args()
    ms = [8, 64] if args.quick else [8, 32, 128, 512]
    rs = [16, 256] if args.quick else [16, 64, 256, 1024]
    draws = 4 if args.quick else 16
    torch.set_num_threads(1)
    print(
        f"# RPE accuracy ({platform.processor() or platform.machine()}, torch {torch.__version__})"
    )
    fourier = fourier_table(ms, draws)
    print(f"\n{'family':28}" + "".join(f"{'m=' + str(m):>9}" for m in ms) + "    slope  feat ms")
    for row in fourier:
        errs = "".join(f"{e:9.4f}" for e in row["rel_rmse"])
        print(f"{row['family']:28}{errs}  {row['slope']:7.2f}  {row['feature_ms']:7.2f}")
    spe = spe_table(rs, max(2, draws // 4))
    print(f"\n{'SPE code kernel':28}" + "".join(f"{'R=' + str(r):>9}" for r in rs) + "    slope")
    for row in spe:
        errs = "".join(f"{e:9.4f}" for e in row["rel_rmse"])
        print(f"{row['family']:28}{errs}  {row['slope']:7.2f}")
    periodic = periodic_table([0, 1, 2, 3] if args.quick else [0, 1, 2, 3, 4])
    print(
        f"\n{'periodic series vs images':28}"
        + "".join(f"{'K=' + str(k):>9}" for k in periodic["max_index"])
    )
    print(f"{periodic['family']:28}" + "".join(f"{e:9.1e}" for e in periodic["rel_max_err"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(fourier=fourier, spe=spe, periodic=periodic), fh, indent=2)


if __name__ == "__main__":
    main()
