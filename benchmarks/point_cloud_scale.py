"""Point clouds at scale: accuracy at equal wall-clock budget, step time and memory to 64k points.

The task is :class:`geolinrpe.data.scenes.ContextScenes` (48 objects of two kinds in a box
of side 16; a point's label says whether an object of the other kind lies within ``R = 3.6``
of its object: global context that a local model cannot see, see its docstring). Every model
is :class:`geolinrpe.models.PointCloudTransformer` for per-point segmentation with the same
local stage (2 :class:`~geolinrpe.models.point_cloud.LocalAggregation` steps over 16 nearest
neighbours), embed 64, 4 heads, and differs only in what follows (``MODELS``):

* ``local-only``: no global attention (``num_layers=0``);
* ``linear``: 2 blocks of global linear attention without RPE (FAVOR+);
* ``flt``: 2 blocks of FLT attention, ``flt-kernel`` (Gaussian, one learned lengthscale per
  head, initialised at 0.5 / 1 / 2 / 4) with the library's 3D default: mask mode, ELU kernel,
  64 lattice-quadrature frequencies;
* ``flt-m16``: the same with 16 quadrature frequencies (a quarter of the cost of the RPE
  features);
* ``flt-recompute``: ``flt`` with ``recompute=True`` (each engine chunk rebuilt in the
  backward pass); the same numbers, for the cost part (not in the default ``--models``);
* ``exact``: exact softmax attention with the same RPE as a dense bias (logit mode, the
  Graphormer-style baseline; ``ExactRPEAttention``: O(n^2) time and memory);
* ``exact-mask``: the exact counterpart of ``flt``: the ELU kernel masked by the closed-form
  ``f`` (``ExactRPEAttention`` in mask mode), O(n^2).

Part 1, accuracy: each model trains for ``--budget`` seconds of wall clock (AdamW, lr 1e-3,
cosine in elapsed time, one fresh scene of ``--train-points`` points per step), then
per-point accuracy on ``--test`` held-out scenes (another seed) of each of ``--test-points``
sizes (the record's ``accuracy`` is at the largest). Models run one after another (not
interleaved: each needs the cores for its budget); the load average is recorded. (At lr 5e-3
no global model left chance level in 300-480 steps; logit mode with FAVOR+ stayed at chance
at lr 1e-3 too, at 1,024 points, where mask mode reached 73% in 300 steps.)

Part 2, cost: one training step (forward, backward, AdamW) of each model on one scene of N
points, each (model, N) in its own subprocess so that its peak resident memory (``VmHWM``:
the whole process, Python and torch included, about 0.5 GiB) is its own; median of 3 steps
after a warm-up step. ``exact`` is run while its estimated score memory (3 float32 tensors
of heads x N^2 per block) fits in ``--exact-limit-gib`` (default 4 GiB: N = 4,096 uses
0.75 GiB, 16,384 would need 12 GiB, 65,536 192 GiB), and recorded as not run beyond. (A
training step of ``exact`` took 7 s at 4,096 points and 38 s at 8,192 points.)

    python benchmarks/point_cloud_scale.py --json point_cloud_scale.json
    python benchmarks/point_cloud_scale.py --quick      # 2k points, short budget, N <= 16k

Part 3 (``--equal-steps STEPS POINTS``): ``flt``, ``exact`` and ``exact-mask`` trained for
the same number of steps (cosine in steps) on smaller scenes, where exact attention is
affordable: what the O(n) estimate costs in accuracy per step, apart from its speed.

JSON records: ``{"part": "accuracy" | "equal-steps" | "cost", "model", "n_points", "step_seconds",
"peak_mib", "accuracy", ...}`` (``accuracy`` only in part 1; ``step_seconds`` in part 1 is
the mean over the budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch_geometric.data import Batch

from geolinrpe.data.scenes import ContextScenes
from geolinrpe.models import PointCloudTransformer

LENGTHSCALES = [0.5, 1.0, 2.0, 4.0]
COMMON = dict(
    num_classes=2,
    task="segmentation",
    in_channels=2,
    embed_dim=64,
    num_heads=4,
    num_layers=2,
    mlp_ratio=2.0,
    local="knn",
    local_k=16,
    local_layers=2,
    local_radius=0.3,
    max_radius=14.0,
    num_features=32,
)
FLT = dict(rpe="flt-kernel", rpe_options={"lengthscale": LENGTHSCALES})
MODELS = {
    "local-only": dict(num_layers=0),
    "linear": dict(rpe=None),
    "flt": FLT,
    "flt-m16": dict(
        rpe="flt-kernel", rpe_options={"lengthscale": LENGTHSCALES, "num_frequencies": 16}
    ),
    # the same as "flt", its engine chunks rebuilt in the backward pass (training memory)
    "flt-recompute": dict(**FLT, attention_options={"recompute": True}),
    "exact": dict(attention="exact", mode="logit", **FLT),
    "exact-mask": dict(attention="exact", **FLT),
}


def build(name: str, seed: int = 0) -> PointCloudTransformer:
    torch.manual_seed(seed)
    return PointCloudTransformer(**{**COMMON, **MODELS[name]})


def scenes(num_points: int, num_samples: int, seed: int) -> ContextScenes:
    return ContextScenes(num_points, num_samples, seed=seed)


def step(model, optimizer, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(batch), batch.y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model, data: ContextScenes) -> float:
    model.eval()
    right = total = 0
    for i in range(len(data)):
        batch = Batch.from_data_list([data[i]])
        right += int((model(batch).argmax(-1) == batch.y).sum())
        total += batch.y.numel()
    model.train()
    return right / total


def train_for(
    name: str, budget: float, num_points: int, tests: list, lr: float, max_steps: int = 0
) -> dict:
    """Train for ``budget`` seconds (cosine in elapsed time), or ``max_steps`` steps (cosine
    in steps) when given; then the accuracy on each test set."""
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train = scenes(num_points, 10**6, seed=0)
    steps, losses, start = 0, [], time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget or max_steps:
        progress = steps / max_steps if max_steps else elapsed / budget
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
        losses.append(step(model, optimizer, Batch.from_data_list([train[steps]])))
        steps += 1
    seconds = time.perf_counter() - start
    by_size = {len(test[0].pos): accuracy(model, test) for test in tests}
    return {
        "part": "equal-steps" if max_steps else "accuracy",
        "model": name,
        "n_points": max(by_size),
        "train_points": num_points,
        "budget_seconds": budget,
        "steps": steps,
        "step_seconds": seconds / max(steps, 1),
        "final_loss": statistics.mean(losses[-20:]) if losses else None,
        "accuracy": by_size[max(by_size)],
        "accuracy_by_points": by_size,
        "test_scenes": len(tests[0]),
        "peak_mib": None,  # the cost records measure it, one (model, N) per process
        "load_average": os.getloadavg()[0],
    }


#: exact attention runs while 3 score tensors per block fit in this (a 24 GiB machine)
EXACT_LIMIT_GIB = 4.0


def exact_fits(num_points: int, limit_gib: float) -> bool:
    heads = COMMON["num_heads"]
    return 3 * heads * num_points**2 * 4 <= limit_gib * 2**30


def peak_mib() -> float:
    """This process's peak resident memory (``VmHWM``; unlike ``ru_maxrss`` it is not
    inherited across ``exec``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def measure(name: str, num_points: int, limit_gib: float = EXACT_LIMIT_GIB) -> dict:
    """One model's training-step time and peak memory (run in a fresh subprocess)."""
    if name.startswith("exact") and not exact_fits(num_points, limit_gib):
        need = 3 * COMMON["num_heads"] * num_points**2 * 4 / 2**30
        sys.exit(f"not run: score tensors need about {need:.0f} GiB (limit {limit_gib} GiB)")
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = Batch.from_data_list([scenes(num_points, 1, seed=2)[0]])
    before = peak_mib()
    times = []
    for _ in range(4):
        start = time.perf_counter()
        step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
    return {
        "part": "cost",
        "model": name,
        "n_points": num_points,
        "step_seconds": statistics.median(times[1:]),
        "peak_mib": peak_mib(),
        "rss_before_step_mib": before,
        "accuracy": None,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


def cost(name: str, num_points: int, limit_gib: float) -> dict:
    """The cost record of one (model, N), measured in a subprocess, or why it was not run."""
    note = None
    if name.startswith("exact") and not exact_fits(num_points, limit_gib):
        need = 3 * COMMON["num_heads"] * num_points**2 * 4 / 2**30
        note = f"score tensors need about {need:.0f} GiB per block (limit {limit_gib} GiB)"
    else:
        cmd = [sys.executable, __file__, "--_measure", name, str(num_points), str(limit_gib)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if not run.returncode:
            return {**json.loads(run.stdout.strip().splitlines()[-1]), "fits": True}
        note = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"
    return {
        "part": "cost",
        "model": name,
        "n_points": num_points,
        "step_seconds": None,
        "peak_mib": None,
        "accuracy": None,
        "fits": False,
        "note": note,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2k points, 40 s budgets, N <= 16k")
    p.add_argument("--train-points", type=int, default=4096, help="points per training scene")
    p.add_argument("--test-points", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per model")
    p.add_argument("--test", type=int, default=16, help="held-out scenes")
    p.add_argument("--lr", type=float, default=1e-3)
    default = [name for name in MODELS if name != "flt-recompute"]
    p.add_argument("--models", nargs="+", default=default, choices=list(MODELS))
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--exact-limit-gib", type=float, default=EXACT_LIMIT_GIB)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument(
        "--equal-steps",
        type=int,
        nargs=2,
        metavar=("STEPS", "POINTS"),
        help="also train --equal-steps-models for STEPS steps on scenes of POINTS points",
    )
    p.add_argument(
        "--equal-steps-models", nargs="+", default=["flt", "exact", "exact-mask"], choices=MODELS
    )
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--json", type=Path, help="write the records here")
    p.add_argument("--_measure", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._measure:
        limit = float(a._measure[2]) if len(a._measure) > 2 else EXACT_LIMIT_GIB
        print(json.dumps(measure(a._measure[0], int(a._measure[1]), limit)))
        return []
    if a.quick:
        a.train_points, a.test_points, a.budget, a.test = 2048, [2048], 40.0, 4
        a.sizes = [s for s in a.sizes if s <= 16384]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    records = []
    if not a.skip_accuracy:
        tests = [scenes(n, a.test, seed=1) for n in a.test_points]
        sizes = " | ".join(f"accuracy at {n}" for n in a.test_points)
        print(f"\n| model | steps in {a.budget:.0f} s | s/step | final loss | {sizes} |")
        print("|---|---|---|---|" + "---|" * len(a.test_points))
        for name in a.models:
            r = train_for(name, a.budget, a.train_points, tests, a.lr)
            records.append(r)
            accs = " | ".join(f"{100 * v:.1f}%" for v in r["accuracy_by_points"].values())
            print(
                f"| {name} | {r['steps']} | {r['step_seconds']:.2f} | {r['final_loss']:.3f} "
                f"| {accs} |",
                flush=True,
            )
    if a.equal_steps:
        num_steps, num_points = a.equal_steps
        test = [scenes(num_points, a.test, seed=1)]
        print(f"\n| model | {num_steps} steps at {num_points} points: s/step | accuracy |")
        print("|---|---|---|")
        for name in a.equal_steps_models:
            r = train_for(name, math.inf, num_points, test, a.lr, max_steps=num_steps)
            records.append(r)
            print(f"| {name} | {r['step_seconds']:.2f} | {100 * r['accuracy']:.1f}% |", flush=True)
    if not a.skip_cost:
        print("\n| model | N | s/step | peak MiB |")
        print("|---|---|---|---|")
        for n in a.sizes:
            for name in a.models:
                r = cost(name, n, a.exact_limit_gib)
                records.append(r)
                secs = "-" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}"
                peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                print(f"| {name} | {n} | {secs} | {peak} | {r.get('note', '')}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if a.json:
        a.json.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
