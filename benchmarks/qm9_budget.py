"""QM9 gap at a fixed wall-clock budget: FLT vs linear attention without RPE vs exact softmax
with the RPE bias vs SchNet.

Two geometry settings of the three attention models (``--geometry``, default both):

* ``sh``: the main job's model, whose atoms also get rotation-invariant spherical-harmonic
  (SOAP-like) features of their 5 Å neighbourhoods; the RPE is a second route to geometry.
* ``rpe``: no spherical-harmonic features, so the attention's RPE is the model's only access
  to the geometry (the setting of Graphormer-3D-style models, and the one that measures the
  RPE itself). FLT and exact start from multi-scale heads (length scales 0.5, 1, 2, 4 Å,
  ``f(0) = 4``) with a 10x learning rate on the RPE parameters, and FLT uses mask mode (the
  FLT paper's multiplicative RPE mask, ``K(q, k) f(r_i - r_j)``): its logit-mode estimate of
  a bias this large is too noisy to learn from (``SETTINGS``; ``benchmarks/RESULTS.md``).

SchNet (no attention) runs once. Each model
(``examples/configs/qm9_gap_{flt,linear,exact,schnet}.yaml``) trains for the same number of
minutes on the same split (the first ``--train-size`` molecules of the DimeNet++ training
split, seed 0), with the same optimizer settings and no validation during training (all of
the budget goes to optimizer steps). Schedule (``--schedule``): ``cosine`` (default) first
trains for ``CALIBRATION`` of the budget to measure the model's steps/s, then trains afresh
with a warm-up and a cosine to ``min_lr`` over the number of steps that fits the budget (hard
time limit ``TIME_CAP`` x the budget); ``constant`` keeps the learning rate constant until the
time limit (``train.time_limit_min``), so the last model is evaluated at full learning rate.
The model at the end (``last.pt``) is evaluated on the same ``--test-size`` test molecules.

Reported per model: test MAE of the gap (meV), optimizer steps, training throughput
(molecules/s over the budget, data loading included) and inference throughput (molecules/s,
forward passes over the test subset, batch ``data.eval_batch_size``), with the machine. The
target "FLT beats linear without RPE and is within 10% of exact softmax with the RPE bias"
(``MAE_flt < MAE_linear`` and ``MAE_flt <= 1.1 * MAE_exact``) is printed as PASS/FAIL per
geometry setting.

    python benchmarks/qm9_budget.py --quick --json qm9_budget.json   # 1 minute per model
    python benchmarks/qm9_budget.py --minutes 10                     # 10 minutes per model
    python benchmarks/qm9_budget.py --geometry rpe --models flt exact   # one setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from geolinrpe.train import Config, LoadedRun, evaluate, load_checkpoint, run

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "flt": ("qm9_gap_flt", "FLT radial RPE, linear attention"),
    "linear": ("qm9_gap_linear", "linear attention, no RPE"),
    "exact": ("qm9_gap_exact", "exact softmax + RPE bias"),
    "schnet": ("qm9_gap_schnet", "SchNet"),
}
ATTENTION = ("flt", "linear", "exact")
#: share of the budget spent on measuring a model's steps/s before a cosine run
CALIBRATION = 0.1
#: hard time limit of a cosine run, as a multiple of the budget (if the rate drops)
TIME_CAP = 1.1
NO_SH = "model.options={readout: sum, use_spherical_harmonics: false}"
MULTI_SCALE = [
    "model.rpe_options={num_frequencies: 16, rotation: frame, amplitude: 4.0, "
    "lengthscale: [0.5, 1.0, 2.0, 4.0]}",
    "optim.rpe_lr_scale=10",
]
#: config overrides of each geometry setting, per attention model
SETTINGS = {
    "sh": {"flt": [], "linear": [], "exact": []},
    "rpe": {
        "flt": [NO_SH, *MULTI_SCALE, "model.mode=mask"],
        "linear": [NO_SH],
        "exact": [NO_SH, *MULTI_SCALE],
    },
}


def machine() -> dict[str, object]:
    """Where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def inference_throughput(loaded: LoadedRun, repeats: int = 1) -> float:
    """Molecules/s of forward passes (no gradients) over the test split of a loaded run."""
    test = loaded.task.datasets()["test"]
    size = loaded.cfg.data.eval_batch_size or loaded.cfg.data.batch_size
    loader = DataLoader(test, size, shuffle=False, collate_fn=loaded.task.collate)
    batches = [b.to(loaded.device) for b in loader]
    model = loaded.model.eval()
    with torch.no_grad():
        loaded.task.forward(model, batches[0])  # warm-up
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            for batch in batches:
                loaded.task.forward(model, batch)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return repeats * len(test) / seconds


