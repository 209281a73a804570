"""Approximation error of each RPE family against its closed form, per frequency set.

For every Fourier family and each frequency set (``frequencies="mc" | "qmc" |
"quadrature"``, :mod:`geolinrpe.rpe.frequencies`) the estimate ``f_hat(Delta)`` with m
frequencies is compared with the closed form ``f(Delta)`` on three sets of offsets:

* ``gaussian``: 400 offsets ``Delta ~ N(0, 1.5^2 I)`` (position units; the earlier table);
* ``ball3``: 1,000 offsets uniform in the ball ``|Delta| <= 3`` (3 lengthscales of the kernel
  families, whose lengthscale is 1: the range a lattice rule is built for by default);
* ``qm9`` (3D families only): offsets ``r_i - r_j`` between distinct atoms of the first 200
  QM9 molecules (qm9pack, Å, centred geometries; each unordered pair once, which has the RMS
  of all ordered pairs ``i != j`` because ``f`` and ``f_hat`` are even), lengthscale 1 Å; a
  fixed random subset of 4,096 pairs (1,024 with ``--quick``) keeps the run short.

The tables show the relative RMSE ``rms(f_hat - f) / rms(f)`` (RMS over offsets and draws:
16 frequency draws for mc and qmc, 4 with ``--quick``; quadrature is deterministic, 1 draw)
for m = 16 .. 512 (``--quick``: 16, 64, 256), the log-log slope over m (Monte Carlo: -0.5),
and, in the first table, the time of query + key features of 4096 tokens at m = 32 (mc, 1
thread). The targets, on ``ball3``: relative RMSE <= 1e-2 at m = 64 and <= 1e-3 at m = 256 for
the Gaussian and Matern-5/2 kernels in 1D, 2D and 3D (a PASS/FAIL line per frequency set).

SPE rows compare the realised code kernel ``Qbar . Kbar / R`` with its analytic ``P_d`` for R
realisations; the periodic row compares the truncated lattice series with an explicit image
sum as ``max_index`` grows. RoPE, STRING, LRPE and the FFT Toeplitz RPE are exact (no
positional approximation) and are not listed.

    python benchmarks/rpe_accuracy.py [--quick] [--json PATH]

``--json`` writes a list of records (``table``: ``"fourier"``, ``"spe"`` or ``"periodic"``;
Fourier records have ``family``, ``variant``, ``kernel``, ``label``, ``pos_dim``, ``offsets``,
``frequencies``, ``m``, ``draws``, ``rel_rmse``, ``seconds``, ``slope``). ``--m``, ``--draws``,
``--offsets``, ``--only`` and ``--qm9-root`` narrow a run (smoke tests).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from geolinrpe.rpe import build
from geolinrpe.rpe.frequencies import FREQUENCY_SETS

HEADS = 2
ROOT = Path(__file__).resolve().parents[1]
OFFSET_SETS = ("gaussian", "ball3", "qm9")
TARGET_RANGE = 3.0  # lengthscales
TARGETS = {64: 1e-2, 256: 1e-3}
TARGET_KERNELS = ("gaussian", "matern52")
KERNELS = ("gaussian", "matern52", "matern32", "laplace", "cauchy")


@dataclass
class Case:
    """One row: a family with fixed, non-neutral parameters."""

    label: str
    family: str  # registry name
    pos_dim: int
    options: dict = field(default_factory=dict)
    variant: str = ""
    kernel: str | None = None
    setup: object = None  # callable(rpe) setting parameters after construction


def _radial_shells(rpe) -> None:
    """Switch on every shell (shell 0 alone is the initial Gaussian)."""
    with torch.no_grad():
        amps = torch.tensor([0.6, 0.3, -0.2, 0.3], dtype=rpe.shell_amplitudes.dtype)
        rpe.shell_amplitudes.copy_(amps[: rpe.num_components].expand_as(rpe.shell_amplitudes))


def fourier_cases() -> list[Case]:
    cases = [
        Case(f"flt-kernel {k} {p}D", "flt-kernel", p, dict(kernel=k), k, k)
        for k in KERNELS
        for p in (1, 2, 3)
    ]
    gm = dict(num_components=4, init_weight=1.0)
    cases += [
        Case("flt-gm mixture 2D (K=4)", "flt-gm", 2, gm, "mixture"),
        Case("flt-gm proposal 2D (K=4)", "flt-gm", 2, dict(gm, sampler="proposal"), "proposal"),
        Case("flt-mlp 2D", "flt-mlp", 2, {}, "softplus"),
        Case("flt-local 1D", "flt-local", 1, dict(half_width=2.0), "half_width=2"),
        Case("flt-radial 3D (K=4, shell 0)", "flt-radial", 3, dict(num_components=4), "shell0"),
        Case(
            "flt-radial 3D (K=4, 4 shells)",
            "flt-radial",
            3,
            dict(num_components=4),
            "4shells",
            setup=_radial_shells,
        ),
    ]
    return cases


# ----------------------------------------------------------------------------- offsets
def gaussian_offsets(pos_dim: int, count: int = 400) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(count, pos_dim, generator=gen, dtype=torch.float64) * 1.5


def ball_offsets(pos_dim: int, radius: float = TARGET_RANGE, count: int = 1000) -> torch.Tensor:
    """``count`` offsets uniform in the ball ``|Delta| <= radius``."""
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(count, pos_dim, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    u = torch.rand(count, 1, generator=gen, dtype=torch.float64)
    return direction * radius * u ** (1 / pos_dim)


def qm9_offsets(root: Path, molecules: int, count: int) -> tuple[torch.Tensor, dict]:
    """Offsets between distinct atoms (``i < j``) of the first ``molecules`` QM9 molecules
    (centred, Å); a fixed random subset of ``count`` of them, and facts about the set."""
    from geolinrpe.data.qm9 import QM9

    ds = QM9(str(root), max_molecules=molecules, log=False)
    bounds = ds.slices["pos"].tolist()
    pos = ds._data.pos.double()
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        p = pos[a:b] - pos[a:b].mean(0)
        i, j = torch.triu_indices(b - a, b - a, 1)
        pieces.append(p[i] - p[j])
    every = torch.cat(pieces)
    gen = torch.Generator().manual_seed(2)
    chosen = every[torch.randperm(len(every), generator=gen)[:count]]
    info = dict(
        molecules=len(ds),
        pairs=len(every),
        used=len(chosen),
        beyond_3l_all=float((every.norm(dim=-1) > TARGET_RANGE).double().mean()),
        beyond_3l_used=float((chosen.norm(dim=-1) > TARGET_RANGE).double().mean()),
        max_distance=float(every.norm(dim=-1).max()),
    )
    return chosen, info


# ----------------------------------------------------------------------------- measures
def relative_rmse(rpe, delta: torch.Tensor, exact: torch.Tensor, draws: int) -> float:
    errors = []
    for seed in range(draws):
        rpe.redraw(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            errors.append((rpe.estimate(delta) - exact).pow(2).mean())
    return (torch.stack(errors).mean().sqrt() / exact.pow(2).mean().sqrt()).item()


def feature_time(rpe, pos: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        rpe.query_features(pos)
        start = time.perf_counter()
        for _ in range(repeats):
            rpe.query_features(pos)
            rpe.key_features(pos)
    return (time.perf_counter() - start) / repeats * 1e3


def slope(xs: list[int], ys: list[float]) -> float:
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pairs) < 2:
        return float("nan")
    mx = sum(a for a, _ in pairs) / len(pairs)
    my = sum(b for _, b in pairs) / len(pairs)
    return sum((a - mx) * (b - my) for a, b in pairs) / sum((a - mx) ** 2 for a, _ in pairs)


def _build(case: Case, m: int, frequencies: str):
    torch.manual_seed(0)
    options = dict(case.options, frequencies=frequencies)
    rpe = build(case.family, pos_dim=case.pos_dim, num_heads=HEADS, num_frequencies=m, **options)
    if case.setup is not None:
        case.setup(rpe)
    return rpe.double()


def _same_parameters(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def fourier_records(
    cases: list[Case], offset_sets: dict[str, dict], ms: list[int], draws: int
) -> list[dict]:
    records = []
    notes: set[str] = set()
    for case in cases:
        for offsets, spec in offset_sets.items():
            delta = spec["delta"].get(case.pos_dim)
            if delta is None:
                continue
            reference = None  # (module, closed form): reused while the parameters agree
            for frequencies in FREQUENCY_SETS:
                row = []
                for m in ms:
                    start = time.perf_counter()
                    try:
                        rpe = _build(case, m, frequencies)
                    except ValueError as err:
                        row.append(None)
                        note = f"{case.label} {frequencies}: skipped ({str(err).split(';')[0]})"
                        if note not in notes:
                            notes.add(note)
                            print(f"  note: {note}")
                        continue
                    if reference is None or not _same_parameters(reference[0], rpe):
                        with torch.no_grad():
                            reference = (rpe, rpe.closed_form(delta))
                    n_draws = 1 if frequencies == "quadrature" else draws
                    error = relative_rmse(rpe, delta, reference[1], n_draws)
                    row.append(
                        dict(
                            table="fourier",
                            family=case.family,
                            variant=case.variant,
                            kernel=case.kernel,
                            label=case.label,
                            pos_dim=case.pos_dim,
                            offsets=offsets,
                            frequencies=frequencies,
                            m=m,
                            draws=n_draws,
                            rel_rmse=error,
                            seconds=time.perf_counter() - start,
                        )
                    )
                done = [r for r in row if r is not None]
                fit = slope([r["m"] for r in done], [r["rel_rmse"] for r in done])
                for r in done:
                    r["slope"] = fit if math.isfinite(fit) else None
                records += done
    return records


def feature_times(cases: list[Case]) -> dict[str, float]:
    times = {}
    for case in cases:
        rpe = _build(case, 32, "mc").float()
        times[case.label] = feature_time(rpe, torch.randn(4096, case.pos_dim))
    return times


def spe_records(rs: list[int], draws: int) -> list[dict]:
    records = []
    for label, name, options in (
        ("spe-sine (K=4)", "spe-sine", dict(num_sines=4)),
        ("spe-conv (kernel 8)", "spe-conv", dict(grid_size=64, kernel_size=8)),
    ):
        pos = torch.arange(32, dtype=torch.float64)[:, None]
        delta = pos[:, None] - pos[None]
        row = []
        for r in rs:
            start = time.perf_counter()
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
            row.append(
                dict(
                    table="spe",
                    family=name,
                    variant=label,
                    kernel=None,
                    label=label,
                    pos_dim=1,
                    offsets="grid32",
                    frequencies="mc",
                    m=r,  # realisations R
                    draws=draws,
                    rel_rmse=torch.stack(trial).mean().item(),
                    seconds=time.perf_counter() - start,
                )
            )
        fit = slope([r["m"] for r in row], [r["rel_rmse"] for r in row])
        for r in row:
            r["slope"] = fit if math.isfinite(fit) else None
        records += row
    return records


def periodic_records(indices: list[int]) -> list[dict]:
    cell = torch.tensor([[3.0, 0.0, 0.0], [0.5, 3.2, 0.0], [0.2, 0.3, 2.9]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    frac = torch.rand(40, 3, generator=gen, dtype=torch.float64)
    pos = frac @ cell
    batch = torch.zeros(40, dtype=torch.long)
    records = []
    for k in indices:
        start = time.perf_counter()
        rpe = build("flt-periodic", pos_dim=3, num_heads=1, max_index=k, lengthscale=0.6).double()
        enc = rpe.encode_positions(pos, batch=batch, cell=cell[None])
        series = rpe.pairwise(enc[None])[0, 0]
        delta = pos[:, None] - pos[None]
        images = rpe.image_sum(delta, cell, num_images=4)[..., 0]
        records.append(
            dict(
                table="periodic",
                family="flt-periodic",
                variant="crystal l=0.6",
                kernel="gaussian",
                label="flt-periodic crystal (l=0.6)",
                pos_dim=3,
                offsets="crystal40",
                frequencies="lattice-series",
                m=k,  # max_index K
                draws=1,
                rel_rmse=None,
                rel_max_err=((series - images).abs().max() / images.abs().max()).item(),
                seconds=time.perf_counter() - start,
            )
        )
    return records


# ----------------------------------------------------------------------------- printing
def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "nan"
    return f"{value:.3g}"


def print_fourier_table(
    records: list[dict], offsets: str, ms: list[int], times: dict[str, float] | None
) -> None:
    rows = [r for r in records if r["offsets"] == offsets]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    short = {"mc": "mc", "qmc": "qmc", "quadrature": "quad"}
    head = ["family"]
    for fs in FREQUENCY_SETS:
        head += [f"{short[fs]} {m}" for m in ms] + [f"{short[fs]} slope"]
    if times is not None:
        head.append("feat ms")
    print("| " + " | ".join(head) + " |")
    print("| --- " + "| ---: " * (len(head) - 1) + "|")
    for label in labels:
        cells = [label]
        for fs in FREQUENCY_SETS:
            by_m = {r["m"]: r for r in rows if r["label"] == label and r["frequencies"] == fs}
            cells += [fmt(by_m[m]["rel_rmse"]) if m in by_m else "–" for m in ms]
            fit = next(iter(by_m.values()))["slope"] if by_m else None
            cells.append(f"{fit:.2f}" if fit is not None and math.isfinite(fit) else "–")
        if times is not None:
            cells.append(f"{times[label]:.2f}" if label in times else "–")
        print("| " + " | ".join(cells) + " |")


def target_checks(records: list[dict]) -> list[dict]:
    """Targets on ``ball3``: Gaussian and Matern-5/2, 1D/2D/3D, each frequency set."""
    checks = []
    for kernel in TARGET_KERNELS:
        for pos_dim in (1, 2, 3):
            for fs in FREQUENCY_SETS:
                found = {
                    r["m"]: r["rel_rmse"]
                    for r in records
                    if r["offsets"] == "ball3"
                    and r["family"] == "flt-kernel"
                    and r["kernel"] == kernel
                    and r["pos_dim"] == pos_dim
                    and r["frequencies"] == fs
                }
                if not all(m in found for m in TARGETS):
                    continue
                passed = all(found[m] <= bound for m, bound in TARGETS.items())
                checks.append(
                    dict(
                        kernel=kernel,
                        pos_dim=pos_dim,
                        frequencies=fs,
                        errors={m: found[m] for m in TARGETS},
                        passed=passed,
                    )
                )
    return checks


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="m in {16, 64, 256}, 4 draws")
    parser.add_argument("--json", help="write all records to this file")
    parser.add_argument("--m", type=int, nargs="+", help="frequency counts (overrides)")
    parser.add_argument("--draws", type=int, help="draws for mc and qmc (overrides)")
    parser.add_argument(
        "--offsets", nargs="+", choices=OFFSET_SETS, default=list(OFFSET_SETS), help="offset sets"
    )
    parser.add_argument("--only", help="only families whose label contains this text")
    parser.add_argument(
        "--qm9-root", default=str(ROOT / "data" / "qm9"), help="QM9 cache folder (qm9pack)"
    )
    parser.add_argument("--no-extras", action="store_true", help="skip SPE and periodic rows")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> list[dict]:
    ms = args.m or ([16, 64, 256] if args.quick else [16, 32, 64, 128, 256, 512])
    draws = args.draws or (4 if args.quick else 16)
    started = time.perf_counter()
    print(
        f"# RPE accuracy ({platform.processor() or platform.machine()}, torch {torch.__version__},"
        f" 1 thread; mc/qmc: {draws} draws, quadrature: 1)"
    )
    cases = [c for c in fourier_cases() if args.only is None or args.only in c.label]
    offset_sets: dict[str, dict] = {}
    dims = sorted({c.pos_dim for c in cases})
    if "gaussian" in args.offsets:
        offset_sets["gaussian"] = dict(
            delta={p: gaussian_offsets(p) for p in dims},
            title="offsets Delta ~ N(0, 1.5^2 I), 400 per dimension",
        )
    if "ball3" in args.offsets:
        offset_sets["ball3"] = dict(
            delta={p: ball_offsets(p) for p in dims},
            title="offsets uniform in |Delta| <= 3 (3 lengthscales of the kernel families), 1000",
        )
    qm9_info = None
    if "qm9" in args.offsets and 3 in dims:
        count = 1024 if args.quick else 4096
        delta, qm9_info = qm9_offsets(Path(args.qm9_root), 200, count)
        offset_sets["qm9"] = dict(
            delta={3: delta},
            title=(
                f"QM9 offsets r_i - r_j (Å, lengthscale 1 Å), first {qm9_info['molecules']} "
                f"molecules: {qm9_info['used']} of {qm9_info['pairs']} distinct pairs; beyond "
                f"3 Å: {qm9_info['beyond_3l_all']:.1%} of all pairs "
                f"({qm9_info['beyond_3l_used']:.1%} of those used); "
                f"longest {qm9_info['max_distance']:.2f} Å"
            ),
        )
    records = fourier_records(cases, offset_sets, ms, draws)
    times = feature_times(cases)
    for offsets, spec in offset_sets.items():
        print(f"\n## Relative RMSE rms(f_hat - f) / rms(f), {offsets}: {spec['title']}\n")
        print_fourier_table(records, offsets, ms, times if offsets == "gaussian" else None)
    checks = target_checks(records)
    if checks:
        bounds = ", ".join(f"<= {b:g} at m = {m}" for m, b in TARGETS.items())
        print(f"\nTargets on ball3 (|Delta| <= 3 lengthscales): relative RMSE {bounds}")
        for c in checks:
            errs = ", ".join(f"m={m}: {fmt(e)}" for m, e in c["errors"].items())
            verdict = "PASS" if c["passed"] else "FAIL"
            name = f"flt-kernel {c['kernel']} {c['pos_dim']}D"
            print(f"target {name:24} {c['frequencies']:10} {errs:30} {verdict}")
        for kernel in TARGET_KERNELS:
            for pos_dim in (1, 2, 3):
                best = [
                    c["frequencies"]
                    for c in checks
                    if c["kernel"] == kernel and c["pos_dim"] == pos_dim and c["passed"]
                ]
                verdict = f"PASS ({', '.join(best)})" if best else "FAIL (no frequency set)"
                print(f"target flt-kernel {kernel} {pos_dim}D (any frequency set): {verdict}")
    extras = []
    if not args.no_extras:
        rs = [16, 256] if args.quick else [16, 64, 256, 1024]
        spe = spe_records(rs, max(2, draws // 4))
        print("\n## SPE: relative RMSE of the realised code kernel Qbar . Kbar / R vs P_d\n")
        print("| family | " + " | ".join(f"R={r}" for r in rs) + " | slope |")
        print("| --- " + "| ---: " * (len(rs) + 1) + "|")
        for label in dict.fromkeys(r["label"] for r in spe):
            row = [r for r in spe if r["label"] == label]
            errs = " | ".join(fmt(r["rel_rmse"]) for r in row)
            fit = row[0]["slope"]
            print(f"| {label} | {errs} | {'–' if fit is None else f'{fit:.2f}'} |")
        periodic = periodic_records([0, 1, 2, 3] if args.quick else [0, 1, 2, 3, 4])
        print(
            "\nflt-periodic crystal (l=0.6): max relative error of the series vs image sum: "
            + ", ".join(f"K={r['m']}: {r['rel_max_err']:.1e}" for r in periodic)
        )
        print(
            "RoPE, STRING, LRPE and toeplitz-fft have no positional approximation error "
            "(not listed)."
        )
        extras = spe + periodic
    total = time.perf_counter() - started
    print(f"\n(total {total:.1f} s)")
    all_records = records + extras
    if args.json:
        for r in all_records:
            r["qm9"] = qm9_info if r["offsets"] == "qm9" else None
        Path(args.json).write_text(json.dumps(all_records, indent=2))
    return all_records


if __name__ == "__main__":
    main()
