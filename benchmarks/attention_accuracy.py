"""Output error of RPE attention against its exact O(n^2) target, per mode, kernel and frequencies.

For each mode of :data:`geolinrpe.nn.attention.MODES`, kernel feature map (``"favor+"``,
``"favor++"``), frequency set (``"mc"``, ``"qmc"``, ``"quadrature"``) and number ``r`` of kernel
features (64, 256, 1024; ``--quick``: 64, 256) the O(n) output ``out`` of
``rpe.attend(q, k, v, pos, featurizer=layer.featurizer, ...)`` is compared with the exact target
of the mode, ``rpe.reference_attention(..., kernel="exact", rpe="exact")``:

    rel_error = ||out - exact||_F / ||exact||_F,  mean over 10 seeds (--quick: 3).

The targets differ by mode: logit mode is the softmax with the additive bias ``f``,
``softmax(q.k / sqrt(d) + f)``; mask mode is kernel attention with the multiplicative mask ``f``,
``sum_j exp(q.k / sqrt(d)) f_ij v_j / sum_j exp(q.k / sqrt(d)) f_ij`` (the layer's ``"kernel"``
normalisation); a product mode (if present) targets the softmax with bias ``f`` like logit
mode. Errors of different modes are errors against different functions.

Inputs (float64; per seed): 1 sequence of L = 50 tokens, 2 heads, head dim d = 16,
``q, k ~ s N(0, 1)`` with ``s`` in {0.5, 1}, ``v ~ N(0, 1)``, positions uniform in ``[0, 10]^p``
(centred, as the layer does). The seed fixes the inputs, the kernel features' draw and (from a
generator of its own) the RPE frequencies' draw, so every combination sees the same inputs and,
for a frequency set, the same ``f_hat`` whatever the kernel and ``r``. FAVOR++ is calibrated
on the same inputs before the forward (``calibrate_featurizer``, what a training-mode forward
does; its running estimate is reset per seed so ``A`` comes from these inputs only).

RPEs (``m`` = 64 frequencies):

* ``flt-gm`` 25-blob mixture (p = 1, 2, 3): 25 components per head, ``sampler="mixture"``,
  widths ``sigma = 0.5``, centres ``mu ~ N(0, 0.3^2 I)``, masses ``W_k = (1 + 0.5 z_k) / 25``
  (``z ~ N(0, 1)``: weights ``0.5 N(0, 1) / 25`` about their mean ``1 / 25``) normalised per head
  so that ``f(0) = sum_k W_k = 1``; one fixed draw (seed 1234) for every run.
* ``flt-kernel`` Gaussian, lengthscale 2, amplitude 1 (p = 3, a radial ``f``).

Rows ``r = inf`` are the floor no number of kernel features removes: the exact kernel with the
current RPE estimate ``f_hat`` (``reference_attention(kernel="exact", rpe="features")``) against
the exact target (kernel ``"exact"`` in the records, ``r = null``).

Targets printed at r = 256: FAVOR++ at least 3x lower output error than FAVOR+ (ratio
``favor+ / favor++`` per mode: geometric mean over frequency sets, cases and scales), and the ratio
of the old default (logit, favor+, mc) to every other combination.

    python benchmarks/attention_accuracy.py [--quick] [--json PATH]

``--json``: a list of records with ``mode``, ``kernel``, ``frequencies``, ``r``, ``scale``,
``pos_dim``, ``rpe``, ``m``, ``seeds``, ``rel_error`` (mean), ``rel_error_std``, ``seconds``.
``--seeds``, ``--r``, ``--cases`` narrow a run (smoke tests).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from geolinrpe.nn import attention as attention_module
from geolinrpe.nn.attention import RPEAttention
from geolinrpe.ops.modes import calibrate_featurizer
from geolinrpe.rpe.frequencies import FREQUENCY_SETS

KERNELS = ("favor+", "favor++")
HEADS = 2
HEAD_DIM = 16
TOKENS = 50
BOX = 10.0
SCALES = (0.5, 1.0)
NUM_FREQUENCIES = 64
COMPONENTS = 25
BLOB_SEED = 1234
TARGET_R = 256
TARGET_RATIO = 3.0
OLD_DEFAULT = ("logit", "favor+", "mc")


def cases() -> dict[str, dict]:
    """name -> (registry name, pos_dim, rpe options, parameter setup)."""
    out = {}
    for p in (1, 2, 3):
        out[f"gm25 {p}D"] = dict(
            rpe="flt-gm",
            pos_dim=p,
            options=dict(
                num_frequencies=NUM_FREQUENCIES, num_components=COMPONENTS, sampler="mixture"
            ),
            setup=_blob_mixture,
        )
    out["gauss l=2 3D"] = dict(
        rpe="flt-kernel",
        pos_dim=3,
        options=dict(
            num_frequencies=NUM_FREQUENCIES, kernel="gaussian", lengthscale=2.0, amplitude=1.0
        ),
        setup=None,
    )
    return out


@torch.no_grad()
def _blob_mixture(rpe) -> None:
    """The 25-blob mixture of the module docstring (fixed seed, ``f(0) = 1`` per head)."""
    gen = torch.Generator().manual_seed(BLOB_SEED)
    h, k, p = rpe.num_heads, rpe.num_components, rpe.pos_dim
    masses = (1 + 0.5 * torch.randn(h, k, generator=gen, dtype=torch.float64)) / k
    masses = masses / masses.sum(-1, keepdim=True)
    sigma = 0.5
    rpe.raw_mixture_scales.fill_(math.log(sigma))
    rpe.mixture_weights.copy_(masses / (math.pi * sigma**2) ** (p / 2))
    rpe.mixture_means.copy_(0.3 * torch.randn(h, k, p, generator=gen, dtype=torch.float64))


def inputs(seed: int, pos_dim: int) -> tuple[torch.Tensor, ...]:
    """Unscaled ``q, k`` (``N(0, 1)``), ``v`` and centred positions for one seed."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, TOKENS, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    pos = BOX * torch.rand(1, TOKENS, pos_dim, generator=gen, dtype=torch.float64)
    return q, k, v, pos - pos.mean(1, keepdim=True)


