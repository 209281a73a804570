r"""The ``geolinrpe`` command: train, evaluate, predict and plot.

.. code-block:: text

    geolinrpe train CONFIG [key.subkey=value ...]
    geolinrpe eval CHECKPOINT [--split test] [key.subkey=value ...]
    geolinrpe predict CHECKPOINT (--smiles S [S ...] | --structures FILE [FILE ...]
                                  | --split test) [--out preds.csv]
    geolinrpe plot RUN_DIR
    geolinrpe config [SECTION ...]

``train`` reads a YAML config (``examples/configs/``), applies the overrides and calls
:func:`geolinrpe.train.run`; under ``torchrun --nproc_per_node P -m geolinrpe.cli train ...``
it trains on ``P`` processes. ``eval`` reports a checkpoint's metrics on a split of the data
its config names (overrides such as ``data.path=...`` point it elsewhere). ``predict`` writes
one CSV row per input: molecules from SMILES (RDKit ETKDGv3 + MMFF), structures from any file
ASE reads, or the items of a split; inputs that fail get an ``error`` and no prediction.
``plot`` re-draws ``learning_curve.png`` from a run's ``metrics.csv`` (and the RPE profiles
from ``best.pt`` or ``last.pt``). ``config`` lists every config key with its type, default
and description.

``train`` ends with a summary of :func:`geolinrpe.train.run`'s results, each value with its
unit as the epoch lines print it (QM9 energies in meV, e.g. ``test_mae  92.1 meV``);
``results.json`` in the run folder and ``eval --json`` keep the values in the metric's own
unit (eV) and add ``units``: key -> unit.

Also runs as ``python -m geolinrpe.cli``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geolinrpe",
        description="Train, evaluate and apply linear-attention models with relative "
        "positional encodings.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config (see examples/configs/). Overrides are "
        "key.subkey=value pairs parsed as YAML, e.g. optim.lr=1e-3 data.targets=[gap,homo] "
        "model.rpe=null train.resume=auto.",
        epilog="To list every config key with its type, default and description, run "
        "'geolinrpe config' (or 'geolinrpe config model' for one section).",
    )
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.subkey=value overrides")

    ev = commands.add_parser(
        "eval",
        help="metrics of a checkpoint on a data split",
        description="Metrics of a checkpoint (last.pt or best.pt) on a split of the data its "
        "config names; overrides (e.g. data.path=...) change where the data is read from.",
    )
    ev.add_argument("checkpoint", help="a last.pt or best.pt of a training run")
    ev.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument(
        "--json",
        default=None,
        help="also write the metrics to this JSON file (values in the metric's own unit, "
        "e.g. eV, and 'units': metric -> unit)",
    )
    ev.add_argument("overrides", nargs="*", help="data.* overrides, key.subkey=value")

    pr = commands.add_parser(
        "predict",
        help="predictions of a checkpoint for new inputs or a split, as CSV",
        description="Predict with a checkpoint. One CSV row per input, in input order; an "
        "input that cannot be converted or predicted has an error and no prediction. Exits "
        "with status 1 when every input failed (the CSV is still written).",
    )
    pr.add_argument("checkpoint", help="a last.pt or best.pt of a training run")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--smiles", nargs="+", metavar="SMILES", help="molecules as SMILES")
    source.add_argument(
        "--structures", nargs="+", metavar="FILE", help="structure files ASE reads (every frame)"
    )
    source.add_argument("--split", choices=("train", "valid", "test"), help="a data split")
    pr.add_argument("--out", default="predictions.csv", help="output CSV (default: %(default)s)")
    pr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--seed", type=int, default=0, help="RDKit embedding seed for --smiles")
    pr.add_argument("overrides", nargs="*", help="data.* overrides for --split")

    pl = commands.add_parser(
        "plot",
        help="re-draw a run's learning curve (and RPE profiles)",
        description="Re-draw learning_curve.png from RUN_DIR/metrics.csv, and rpe/*.png from "
        "RUN_DIR/best.pt (or last.pt) when the model has an RPE with a closed form.",
    )
    pl.add_argument("run_dir", help="a training run's out_dir")

    co = commands.add_parser(
        "config",
        help="list every config key with its type, default and description",
        description="List the config keys of geolinrpe train (YAML sections and "
        "key.subkey=value overrides): per key its type, default and description.",
    )
    co.add_argument(
        "sections", nargs="*", metavar="SECTION", help="data, model, optim or train (default: all)"
    )

    lopt = commands.add_parser(
        "lopt",
        help="learned-optimizer experiments (meta-train | evaluate)",
        description="Learned optimizers with RPE attention: `geolinrpe lopt meta-train ...` and "
        "`geolinrpe lopt evaluate ...` (see `geolinrpe lopt --help`).",
        add_help=False,
    )
    lopt.add_argument("lopt_args", nargs=argparse.REMAINDER, help="arguments of geolinrpe lopt")
    return parser


# ---------------------------------------------------------------------------- commands
def _train(args: argparse.Namespace) -> int:
    from .train import Config, run
    from .train.tasks import build_task

    cfg = Config.load(args.config, args.overrides)
    results = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # torchrun: process 0 reports
        _print_results(results, build_task(cfg))
    return 0


def _print_results(results: dict[str, float], task) -> None:
    """One line per result: key, value and unit, in the unit the epoch lines use (QM9
    energies in meV)."""
    width = max((len(k) for k in results), default=0)
    for key, value in results.items():
        value, unit = task.display_result(key, value)
        print(f"{key:<{width}}  {value:.6g}" + (f" {unit}" if unit else ""))


def _load(args: argparse.Namespace):
    from .train import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, device=args.device)
    if args.overrides:
        for override in args.overrides:
            if not override.startswith("data."):
                raise ValueError(f"override {override!r}: only data.* keys may change here")
        loaded.cfg = loaded.cfg.replace(args.overrides)
        loaded.task.cfg = loaded.cfg
    return loaded


def _eval(args: argparse.Namespace) -> int:
    from .train import evaluate

    loaded = _load(args)
    metrics = evaluate(loaded, args.split, args.batch_size)
    print(f"{args.split}: {loaded.task.format_metrics(metrics)}")
    if args.json:
        stored = {**metrics, "units": loaded.task.result_units(metrics)}
        Path(args.json).write_text(json.dumps(stored, indent=2) + "\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .train import predict

    loaded = _load(args)
    task = loaded.task
    entries: list[dict[str, Any]] = []  # one per input: input, name, item or error
    if args.split is not None:
        loaded.cfg.validate()
        dataset = task.datasets()[args.split]
        if dataset is None:
            raise ValueError(f"split {args.split!r} is not available")
        for i in range(len(dataset)):
            item = dataset[i]
            label = getattr(item, "name", None) or f"{args.split}[{i}]"
            entries.append({"input": f"{args.split}[{i}]", "name": label, "item": item})
    else:
        if not task.accepts_structures:
            raise ValueError(
                f"a {task.name!r} model predicts from --split only, not from molecules or "
                "structures"
            )
        entries = _convert_inputs(args)
    for entry in entries:
        if "item" in entry:
            problem = task.check_item(entry["item"])
            if problem is not None:
                entry["error"] = problem
                del entry["item"]
    good = [e for e in entries if "item" in e]
    _predict_entries(loaded, good, args.batch_size, predict)
    columns = ["input", "name", *task.prediction_columns(), "error"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for entry in entries:
            row = {"input": entry["input"], "name": entry.get("name", "")}
            row.update(entry.get("prediction", {}))
            row["error"] = entry.get("error", "")
            writer.writerow(row)
    failed = sum(1 for e in entries if e.get("error"))
    print(f"wrote {len(entries)} rows to {out} ({failed} failed)")
    for entry in entries:
        if entry.get("error"):
            print(f"  {entry['input']}: {entry['error']}", file=sys.stderr)
    if entries and failed == len(entries):
        print(f"geolinrpe predict: error: all {failed} inputs failed", file=sys.stderr)
        return 1
    return 0


def _convert_inputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """SMILES or structure files -> one entry per input (``item`` or ``error``)."""
    from .data import from_ase, from_smiles

    if args.smiles is not None:
        items, report = from_smiles(args.smiles, seed=args.seed)
        entries = [{"input": s, "name": s} for s in args.smiles]
    else:
        items, report = from_ase(args.structures, strict=False)
        entries = [{"input": "", "name": ""} for _ in range(report.num_inputs)]
    for item in items:
        index = int(item.idx)
        entries[index].update(item=item, name=str(getattr(item, "name", "")))
        if not entries[index]["input"]:
            entries[index]["input"] = str(getattr(item, "name", index))
    for failure in report.failures:
        entries[failure.index].update(input=failure.input, error=failure.reason)
    return entries


def _predict_entries(loaded, entries: list[dict[str, Any]], batch_size: int, predict) -> None:
    """Predict batch by batch; a batch that fails is redone item by item, so one bad input
    only fails itself (its ``error`` names the model's complaint)."""
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        try:
            rows = predict(loaded, [e["item"] for e in chunk], batch_size)
        except (ValueError, RuntimeError, IndexError):
            rows = None
        if rows is not None:
            for entry, row in zip(chunk, rows, strict=True):
                entry["prediction"] = row
            continue
        for entry in chunk:
            try:
                entry["prediction"] = predict(loaded, [entry["item"]], 1)[0]
            except (ValueError, RuntimeError, IndexError) as err:
                entry["error"] = f"model failed: {err}"


def _plot(args: argparse.Namespace) -> int:
    from .train import Config, load_checkpoint, plot_learning_curve, plot_rpe_profiles
    from .train.tasks import build_task

    run_dir = Path(args.run_dir)
    csv_path = run_dir / "metrics.csv"
    if not csv_path.is_file():
        raise ValueError(f"{run_dir} has no metrics.csv: not a training run folder")
    task = None
    if (run_dir / "config.yaml").is_file():  # a saved file: safety settings are not taken
        import yaml

        path = run_dir / "config.yaml"
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
        task = build_task(Config.from_saved(values, path))
    print(f"wrote {plot_learning_curve(csv_path, run_dir / 'learning_curve.png', task)}")
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).is_file():
            for path in plot_rpe_profiles(
                load_checkpoint(run_dir / name, "cpu").model,
                run_dir / "rpe",
                None if task is None else task.position_unit,
            ):
                print(f"wrote {path}")
            break
    return 0


