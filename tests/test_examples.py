"""The example scripts (examples/*.py) and benchmarks/qm9_budget.py run end to end.

Each ``main()`` runs with a tiny budget (a few optimizer steps on a few items, one thread, no
plots) and must return its metric and write its run files. The full default runs take
minutes and are not run here (their measured figures are in each script's docstring).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from geolinrpe.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.plot=false", "train.num_threads=1", "train.tensorboard=false"]


def _load(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qm9_cache(tmp_path_factory) -> Path:
    """A QM9 cache folder shared by the QM9 tests (built from qm9pack on first use)."""
    return tmp_path_factory.mktemp("qm9")


def _run_files(out: Path) -> None:
    for name in ("config.yaml", "metrics.csv", "last.pt"):
        assert (out / name).is_file(), name


def test_qm9_property(tmp_path, qm9_cache, capsys):
    main = _load("examples/qm9_property.py").main
    out = tmp_path / "run"
    args = ["--out", str(out), "--data", str(qm9_cache), "--max-molecules", "300"]
    args += ["--train-size", "32", "--test-size", "16", "--epochs", "1"]
    results = main(args + ["--set", "data.batch_size=16", *FAST])
    assert results["completed"] == 1.0
    assert math.isfinite(results["test_mae_mev"]) and results["test_mae_mev"] > 0
    assert "meV" in capsys.readouterr().out
    _run_files(out)
    assert (out / "results.json").is_file()


def test_qm9_property_time_limit(tmp_path, qm9_cache):
    """A time-limited run returns no test metrics from ``run``: the example evaluates the
    checkpoint instead."""
    main = _load("examples/qm9_property.py").main
    out = tmp_path / "run"
    args = ["--out", str(out), "--data", str(qm9_cache), "--max-molecules", "300"]
    args += ["--train-size", "32", "--test-size", "16", "--minutes", "0.001"]
    results = main(args + ["--set", "data.batch_size=16", *FAST])
    assert results["completed"] == 0.0
    assert math.isfinite(results["test_mae_mev"])
    _run_files(out)


def test_oc20_is2re(tmp_path, capsys):
    main = _load("examples/oc20_is2re.py").main
    out = tmp_path / "run"
    data = tmp_path / "oc20" / "is2re.lmdb"
    args = ["--out", str(out), "--data", str(data), "--systems", "20", "--test-size", "4"]
    results = main(args + ["--epochs", "1", "--set", "data.batch_size=8", *FAST])
    assert math.isfinite(results["test_energy_mae_ev"]) and results["test_energy_mae_ev"] > 0
    assert " eV" in capsys.readouterr().out
    _run_files(out)


@pytest.mark.parametrize("baseline", [False, True])
def test_long_range(tmp_path, capsys, baseline):
    """The molten-salt boxes are written through the CLI option and read back as OC20."""
    main = _load("examples/long_range.py").main
    out = tmp_path / "run"
    data = tmp_path / "molten_salt"
    args = ["--out", str(out), "--data", str(data), "--boxes", "16", "--test-size", "4"]
    args += ["--baseline"] if baseline else []
    results = main(args + ["--epochs", "1", "--set", "data.batch_size=4", *FAST])
    assert math.isfinite(results["test_energy_mae_mev_per_atom"])
    assert results["test_energy_mae_mev_per_atom"] > 0
    assert "meV/atom" in capsys.readouterr().out
    _run_files(out)
    has_readout = "reciprocal_energy" in load_checkpoint(out / "last.pt", "cpu").cfg.model.options
    assert has_readout is not baseline


def test_point_cloud_classification(tmp_path):
    main = _load("examples/point_cloud_classification.py").main
    out = tmp_path / "run"
    args = ["--out", str(out), "--train-size", "32", "--test-size", "16", "--points", "32"]
    results = main(args + ["--epochs", "1", "--set", *FAST])
    assert 0.0 <= results["test_accuracy"] <= 1.0
    _run_files(out)


@pytest.mark.parametrize("local_only", [False, True])
def test_point_cloud_scale(local_only, capsys):
    main = _load("examples/point_cloud_scale.py").main
    args = ["--points", "600", "--seconds", "0.5", "--test", "1"]
    results = main(args + (["--local-only"] if local_only else []))
    assert 0.0 <= results["accuracy"] <= 1.0 and results["steps"] >= 1
    assert "test accuracy" in capsys.readouterr().out


def test_image_patches(tmp_path):
    main = _load("examples/image_patches.py").main
    out = tmp_path / "run"
    args = ["--out", str(out), "--train-size", "64", "--epochs", "1"]
    results = main(args + ["--set", "data.valid_size=32", "data.test_size=32", *FAST])
    assert 0.0 <= results["test_accuracy"] <= 1.0
    _run_files(out)


def test_sequence_lm(tmp_path):
    main = _load("examples/sequence_lm.py").main
    out = tmp_path / "run"
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = ["--out", str(out), "--data", str(text), "--steps", "3", "--seq-len", "32"]
    results = main(args + ["--test-size", "8", "--set", *FAST])
    # an untrained model over a ~30-character vocabulary: perplexity of that order
    assert 1.0 < results["test_perplexity"] < 200.0
    _run_files(out)


def test_qm9_budget_benchmark(tmp_path, qm9_cache, capsys):
    main = _load("benchmarks/qm9_budget.py").main
    report_path = tmp_path / "report.json"
    args = ["--out", str(tmp_path / "runs"), "--data", str(qm9_cache), "--json", str(report_path)]
    args += ["--train-size", "32", "--test-size", "16", "--minutes", "0.002", "--threads", "1"]
    report = main(args + ["--set", "data.max_molecules=300", "data.batch_size=16"])
    rows = {(r["model"], r["setting"]): r for r in report["rows"]}
    attention = {(m, s) for m in ("flt", "linear", "exact") for s in ("sh", "rpe")}
    assert set(rows) == attention | {("schnet", None)}
    for row in rows.values():
        assert math.isfinite(row["test_mae_mev"]) and row["steps"] >= 1
        assert row["train_mol_per_s"] > 0 and row["infer_mol_per_s"] > 0
    assert rows[("linear", "rpe")]["overrides"] == [main.__globals__["NO_SH"]]
    assert set(report["targets"]) == {"sh", "rpe"}
    assert all(isinstance(t["passed"], bool) for t in report["targets"].values())
    assert json.loads(report_path.read_text())["rows"][0]["model"] == "flt"
    printed = capsys.readouterr().out
    assert "| model | geometry |" in printed and "target [geometry: rpe]:" in printed
    assert printed.count("calibration:") == 7  # cosine runs measure their steps/s first
    # the RPE-only linear model has no geometry at all: moving atoms changes nothing
    loaded = load_checkpoint(tmp_path / "runs" / "linear-rpe" / "last.pt", "cpu")
    batch = loaded.task.collate([loaded.task.datasets()["test"][i] for i in range(4)])
    moved = batch.clone()
    moved.pos = batch.pos * 1.5
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(moved)["y"], loaded.model(batch)["y"])


def test_security_benchmark_finds_no_unsafe_outcome(tmp_path):
    """Every class of bad input, a few byte flips per file: no code runs, no process dies,
    every refusal names the input; silent changes only from flips inside stored values."""
    report = tmp_path / "security.json"
    results = _load("benchmarks/security.py").main(["--flips", "6", "--json", str(report)])
    ours = [r for r in results if "(before)" not in r.cls]
    assert {r.outcome for r in ours} <= {"named error", "read correctly", "silently wrong"}
    assert all(
        "overflow value or free space" in r.label for r in ours if r.outcome == "silently wrong"
    )
    assert sum(r.outcome == "named error" for r in ours) >= 70
    assert len(json.loads(report.read_text())) == len(results)


def test_ase_md(tmp_path):
    """Trains a 1-epoch S2EF model, relaxes a slab for 3 BFGS steps, runs 5 NVE steps."""
    main = _load("examples/ase_md.py").main
    args = ["--data", str(tmp_path / "s2ef"), "--out", str(tmp_path / "run"), "--systems", "6"]
    args += ["--test-size", "2", "--epochs", "1", "--relax-steps", "3", "--md-steps", "5"]
    report = main(args + ["--set", "train.plot=false", *FAST[1:]])
    assert report["relax_steps"] <= 3 and math.isfinite(report["final_energy_ev"])
    assert abs(report["nve_relative_drift"]) < 0.05


def test_rpe_accuracy_benchmark(tmp_path, qm9_cache, capsys):
    """``benchmarks/rpe_accuracy.py --quick`` narrowed to the Gaussian kernel rows, one draw:
    records for every offset set and frequency set, the tables and the target lines."""
    report = tmp_path / "rpe.json"
    args = ["--quick", "--m", "16", "64", "256", "--draws", "1", "--only", "gaussian"]
    args += ["--qm9-root", str(qm9_cache), "--json", str(report)]
    records = _load("benchmarks/rpe_accuracy.py").main(args)
    fourier = [r for r in records if r["table"] == "fourier"]
    keys = {"family", "pos_dim", "frequencies", "m", "rel_rmse", "offsets", "kernel", "seconds"}
    assert all(keys <= set(r) for r in fourier)
    assert {r["offsets"] for r in fourier} == {"gaussian", "ball3", "qm9"}
    assert {r["pos_dim"] for r in fourier if r["offsets"] == "qm9"} == {3}
    assert {r["frequencies"] for r in fourier} == {"mc", "qmc", "quadrature"}
    assert all(math.isfinite(r["rel_rmse"]) and r["rel_rmse"] >= 0 for r in fourier)
    exact_1d = [r for r in fourier if r["frequencies"] == "quadrature" and r["pos_dim"] == 1]
    assert all(r["draws"] == 1 and r["rel_rmse"] < 1e-10 for r in exact_1d if r["m"] >= 64)
    assert {r["table"] for r in records} == {"fourier", "spe", "periodic"}
    assert len(json.loads(report.read_text())) == len(records)
    printed = capsys.readouterr().out
    assert "| family | mc 16 |" in printed and "beyond 3 Å" in printed
    assert "target flt-kernel gaussian 1D (any frequency set): PASS" in printed


def test_attention_accuracy_benchmark(tmp_path, capsys):
    """``benchmarks/attention_accuracy.py --quick`` on one case and seed: every mode of
    ``MODES``, both kernels, the r = inf floor and the target lines."""
    from geolinrpe.nn.attention import MODES

    report = tmp_path / "attention.json"
    args = ["--quick", "--seeds", "1", "--r", "256", "--cases", "gauss l=2 3D"]
    records = _load("benchmarks/attention_accuracy.py").main(args + ["--json", str(report)])
    keys = {"mode", "kernel", "frequencies", "r", "scale", "pos_dim", "rel_error", "rpe", "m"}
    assert all(keys <= set(r) and r["seeds"] == 1 for r in records)
    assert {r["mode"] for r in records} == set(MODES)
    assert {r["kernel"] for r in records} == {"favor+", "favor++", "exact"}
    assert all(math.isfinite(r["rel_error"]) and r["rel_error"] >= 0 for r in records)
    assert all(r["favorpp_A"] < 0 for r in records if r["kernel"] == "favor++")
    assert len(json.loads(report.read_text())) == len(records)
    printed = capsys.readouterr().out
    assert "| mode | kernel | frequencies | r |" in printed
    assert "target favor+ / favor++ >= 3 [logit]" in printed


def test_lopt_magnitude_only_ablation():
    """``benchmarks/lopt.py --ablate-direction``: a copy whose direction head is zero, so the
    update direction is the linear skip alone; the original is untouched."""
    from geolinrpe.optim import TemporalUpdateNetwork, UpdateNetwork

    ablate = _load("benchmarks/lopt.py").magnitude_only
    for net in (TemporalUpdateNetwork(width=8), UpdateNetwork(width=8)):
        torch.nn.init.normal_(net.head.weight)
        torch.nn.init.normal_(net.head.bias)
        before = net.head.weight.detach().clone()
        copy = ablate(net)
        assert torch.equal(net.head.weight, before)  # a copy
        assert copy.head.weight[0].abs().sum() == 0 and copy.head.bias[0] == 0
        assert torch.equal(copy.head.weight[1], before[1])


def test_lopt_network_variants():
    """``--networks temporal_magnitude``: the temporal network meta-trained with
    ``learn_direction=False``, labelled from its config (so ``--checkpoint`` agrees)."""
    from geolinrpe.optim import MetaConfig

    bench = _load("benchmarks/lopt.py")
    assert bench.network_options("spatial") == {"network": "spatial", "learn_direction": True}
    options = bench.network_options("temporal_magnitude")
    assert options == {"network": "temporal", "learn_direction": False}
    assert bench.label_of(MetaConfig(**options)) == "lopt_temporal_magnitude"
    assert bench.label_of(MetaConfig(network="temporal")) == "lopt_temporal"
    for bad in ("temporal_direction", "mlp"):
        with pytest.raises(ValueError, match="--networks"):
            bench.network_options(bad)
    import argparse

    args = argparse.Namespace(
        meta_steps=None, quick=True, method="tbptt", seed=0, config=None, set=["sigma=0.02"]
    )
    cfg = bench.meta_config(args, "spatial_magnitude", ("quadratic",), 60, {"quadratic": 0.05})
    assert (cfg.network, cfg.learn_direction, cfg.sigma) == ("spatial", False, 0.02)
    args.config = str(ROOT / "examples" / "configs" / "lopt" / "meta_train.yaml")
    args.set = ["valid_metric=mean_loss", "num_valid_tasks=8"]
    cfg = bench.meta_config(args, "temporal_magnitude", ("quadratic",), 60, None)
    assert cfg.valid_metric == "mean_loss" and cfg.num_valid_tasks == 8
    assert cfg.objective == "log" and not cfg.learn_direction
