"""Cost of one training step of an RPEAttention layer against linear attention without RPE.

One layer (embed 128, 4 heads of 32, 64 kernel features), one sequence of N points in 3D
(``pos ~ 2 N(0, I)``), forward + backward of ``out.square().mean()``, float32 on the CPU.
Configurations (``CONFIGS``):

* ``linear``: ``RPEAttention(rpe=None)``, the Performer without RPE (the cost baseline);
* ``old_default``: logit mode, FAVOR+, Monte-Carlo ``flt-kernel`` (16 frequencies), the
  previous default;
* ``new_default``: ``RPEAttention``'s current default with ``flt-kernel`` in 3D (mask mode,
  ELU kernel, lattice quadrature with ``--m`` frequencies);
* ``mask_favor``: the same with 64 FAVOR+ kernel features.

``--qm9`` also times a training step (forward, backward, AdamW) of the QM9 molecule model
in the RPE-only setting of ``qm9_rpe_learning.py`` (batch of 32 molecules) for the same four
configurations.

Timing: the configurations are interleaved (one step of each in turn, ``--repeats`` rounds
after a warm-up round) and the median per configuration is reported with its ratio to
``linear`` in the same run; the load average is printed. The explicit small-N path
(``quadratic_below``) is left on, as a user gets it.

    python benchmarks/flt_step_cost.py --qm9 --json flt_step_cost.json   # N = 1k-16k, QM9
    python benchmarks/flt_step_cost.py --quick                     # N = 1k, 4k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from geolinrpe import RPEAttention

CONFIGS = {
    "linear": dict(rpe=None),
    "old_default": dict(
        rpe="flt-kernel", pos_dim=3, mode="logit", rpe_options={"num_frequencies": 16}
    ),
    "new_default": dict(rpe="flt-kernel", pos_dim=3, rpe_options={"frequencies": "quadrature"}),
    "mask_favor": dict(
        rpe="flt-kernel",
        pos_dim=3,
        mode="mask",
        kernel="favor+",
        rpe_options={"frequencies": "quadrature"},
    ),
}


def build(name: str, m: int) -> RPEAttention:
    options = dict(CONFIGS[name])
    if name in ("new_default", "mask_favor"):
        options["rpe_options"] = {**options["rpe_options"], "num_frequencies": m}
    torch.manual_seed(0)
    return RPEAttention(128, 4, num_features=64, **options)


#: QM9 (the RPE-only setting of ``qm9_rpe_learning.py``): config overrides per configuration
QM9 = {
    "linear": ("qm9_gap_linear", []),
    "old_default": (
        "qm9_gap_flt",
        [
            "model.mode=logit",
            "model.kernel=favor+",
            "model.rpe_options={num_frequencies: 16, frequencies: mc, rotation: frame}",
        ],
    ),
    "new_default": ("qm9_gap_flt", []),
    "mask_favor": ("qm9_gap_flt", ["model.mode=mask", "model.kernel=favor+"]),
}


def qm9_steps(repeats: int, data: str) -> list[dict]:
    """Median time of a training step (forward, backward, AdamW) of the molecule model of
    ``examples/configs/<config>.yaml`` without spherical-harmonic features, one batch of 32
    QM9 molecules, interleaved as above."""
    from geolinrpe.train import Config
    from geolinrpe.train.tasks import build_task
    from geolinrpe.train.trainer import build_model

    root = Path(__file__).resolve().parents[1] / "examples" / "configs"
    no_sh = "model.options={readout: sum, use_spherical_harmonics: false}"
    runs = {}
    for name, (config, extra) in QM9.items():
        overrides = [f"data.path={data}", "model.num_features=32", no_sh, *extra]
        cfg = Config.load(root / f"{config}.yaml", overrides)
        task = build_task(cfg)
        train = task.datasets()["train"]
        task.fit_state(train)
        torch.manual_seed(0)
        model = build_model(cfg, task).train()
        batch = task.collate([train[i] for i in range(32)])
        runs[name] = (model, torch.optim.AdamW(model.parameters(), 1e-4), task, batch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 2):
        for name, (model, opt, task, batch) in runs.items():
            start = time.perf_counter()
            out = task.forward(model, batch)
            loss = task.loss(out, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if round_ > 1:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["linear"])
    records = []
    for name in runs:
        median = statistics.median(times[name])
        records.append(
            {"config": name, "n": "qm9", "step_seconds": median, "ratio_to_linear": median / base}
        )
        print(f"QM9 batch 32 {name:<16} {1000 * median:9.1f} ms  x{median / base:.2f}", flush=True)
    return records


def step(layer: RPEAttention, x: torch.Tensor, pos: torch.Tensor) -> float:
    start = time.perf_counter()
    out = layer(x, pos if layer.rpe is not None else None)
    out.square().mean().backward()
    layer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    p.add_argument("--m", type=int, default=64, help="frequencies of the quadrature RPE")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--qm9", action="store_true", help="also time the QM9 molecule model")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "qm9"))
    a = p.parse_args(argv)
    sizes = a.sizes or ([1024, 4096] if a.quick else [1024, 4096, 16384])
    layers = {name: build(name, a.m) for name in CONFIGS}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}; m = {a.m} quadrature frequencies",
        flush=True,
    )
    records = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(1, n, 128, generator=g)
        pos = 2 * torch.randn(1, n, 3, generator=g)
        times: dict[str, list[float]] = {name: [] for name in layers}
        for round_ in range(a.repeats + 1):
            for name, layer in layers.items():
                seconds = step(layer, x, pos)
                if round_:  # the first round warms up
                    times[name].append(seconds)
        base = statistics.median(times["linear"])
        for name in layers:
            median = statistics.median(times[name])
            records.append(
                {"config": name, "n": n, "step_seconds": median, "ratio_to_linear": median / base}
            )
            print(f"N={n:>6} {name:<16} {1000 * median:9.1f} ms  x{median / base:.2f}", flush=True)
    if a.qm9:
        records += qm9_steps(a.repeats * 4, a.data)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
