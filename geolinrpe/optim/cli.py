"""``geolinrpe lopt meta-train | evaluate``: meta-train a learned optimizer, compare it with
tuned Adam, AdamW with cosine decay and SGD with momentum on held-out tasks, and plot loss
against step.

``geolinrpe lopt meta-train --config examples/configs/lopt/meta_train.yaml [key=value ...]``
reads a YAML file of :class:`~geolinrpe.optim.meta.MetaConfig` fields (``yaml.safe_load``; an
unknown key is an error naming it); the ``--field`` flags still work and override the file, and
``key=value`` overrides (YAML values) override both. ``--resume checkpoint.pt`` continues a run
(without ``--config``, from the checkpoint's config: ``--resume ckpt meta_steps=1200`` runs on).

``main(argv)`` parses the arguments and calls :func:`run_meta_train` or :func:`run_evaluate`.
Defaults assume a 2-core CPU; measured with ``benchmarks/lopt.py --quick`` (60 meta-steps: 7 to 17 s
per network; tuning and 8 held-out tasks x 100 steps: about 10 s); the defaults are larger.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from .baselines import evaluate_optimizers, summarize, tune_learning_rates
from .meta import VALID_METRICS, MetaConfig, load_checkpoint, meta_train, plot_curves
from .tasks import FAMILIES, split_tasks

DESCRIPTION = (
    "Learned optimizers with RPE attention. 'meta-train' meta-trains an update network on "
    "families of small training tasks; 'evaluate' compares meta-trained checkpoints with "
    "Adam, AdamW with cosine decay and SGD with momentum (learning rates tuned on validation "
    "tasks) on held-out test "
    "tasks, and plots loss against step. See 'geolinrpe lopt meta-train --help' and "
    "'geolinrpe lopt evaluate --help' for their options."
)
"""The ``geolinrpe lopt --help`` description."""


def _yaml_mapping(text: str) -> dict:
    """A flag's value read as a YAML mapping (``yaml.safe_load``), e.g. ``{mlp: 0.03}``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not YAML: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"needs a mapping such as '{{mlp: 0.03}}', got {text!r}")
    return value


def _add_meta_args(parser: argparse.ArgumentParser) -> None:
    """One flag per MetaConfig field; an absent flag leaves the attribute unset (so that the
    config file's value, or the default, stands)."""
    defaults = MetaConfig()
    for f in fields(MetaConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        extra = {"default": argparse.SUPPRESS, "help": f"default: {value}"}
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **extra)
        elif f.name == "families":
            parser.add_argument(flag, nargs="+", choices=FAMILIES, **extra)
        elif f.name in ("unroll_schedule", "valid_at"):
            parser.add_argument(flag, nargs="+", type=int, metavar="T", **extra)
        elif f.name == "family_lrs":
            parser.add_argument(flag, type=_yaml_mapping, metavar="'{family: lr, ...}'", **extra)
        elif f.name == "rpe":
            parser.add_argument(flag, **{**extra, "help": f"RPE name or 'none' (default: {value})"})
        elif f.name == "valid_metric":
            parser.add_argument(flag, choices=VALID_METRICS, **extra)
        elif f.name == "clip_norm":
            parser.add_argument(flag, type=float, **extra)
        else:
            parser.add_argument(flag, type=type(value), **extra)


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), values: dict | None = None
) -> MetaConfig:
    """A :class:`MetaConfig` from a YAML file of its fields (read with ``yaml.safe_load``;
    ``None``: the defaults), then ``values`` (e.g. command-line flags), then ``key=value``
    overrides (values parsed as YAML: ``families=[quadratic,mlp]``, ``unroll_schedule=[10,50]``).

    Raises:
        ValueError: the file is missing or not a YAML mapping, an override is malformed, or a
            key is unknown or its value of the wrong type (the message names the key).
    """

    from ..train.config import parse_override, read_yaml_mapping

    merged: dict = {}
    if path is not None:
        merged.update(read_yaml_mapping(path, "MetaConfig keys"))
    merged.update(values or {})
    for override in overrides:
        key, value = parse_override(override)
        merged[key] = value
    return MetaConfig.from_dict(merged)


def _config(args: argparse.Namespace) -> MetaConfig:
    """The command line's config: ``--config`` (else, with ``--resume``, the checkpoint's
    config; else the defaults), then the flags, then the ``key=value`` overrides."""
    flags = {f.name: getattr(args, f.name) for f in fields(MetaConfig) if hasattr(args, f.name)}
    path = getattr(args, "config", None)
    if path is None and getattr(args, "resume", None) is not None:
        _, saved, _ = load_checkpoint(args.resume)
        flags = {**asdict(saved), **flags}
    return load_config(path, getattr(args, "overrides", ()), flags)


