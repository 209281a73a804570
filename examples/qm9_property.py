"""QM9 HOMO-LUMO gap with the FLT radial RPE (O(n) attention): train, then test MAE in meV.

Builds the config of ``examples/configs/qm9_gap_flt.yaml`` through the train API, shrinks it
to about a minute on a CPU (10,000 training and 500 validation/test molecules, 3 epochs,
50 warm-up steps; ``--train-size``, ``--test-size``, ``--epochs``), runs it with
:func:`geolinrpe.train.run` and prints the test MAE of the gap in meV. Files (checkpoints,
``metrics.csv``, ``results.json``, plots) go to ``--out``.

    python examples/qm9_property.py                      # defaults below
    python examples/qm9_property.py --epochs 8 --set optim.warmup_steps=200  # full config
    python examples/qm9_property.py --set model.rpe=null            # any config override

Measured once (default arguments, 2 shared cores of an Intel Xeon, torch 2.13 CPU, QM9 cache
already built): test gap MAE 326.3 meV on 500 molecules; 76 s wall time (71 s training,
939 steps). The first run adds a few seconds to build the cache under ``data/qm9``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geolinrpe.train import Config, final_test_metrics, run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "qm9_gap_flt.yaml"


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate; returns the run's results plus ``test_mae_mev``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/example_qm9", help="run folder")
    p.add_argument("--data", default=str(ROOT / "data" / "qm9"), help="QM9 cache folder")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=10000, help="training molecules")
    p.add_argument("--test-size", type=int, default=500, help="valid and test molecules")
    p.add_argument("--max-molecules", type=int, default=None, help="only the first N of QM9")
    p.add_argument("--minutes", type=float, default=None, help="training time limit")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    args = p.parse_args(argv)
    overrides = [
        f"data.path={args.data}",
        f"data.train_size={args.train_size}",
        f"data.valid_size={args.test_size}",
        f"data.test_size={args.test_size}",
        f"train.out_dir={args.out}",
        f"train.epochs={args.epochs}",
        "optim.warmup_steps=50",  # the config's 200 suit its 2,500 steps, not these few
        f"train.progress={str(args.progress).lower()}",
    ]
    if args.max_molecules is not None:
        overrides.append(f"data.max_molecules={args.max_molecules}")
    if args.minutes is not None:
        overrides.append(f"train.time_limit_min={args.minutes}")
    cfg = Config.load(CONFIG, overrides + list(args.set))
    results = run(cfg)
    test = final_test_metrics(results, Path(cfg.train.out_dir))
    results["test_mae_mev"] = 1000.0 * test["mae"]  # QM9 gap MAE is in eV
    print(
        f"QM9 gap test MAE: {results['test_mae_mev']:.1f} meV "
        f"({cfg.data.test_size} molecules, {results['elapsed_s']:.0f} s training)"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
