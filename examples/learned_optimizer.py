"""Meta-train a learned optimizer with and without RPE, then compare it with tuned Adam and
SGD+momentum on held-out tasks (loss-vs-step PNG in ``OUT/eval/curves.png``).

About 3 to 5 minutes on 2 CPU cores with the defaults (not yet timed end to end):

    python examples/learned_optimizer.py --out runs/lopt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geolinrpe.optim.cli import main as lopt

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lopt"))
    parser.add_argument("--meta-steps", type=int, default=300)
    args = parser.parse_args()
    for name, rpe in (("rpe", "flt-kernel"), ("norpe", "none")):
        lopt(
            [
                "meta-train",
                "--out",
                str(args.out / name),
                "--rpe",
                rpe,
                "--meta-steps",
                str(args.meta_steps),
                "--valid-every",
                "100",
            ]
        )
    lopt(
        [
            "evaluate",
            str(args.out / "rpe" / "best.pt"),
            str(args.out / "norpe" / "best.pt"),
            "--out",
            str(args.out / "eval"),
        ]
    )