def run_meta_train(cfg: MetaConfig, out: Path, resume: Path | None = None) -> None:
    """Meta-train (continuing ``resume``, a checkpoint, if given) and write
    ``out/checkpoint.pt``, ``out/best.pt``, ``out/history.json``."""
    _, history = meta_train(cfg, out=out, resume=resume)
    (out / "history.json").write_text(json.dumps(history))
    print(f"wrote {out / 'checkpoint.pt'} ({history['seconds']:.0f} s)")


def run_evaluate(
    checkpoints: Sequence[Path],
    out: Path,
    num_tasks: int,
    steps: int,
    tune_steps: int,
    families: Sequence[str] | None = None,
) -> dict:
    """Tune the baselines (:data:`~geolinrpe.optim.baselines.BASELINES`) per family on
    meta-validation tasks at ``tune_steps``, train ``num_tasks`` held-out test tasks with every
    baseline and every checkpoint's learned optimizer (its ``eta`` per family) for ``steps``
    steps (:func:`~geolinrpe.optim.baselines.evaluate_optimizers`), print the table, write
    ``results.json`` (``rows`` from :func:`~geolinrpe.optim.baselines.summarize`, ``lrs``,
    ``records``) and ``curves.png`` into ``out``; return the results."""
    out.mkdir(parents=True, exist_ok=True)
    learned = {}
    for path in checkpoints:
        net, cfg, _ = load_checkpoint(path)
        label = "lopt-" + ("norpe" if cfg.rpe is None else cfg.rpe)
        label = label if label not in learned else f"{label}-{len(learned)}"
        learned[label] = (net, {f: cfg.lr_for(f) for f in FAMILIES})
        families = families or cfg.families
    families = tuple(families or FAMILIES)
    valid = split_tasks("valid", families, 2 * len(families))
    tuned = tune_learning_rates(valid, tune_steps)
    test = split_tasks("test", families, num_tasks)
    at = sorted({s for s in (steps // 4, steps // 2, steps) if s >= 5})
    result = evaluate_optimizers({"test": test}, steps, tuned, learned, at=at)
    rows = summarize(result.records)
    print(f"{'optimizer':<16}{'family':<12}{'step':>6}{'loss':>12}{'loss/L0':>10}")
    for r in rows:
        print(
            f"{r['optimizer']:<16}{r['family']:<12}{r['step']:>6}{r['loss_mean']:>12.4g}"
            f"{r['relative_mean']:>10.4f}"
        )
    curves = result.curves["in_dist"]
    plot_curves(curves, out / "curves.png")
    summary = {
        "rows": rows,
        "lrs": curves.lrs,
        "steps": steps,
        "num_tasks": num_tasks,
        "records": result.records,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The ``geolinrpe lopt`` argument parser (sub-commands ``meta-train`` and ``evaluate``)."""
    parser = argparse.ArgumentParser(prog="geolinrpe lopt", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("meta-train", help="meta-train an UpdateNetwork")
    train.add_argument("--out", type=Path, default=Path("runs/lopt"))
    train.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file of MetaConfig fields (e.g. examples/configs/lopt/meta_train.yaml); "
        "flags and key=value overrides take precedence, in that order",
    )
    train.add_argument("--resume", type=Path, default=None, help="checkpoint.pt to continue")
    train.add_argument("overrides", nargs="*", help="key=value MetaConfig overrides")
    _add_meta_args(train)
    ev = sub.add_parser(
        "evaluate", help="compare checkpoints with tuned Adam, AdamW cosine and SGD+momentum"
    )
    ev.add_argument("checkpoints", type=Path, nargs="*", help="checkpoint.pt files")
    ev.add_argument("--out", type=Path, default=Path("runs/lopt/eval"))
    ev.add_argument("--num-tasks", type=int, default=16)
    ev.add_argument("--steps", type=int, default=200)
    ev.add_argument("--tune-steps", type=int, default=100)
    ev.add_argument("--families", nargs="+", choices=FAMILIES, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``geolinrpe lopt``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "meta-train":
        run_meta_train(_config(args), args.out, args.resume)
    else:
        run_evaluate(
            args.checkpoints, args.out, args.num_tasks, args.steps, args.tune_steps, args.families
        )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as err:  # a bad option or checkpoint: a message, not a traceback
        print(f"geolinrpe lopt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
