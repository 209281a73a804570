"""torch.compile against eager for the dense RPEAttention layer (issue 14: compile and export).

For each setting, one forward + backward of ``RPEAttention(c=64, h=4, num_features=64)`` on a
dense batch ``[b, n, 64]`` with 3D positions, timed eagerly and with
``torch.compile(fullgraph=True)`` (inductor, default mode), interleaved round by round so
that both see the same machine load; the first compiled call (compilation) is reported
separately. Outputs and gradients of the compiled layer are checked against eager first.

    python benchmarks/compile_speed.py [--quick] [--json PATH] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from geolinrpe import RPEAttention

SETTINGS = [
    ("flt-kernel", "logit", 4, 256),
    ("flt-kernel", "logit", 2, 2048),
    ("flt-kernel", "mask", 4, 256),
    ("flt-radial", "logit", 4, 256),
    (None, "logit", 4, 256),
]


def step(layer: torch.nn.Module, x: torch.Tensor, pos: torch.Tensor) -> float:
    start = time.perf_counter()
    out = layer(x, pos)
    out.square().mean().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 settings, 3 rounds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", help="write the records to this path")
    cfg = parser.parse_args(argv)
    settings = SETTINGS[:2] if cfg.quick else SETTINGS
    rounds = 3 if cfg.quick else cfg.rounds
    records = []
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, load "
        f"{os.getloadavg()[0]:.2f}"
    )
    print("| rpe | mode | b x n | eager ms | compiled ms | speed-up | compile s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for rpe, mode, b, n in settings:
        torch.manual_seed(0)
        layer = RPEAttention(64, 4, rpe=rpe, pos_dim=3, mode=mode, num_features=64)
        x = torch.randn(b, n, 64, requires_grad=True)
        pos = torch.randn(b, n, 3) * 2
        compiled = torch.compile(layer, fullgraph=True)
        start = time.perf_counter()
        out_c = compiled(x, pos)
        out_c.square().mean().backward()
        grad_c, x.grad = x.grad.clone(), None
        compile_s = time.perf_counter() - start
        out_e = layer(x, pos)
        out_e.square().mean().backward()
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_c, x.grad, rtol=1e-3, atol=1e-6)
        eager, fast = [], []
        for _ in range(rounds):  # interleaved: both see the same load
            eager.append(step(layer, x, pos))
            fast.append(step(compiled, x, pos))
        e_ms, c_ms = 1e3 * statistics.median(eager), 1e3 * statistics.median(fast)
        records.append(
            dict(rpe=rpe, mode=mode, batch=b, tokens=n, eager_ms=e_ms, compiled_ms=c_ms,
                 speedup=e_ms / c_ms, compile_s=compile_s)
        )  # fmt: skip
        print(
            f"| {rpe} | {mode} | {b} x {n} | {e_ms:.1f} | {c_ms:.1f} | {e_ms / c_ms:.2f} | "
            f"{compile_s:.1f} |",
            flush=True,
        )
        torch._dynamo.reset()
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
