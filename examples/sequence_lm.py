"""Character-level causal language model with a 1D FLT RPE, on this repository's source.

Builds the config of ``examples/configs/sequence_lm.yaml`` through the train API (causal
O(n) attention, 1D FLT RPE over token positions; text: the ``geolinrpe/`` package source or
``--data``, any text file or folder of ``.py``/``.txt``/``.md`` files), trains and prints the
test perplexity per character.

    python examples/sequence_lm.py
    python examples/sequence_lm.py --steps 1500    # the full config

Measured once (default arguments: 800 steps of 32 sequences of 128 characters; 2 shared
cores of an Intel Xeon, torch 2.13 CPU): test perplexity 6.04 per character (accuracy 0.506)
on 100 sequences; 140 s wall time (136 s training).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geolinrpe.train import Config, final_test_metrics, run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "sequence_lm.yaml"


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate; returns the run's results plus ``test_perplexity``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/example_sequence_lm", help="run folder")
    p.add_argument("--data", default=str(ROOT / "geolinrpe"), help="text file or folder")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seq-len", type=int, default=128, help="characters per sequence")
    p.add_argument("--test-size", type=int, default=100, help="valid and test sequences")
    p.add_argument("--minutes", type=float, default=None, help="training time limit")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    args = p.parse_args(argv)
    overrides = [
        f"data.path={args.data}",
        f"data.valid_size={args.test_size}",
        f"data.test_size={args.test_size}",
        f"data.options.seq_len={args.seq_len}",
        f"train.out_dir={args.out}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={max(args.steps // 4, 1)}",
        f"train.progress={str(args.progress).lower()}",
    ]
    if args.minutes is not None:
        overrides.append(f"train.time_limit_min={args.minutes}")
    cfg = Config.load(CONFIG, overrides + list(args.set))
    results = run(cfg)
    results["test_perplexity"] = final_test_metrics(results, Path(cfg.train.out_dir))["perplexity"]
    print(
        f"character LM test perplexity: {results['test_perplexity']:.2f} "
        f"({cfg.data.test_size} sequences, {results['elapsed_s']:.0f} s training)"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
