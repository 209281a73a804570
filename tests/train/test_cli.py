"""The ``geolinrpe`` command through ``python -m geolinrpe.cli``: help, train, eval, predict."""

import csv
import os
import subprocess
import sys

import pytest

from geolinrpe.cli import main
from geolinrpe.data.qm9 import QM9


def cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "geolinrpe.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=240,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder trained by ``geolinrpe train`` on 32 molecules (2 epochs)."""
    tmp = tmp_path_factory.mktemp("cli")
    QM9(str(tmp / "qm9"), max_molecules=80, log=False)
    config = tmp / "tiny.yaml"
    config.write_text(
        f"""
data: {{task: qm9, path: {tmp / "qm9"}, max_molecules: 80, targets: [gap],
        train_size: 32, valid_size: 8, test_size: 8, batch_size: 16}}
model: {{name: molecule, embed_dim: 16, num_layers: 1, num_heads: 2, num_features: 8,
         rpe: flt-kernel, rpe_options: {{num_frequencies: 4}}}}
train: {{out_dir: {tmp / "run"}, epochs: 2, device: cpu}}
"""
    )
    proc = cli("train", config, "optim.lr=2e-3", "train.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc.stdout


def test_help():
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("train", "eval", "predict", "plot"):
        assert command in proc.stdout
    for command in ("train", "eval", "predict", "plot"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_train_prints_validation_mae_in_mev_and_writes_the_run(trained):
    tmp, stdout = trained
    assert "valid: loss" in stdout and " meV" in stdout  # the per-epoch validation line
    assert "test_mae" in stdout  # the final summary
    for name in ("last.pt", "best.pt", "metrics.csv", "learning_curve.png", "config.yaml"):
        assert (tmp / "run" / name).is_file()


def test_eval_reports_the_test_split(trained):
    tmp, stdout = trained
    proc = cli("eval", tmp / "run" / "best.pt", "--split", "test", "--json", tmp / "m.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("test: loss") and "meV" in proc.stdout
    summary_mae = float(stdout.split("test_mae")[1].split()[0])  # eV, from training
    import json

    assert json.loads((tmp / "m.json").read_text())["mae"] == pytest.approx(summary_mae, rel=1e-4)


def test_predict_smiles_writes_one_row_per_input_with_errors(trained):
    tmp, _ = trained
    out = tmp / "preds.csv"
    proc = cli(
        "predict", tmp / "run" / "best.pt", "--smiles", "CCO", "C1CC", "CS", "c1ccccc1",
        "--out", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == ["CCO", "C1CC", "CS", "c1ccccc1"]
    assert list(rows[0]) == ["input", "name", "gap_pred_eV", "gap_true_eV", "error"]
    ok = [r for r in rows if not r["error"]]
    assert [r["input"] for r in ok] == ["CCO", "c1ccccc1"]
    assert all(float(r["gap_pred_eV"]) == float(r["gap_pred_eV"]) for r in ok)  # not NaN
    assert "invalid SMILES" in rows[1]["error"] and rows[1]["gap_pred_eV"] == ""
    assert "outside QM9" in rows[2]["error"]
    assert "2 failed" in proc.stdout


def test_predict_split_structures_and_plot_in_process(trained, capsys):
    tmp, _ = trained
    out = tmp / "split.csv"
    assert (
        main(["predict", str(tmp / "run" / "best.pt"), "--split", "test", "--out", str(out)]) == 0
    )
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["gap_true_eV"] and not r["error"] for r in rows)

    import ase.io
    from ase.build import molecule

    xyz = tmp / "mols.xyz"
    ase.io.write(xyz, [molecule("H2O"), molecule("CH4")])
    (tmp / "broken.xyz").write_text("3\nnot a molecule\nXx 0 0 0\n")
    out = tmp / "structures.csv"
    code = main(
        ["predict", str(tmp / "run" / "best.pt"), "--structures", str(xyz),
         str(tmp / "broken.xyz"), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert [bool(r["error"]) for r in rows] == [False, False, True]
    assert "broken.xyz" in rows[2]["input"]

    (tmp / "run" / "learning_curve.png").unlink()
    assert main(["plot", str(tmp / "run")]) == 0
    assert (tmp / "run" / "learning_curve.png").is_file()
    assert list((tmp / "run" / "rpe").glob("*.png"))


def test_errors_exit_with_status_2_and_name_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("optim: {lr: 1e-3}\n")
    assert main(["train", str(config), "optim.learning_rate=1"]) == 2
    assert "unknown config key 'optim.learning_rate'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lopt_subcommand_is_wired(capsys):
    from geolinrpe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["lopt", "--help"])
    assert exit_info.value.code == 0
    assert "meta-train" in capsys.readouterr().out