def _config(args: argparse.Namespace) -> int:
    from .train.config import format_config_keys

    try:
        print(format_config_keys(args.sections))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `geolinrpe config | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "predict": _predict,
    "plot": _plot,
    "config": _config,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geolinrpe`` command; returns the exit status.

    A configuration or input problem (:class:`ValueError`, including a missing, corrupted or
    incomplete checkpoint) prints ``error: ...`` and exits with status 2 instead of a
    traceback; training that met a non-finite loss, gradient or validation metric
    (:class:`~geolinrpe.train.trainer.NonFiniteError`) exits with status 3; ``predict``
    exits with status 1 when every input failed (it still writes the CSV).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lopt"]:  # its own parser: meta-train | evaluate
        from .optim.cli import main as lopt_main

        try:
            return lopt_main(argv[1:])
        except ValueError as err:
            print(f"geolinrpe lopt: error: {err}", file=sys.stderr)
            return 2
    args = _parser().parse_args(argv)
    from .train.trainer import NonFiniteError

    try:
        return COMMANDS[args.command](args)
    except ValueError as err:
        print(f"geolinrpe {args.command}: error: {err}", file=sys.stderr)
        return _failed(2)
    except NonFiniteError as err:
        print(f"geolinrpe {args.command}: error: {err}", file=sys.stderr)
        return _failed(3)


def _failed(status: int) -> int:
    """``status``; a process of a multi-process run exits at once instead: after a failed
    run, interpreter teardown was seen to wait for peers that had already exited (a resume
    mismatch left one process waiting until it was killed). Output is flushed first; the
    checkpoints were written atomically before."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