def build_layer(case: dict, mode: str, kernel: str, frequencies: str, r: int) -> RPEAttention:
    options = dict(case["options"], frequencies=frequencies)
    layer = RPEAttention(
        HEADS * HEAD_DIM,
        HEADS,
        rpe=case["rpe"],
        pos_dim=case["pos_dim"],
        mode=mode,
        kernel=kernel,
        num_features=r,
        rpe_options=options,
    )
    if case["setup"] is not None:
        case["setup"](layer.rpe)
    return layer.double().eval()


@torch.no_grad()
def relative_error(
    layer: RPEAttention, seed: int, scale: float, pos_dim: int, floor: bool = False
) -> tuple[float, float | None]:
    """``(||out - exact||_F / ||exact||_F, FAVOR++'s A or None)`` for one seed; ``floor``: the
    exact kernel with the RPE estimate instead of the O(n) output."""
    q, k, v, pos = inputs(seed, pos_dim)
    q, k = scale * q, scale * k
    layer.feature_map.redraw(torch.Generator().manual_seed(10_000 + seed))
    layer.rpe.redraw(torch.Generator().manual_seed(20_000 + seed))
    featurizer = layer.featurizer
    if floor:  # the exact kernel with the current f_hat: the limit r -> infinity
        options = dict(featurizer=featurizer, mode=layer.mode, normalize=layer.normalize)
        out = layer.rpe.reference_attention(q, k, v, pos, kernel="exact", rpe="features", **options)
        exact = layer.rpe.reference_attention(q, k, v, pos, kernel="exact", rpe="exact", **options)
        return float((out - exact).norm() / exact.norm()), None
    feature_map = layer.feature_map
    gerf_a = None
    if getattr(feature_map, "adaptive", False):  # FAVOR++: A from these inputs only
        feature_map.calibrated.fill_(False)
        calibrate_featurizer(featurizer, q, k, pos)
        gerf_a = float(feature_map.A)
    out = layer.rpe.attend(q, k, v, pos, featurizer=featurizer, normalize=layer.normalize)
    exact = layer.rpe.reference_attention(
        q,
        k,
        v,
        pos,
        featurizer=featurizer,
        mode=layer.mode,
        normalize=layer.normalize,
        kernel="exact",
        rpe="exact",
    )
    return float((out - exact).norm() / exact.norm()), gerf_a


def geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, r in {64, 256}")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides)")
    parser.add_argument("--r", type=int, nargs="+", help="kernel feature counts (overrides)")
    parser.add_argument("--cases", nargs="+", help="case names (default: all)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> list[dict]:
    seeds = args.seeds or (3 if args.quick else 10)
    rs = args.r or ([64, 256] if args.quick else [64, 256, 1024])
    all_cases = cases()
    chosen = {n: c for n, c in all_cases.items() if args.cases is None or n in args.cases}
    modes = tuple(attention_module.MODES)  # read at run time: modes may be added
    started = time.perf_counter()
    print(
        f"# Attention output error ({platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, 1 thread, float64): L={TOKENS}, h={HEADS}, d={HEAD_DIM}, "
        f"m={NUM_FREQUENCIES}, {seeds} seeds, modes {modes}"
    )
    print(
        "Note: the exact target depends on the mode. logit: softmax(q.k/sqrt(d) + f) (bias f); "
        "mask: exp(q.k/sqrt(d)) x f as a mask with the kernel normalisation (a different "
        "function); product: softmax with bias f, like logit."
    )
    records = []
    skipped: dict[str, set[str]] = {}
    for mode in modes:
        for kernel in KERNELS:
            for frequencies in FREQUENCY_SETS:
                for r in rs + ([None] if kernel == KERNELS[0] else []):
                    for name, case in chosen.items():
                        start = time.perf_counter()
                        try:
                            layer = build_layer(case, mode, kernel, frequencies, r or rs[0])
                        except ValueError as err:
                            skipped.setdefault(str(err).splitlines()[0], set()).add(
                                f"{mode}/{frequencies}/{name}"
                            )
                            continue
                        for scale in SCALES:
                            runs = [
                                relative_error(layer, seed, scale, case["pos_dim"], r is None)
                                for seed in range(seeds)
                            ]
                            errors = [e for e, _ in runs]
                            gerf = [a for _, a in runs if a is not None]
                            mean = sum(errors) / len(errors)
                            std = math.sqrt(sum((e - mean) ** 2 for e in errors) / len(errors))
                            records.append(
                                dict(
                                    mode=mode,
                                    kernel="exact" if r is None else kernel,
                                    frequencies=frequencies,
                                    r=r,
                                    scale=scale,
                                    pos_dim=case["pos_dim"],
                                    case=name,
                                    rpe=case["rpe"],
                                    m=NUM_FREQUENCIES,
                                    seeds=seeds,
                                    rel_error=mean,
                                    rel_error_std=std,
                                    favorpp_A=sum(gerf) / len(gerf) if gerf else None,
                                    seconds=0.0,
                                )
                            )
                        elapsed = time.perf_counter() - start
                        for rec in records[-len(SCALES) :]:
                            rec["seconds"] = elapsed / len(SCALES)
    for message, where in skipped.items():
        where = ", ".join(sorted(where))
        print(f"  note: skipped (ValueError at construction: {message}): {where}")
    for mode in modes:
        for scale in SCALES:
            values = [
                x["favorpp_A"]
                for x in records
                if x["mode"] == mode and x["scale"] == scale and x["favorpp_A"] is not None
            ]
            if values:
                print(
                    f"  FAVOR++ calibrated A, {mode} mode, s={scale:g}: "
                    f"{min(values):.3f} .. {max(values):.3f} (0 is FAVOR+)"
                )
    columns = [(n, s) for n in chosen for s in SCALES]
    lookup = {
        (x["mode"], x["kernel"], x["frequencies"], x["r"], x["case"], x["scale"]): x["rel_error"]
        for x in records
    }
    print("\n## Relative output error ||out - exact||_F / ||exact||_F (mean over seeds)\n")
    head = ["mode", "kernel", "frequencies", "r"] + [f"{n} s={s:g}" for n, s in columns]
    print("| " + " | ".join(head) + " |")
    print("| --- | --- | --- | ---: " + "| ---: " * len(columns) + "|")
    for mode in modes:
        for kernel in (*KERNELS, "exact"):
            for frequencies in FREQUENCY_SETS:
                for r in [None] if kernel == "exact" else rs:
                    cells = [lookup.get((mode, kernel, frequencies, r, n, s)) for n, s in columns]
                    if all(c is None for c in cells):
                        continue
                    shown = ["–" if c is None else f"{c:.3g}" for c in cells]
                    label = f"| {mode} | {kernel} | {frequencies} | {'inf' if r is None else r} | "
                    print(label + " | ".join(shown) + " |")
    targets = []
    if TARGET_R in rs:
        print(f"\n## Targets at r = {TARGET_R}\n")
        for mode in modes:
            ratios = {}
            for frequencies in FREQUENCY_SETS:
                for n, s in columns:
                    plus = lookup.get((mode, "favor+", frequencies, TARGET_R, n, s))
                    plusplus = lookup.get((mode, "favor++", frequencies, TARGET_R, n, s))
                    if plus is not None and plusplus is not None:
                        ratios[(frequencies, n, s)] = plus / plusplus
            if not ratios:
                continue
            overall = geomean(list(ratios.values()))
            per_set = ", ".join(
                f"{fs} {geomean([v for key, v in ratios.items() if key[0] == fs]):.2f}"
                for fs in FREQUENCY_SETS
                if any(key[0] == fs for key in ratios)
            )
            passed = overall >= TARGET_RATIO
            targets.append(
                dict(
                    target=f"favor+/favor++ >= {TARGET_RATIO:g} at r={TARGET_R}",
                    mode=mode,
                    ratio=overall,
                    min=min(ratios.values()),
                    max=max(ratios.values()),
                    passed=passed,
                )
            )
            print(
                f"target favor+ / favor++ >= {TARGET_RATIO:g} [{mode}]: geometric mean "
                f"{overall:.2f} (range {min(ratios.values()):.2f}-{max(ratios.values()):.2f}; "
                f"per frequency set: {per_set}) {'PASS' if passed else 'FAIL'}"
            )
        base = {
            (n, s): lookup.get((*OLD_DEFAULT, TARGET_R, n, s))
            for n, s in columns
            if lookup.get((*OLD_DEFAULT, TARGET_R, n, s)) is not None
        }
        if base:
            print(
                f"\nOld default ({', '.join(OLD_DEFAULT)}) / combination at r = {TARGET_R} "
                f"(geometric mean over cases and scales; >= {TARGET_RATIO:g}: PASS). Mask-mode "
                "ratios compare errors against a different target function."
            )
            print("\n| mode | kernel | frequencies | ratio | min | max | >= 3x |")
            print("| --- | --- | --- | ---: | ---: | ---: | --- |")
            for mode in modes:
                for kernel in KERNELS:
                    for frequencies in FREQUENCY_SETS:
                        combo = (mode, kernel, frequencies)
                        values = [
                            base[key] / lookup[(*combo, TARGET_R, *key)]
                            for key in base
                            if (*combo, TARGET_R, *key) in lookup
                        ]
                        if not values or combo == OLD_DEFAULT:
                            continue
                        ratio = geomean(values)
                        passed = ratio >= TARGET_RATIO
                        targets.append(
                            dict(
                                target=f"old default / combination >= {TARGET_RATIO:g}",
                                mode=mode,
                                kernel=kernel,
                                frequencies=frequencies,
                                ratio=ratio,
                                min=min(values),
                                max=max(values),
                                passed=passed,
                            )
                        )
                        print(
                            f"| {mode} | {kernel} | {frequencies} | {ratio:.2f} | "
                            f"{min(values):.2f} | {max(values):.2f} | "
                            f"{'PASS' if passed else 'FAIL'} |"
                        )
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
