"""Cost of one training step of an RPEAttention layer against linear attention without RPE.

One layer (embed 128, 4 heads of 32, 64 kernel features), one sequence of N points in 3D
(``pos ~ 2 N(0, I)``), forward + backward of ``out.square().mean()``, float32 on the CPU.
Configurations (``CONFIGS``):

* ``linear``: ``RPEAttention(rpe=None)``, the Performer without RPE (the cost baseline);
* ``old_default``: logit mode, FAVOR+, Monte-Carlo ``flt-kernel`` (16 frequencies), the
  previous default;
* ``new_default``: ``RPEAttention``'s current default with ``flt-kernel`` (product mode,
  lattice quadrature, ``num_frequencies`` as ``--m``);
* ``mask_quadrature``: mask mode with the same quadrature RPE.

Timing: the configurations are interleaved (one step of each in turn, ``--repeats`` rounds
after a warm-up round) and the median per configuration is reported with its ratio to
``linear`` in the same run; the load average is printed. The explicit small-N path
(``quadratic_below``) is left on, as a user gets it.

    python benchmarks/flt_step_cost.py --json flt_step_cost.json   # N = 1k, 4k, 16k
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
    "mask_quadrature": dict(
        rpe="flt-kernel", pos_dim=3, mode="mask", rpe_options={"frequencies": "quadrature"}
    ),
}


def build(name: str, m: int) -> RPEAttention:
    options = dict(CONFIGS[name])
    if name in ("new_default", "mask_quadrature"):
        options["rpe_options"] = {**options["rpe_options"], "num_frequencies": m}
    torch.manual_seed(0)
    return RPEAttention(128, 4, num_features=64, **options)


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
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