def run_model(key: str, setting: str | None, args: argparse.Namespace) -> dict[str, object]:
    """Train one model (in a geometry ``setting``; ``None`` for SchNet) for the budget, then
    evaluate ``last.pt`` on the test subset."""
    config, label = MODELS[key]
    extra = [] if setting is None else SETTINGS[setting][key]
    name = key if setting is None else f"{key}-{setting}"
    out = Path(args.out) / name
    overrides = [
        f"data.path={args.data}",
        f"data.train_size={args.train_size}",
        f"data.valid_size={args.test_size}",
        f"data.test_size={args.test_size}",
        f"optim.warmup_steps={args.warmup}",
        "train.epochs=1000",
        "train.eval_every=1000000000",
        "train.progress=false",
        "train.plot=false",
        "train.tensorboard=false",
        f"train.device={args.device}",
    ]
    if args.threads is not None:
        overrides.append(f"train.num_threads={args.threads}")
    path = ROOT / "examples" / "configs" / f"{config}.yaml"
    where = "" if setting is None else f" [geometry: {setting}]"
    print(f"== {name}: {label}{where}, {args.minutes} min; overrides {extra}", flush=True)
    schedule = ["optim.schedule=constant", f"train.time_limit_min={args.minutes}"]
    if args.schedule == "cosine":  # the step count that fits the budget, from a short run
        probe_min = CALIBRATION * args.minutes
        probe = Config.load(
            path,
            overrides
            + extra
            + args.set
            + ["optim.schedule=constant", f"train.time_limit_min={probe_min}"]
            + [f"train.out_dir={out}-calibration"],
        )
        rate = _steps_per_second(run(probe))
        budget_steps = max(int(rate * 60 * args.minutes), args.warmup + 1)
        print(f"   calibration: {rate:.2f} steps/s -> cosine over {budget_steps} steps", flush=True)
        schedule = [
            "optim.schedule=cosine",
            f"train.max_steps={budget_steps}",
            f"train.time_limit_min={TIME_CAP * args.minutes}",
        ]
    cfg = Config.load(path, overrides + schedule + [f"train.out_dir={out}"] + extra + args.set)
    results = run(cfg)
    steps = int(results["step"])
    seconds = float(results["elapsed_s"])
    loaded = load_checkpoint(out / "last.pt", device=args.device)
    test = evaluate(loaded, "test")
    infer = inference_throughput(loaded)
    row = {
        "model": key,
        "setting": setting,
        "description": label,
        "config": f"examples/configs/{config}.yaml",
        "overrides": extra,
        "test_mae_mev": 1000.0 * test["mae"],
        "steps": steps,
        "train_seconds": seconds,
        "train_mol_per_s": steps * cfg.data.batch_size / seconds,
        "infer_mol_per_s": infer,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
    }
    print(
        f"   test MAE {row['test_mae_mev']:.1f} meV, {steps} steps, "
        f"train {row['train_mol_per_s']:.0f} mol/s, inference {infer:.0f} mol/s",
        flush=True,
    )
    return row


def _steps_per_second(results: dict[str, float]) -> float:
    return float(results["step"]) / max(float(results["elapsed_s"]), 1e-9)


def check_target(rows: dict[str, dict[str, object]]) -> dict[str, object]:
    """FLT beats linear without RPE and is within 10% of exact softmax with the RPE bias
    (``rows``: the three attention models of one geometry setting, by model key)."""
    flt, lin, exact = (float(rows[k]["test_mae_mev"]) for k in ("flt", "linear", "exact"))
    beats = flt < lin
    within = flt <= 1.1 * exact
    return {
        "flt_beats_linear": beats,
        "flt_within_10pct_of_exact": within,
        "flt_over_exact": flt / exact,
        "passed": beats and within,
        "text": (
            f"FLT {flt:.1f} meV vs linear without RPE {lin:.1f} meV: "
            f"{'beats' if beats else 'does NOT beat'} it; vs exact softmax + RPE bias "
            f"{exact:.1f} meV: ratio {flt / exact:.3f} ({'<=' if within else '>'} 1.10)"
        ),
    }


def table(rows: list[dict[str, object]]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| model | geometry | test MAE gap (meV) | steps | train (mol/s) | inference (mol/s) "
        "| params |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        geometry = {"sh": "SH features", "rpe": "no SH features", None: "radius graph"}
        lines.append(
            f"| {r['description']} (`{r['model']}`) | {geometry[r['setting']]} "
            f"| {r['test_mae_mev']:.1f} | {r['steps']} "
            f"| {r['train_mol_per_s']:.0f} | {r['infer_mol_per_s']:.0f} | {r['parameters']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the comparison; returns what ``--json`` writes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 minute per model, 500 test mols")
    p.add_argument("--minutes", type=float, default=None, help="budget per model (default 5)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--out", default="runs/qm9_budget", help="run folders")
    p.add_argument("--data", default=str(ROOT / "data" / "qm9"), help="QM9 cache folder")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=None, help="test molecules (1000)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up optimizer steps")
    p.add_argument(
        "--schedule",
        default="cosine",
        choices=["cosine", "constant"],
        help="cosine: calibrate steps/s, then decay to min_lr over the steps that fit the "
        "budget (default); constant: constant LR until the time limit",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (config: 2)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument(
        "--geometry",
        nargs="*",
        default=list(SETTINGS),
        choices=list(SETTINGS),
        help="settings of the attention models (module docstring; default: both)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    args = p.parse_args(argv)
    if args.minutes is None:
        args.minutes = 1.0 if args.quick else 5.0
    if args.test_size is None:
        args.test_size = 500 if args.quick else 1000
    info = machine()
    print(
        f"machine: {info['cpu']} ({info['cpu_cores']} cores), GPU {info['gpu']}, "
        f"torch {info['torch']}; {args.minutes} min per model, {args.train_size} train / "
        f"{args.test_size} test molecules",
        flush=True,
    )
    rows = [
        run_model(key, setting, args)
        for setting in args.geometry
        for key in args.models
        if key in ATTENTION
    ]
    rows += [run_model(key, None, args) for key in args.models if key not in ATTENTION]
    report: dict[str, object] = {
        "machine": info,
        "minutes_per_model": args.minutes,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "device": args.device,
        "threads": args.threads if args.threads is not None else "config (2)",
        "rows": rows,
    }
    print()
    print(table(rows))
    report["targets"] = {}
    for setting in args.geometry:
        by_key = {r["model"]: r for r in rows if r["setting"] == setting}
        if all(k in by_key for k in ATTENTION):
            target = check_target(by_key)
            report["targets"][setting] = target
            verdict = "PASS" if target["passed"] else "FAIL"
            print(f"\ntarget [geometry: {setting}]: {verdict}: {target['text']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
