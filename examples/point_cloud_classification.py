"""Shape classification of synthetic point clouds with the rotation-invariant radial FLT RPE.

Builds the config of ``examples/configs/point_cloud.yaml`` through the train API (10 shape
families: sphere, torus, box, cylinder, cone, ...; noisy, randomly rotated points; radial
FLT RPE with a per-cloud PCA frame, O(n) attention), trains and prints the test accuracy.

    python examples/point_cloud_classification.py
    python examples/point_cloud_classification.py --points 256   # the full config

Measured once (default arguments: 2,000 training clouds of 128 points, 10 epochs; 2 shared
cores of an Intel Xeon, torch 2.13 CPU): test accuracy 0.877 on 300 clouds (10 classes);
82 s wall time (78 s training).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geolinrpe.train import Config, final_test_metrics, run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "point_cloud.yaml"


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate; returns the run's results plus ``test_accuracy``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/example_point_cloud", help="run folder")
    p.add_argument("--train-size", type=int, default=2000, help="training clouds")
    p.add_argument("--test-size", type=int, default=300, help="valid and test clouds")
    p.add_argument("--points", type=int, default=128, help="points per cloud")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--minutes", type=float, default=None, help="training time limit")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    args = p.parse_args(argv)
    overrides = [
        f"data.train_size={args.train_size}",
        f"data.valid_size={args.test_size}",
        f"data.test_size={args.test_size}",
        f"data.options.num_points={args.points}",
        f"train.out_dir={args.out}",
        f"train.epochs={args.epochs}",
        f"train.progress={str(args.progress).lower()}",
    ]
    if args.minutes is not None:
        overrides.append(f"train.time_limit_min={args.minutes}")
    cfg = Config.load(CONFIG, overrides + list(args.set))
    results = run(cfg)
    results["test_accuracy"] = final_test_metrics(results, Path(cfg.train.out_dir))["accuracy"]
    print(
        f"point-cloud test accuracy: {results['test_accuracy']:.3f} "
        f"({cfg.data.test_size} clouds, {results['elapsed_s']:.0f} s training)"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
