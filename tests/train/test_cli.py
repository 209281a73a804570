"""The ``geolinrpe`` command through ``python -m geolinrpe.cli``: help, train, eval, predict."""

import csv
import json
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


def summary(stdout):
    """The final summary of ``geolinrpe train``: key -> (value, unit)."""
    start = stdout.index("\nstep ", stdout.index("test (best model")) + 1
    rows = {}
    for line in stdout[start:].splitlines():
        key, value, *unit = line.split()
        rows[key] = (float(value), " ".join(unit))
    return rows


def test_train_prints_validation_mae_in_mev_and_writes_the_run(trained):
    tmp, stdout = trained
    assert "valid: loss" in stdout and " meV" in stdout  # the per-epoch validation line
    rows = summary(stdout)
    stored = json.loads((tmp / "run" / "results.json").read_text())
    # the summary prints energies in meV, as the epoch lines do; results.json keeps eV
    for key in ("valid_mae", "best_valid_mae", "test_mae"):
        assert rows[key][1] == "meV" and stored["units"][key] == "eV"
        assert rows[key][0] == pytest.approx(stored[key] * 1000, rel=1e-5)
    test_line = stdout.split("test (best model")[1].splitlines()[0]
    assert f"mae {stored['test_mae'] * 1000:.1f} meV" in test_line
    assert rows["elapsed_s"][1] == "s" and rows["step"] == (stored["step"], "")
    assert rows["valid_loss"][1] == "" and stored["units"]["valid_loss"] == ""
    for name in ("last.pt", "best.pt", "metrics.csv", "learning_curve.png", "config.yaml"):
        assert (tmp / "run" / name).is_file()


def test_eval_reports_the_test_split(trained):
    tmp, stdout = trained
    proc = cli("eval", tmp / "run" / "best.pt", "--split", "test", "--json", tmp / "m.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("test: loss") and "meV" in proc.stdout
    summary_mae, unit = summary(stdout)["test_mae"]  # meV, from training
    assert unit == "meV"
    stored = json.loads((tmp / "m.json").read_text())
    assert stored["mae"] * 1000 == pytest.approx(summary_mae, rel=1e-4)  # eV in the file
    assert stored["units"] == {"loss": "", "mae": "eV"}


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


def test_predict_exits_1_when_every_input_failed_and_still_writes_the_csv(trained, capsys):
    tmp, _ = trained
    out = tmp / "all_failed.csv"
    code = main(
        ["predict", str(tmp / "run" / "best.pt"), "--smiles", "C1CC", "CS", "--out", str(out)]
    )
    assert code == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == ["C1CC", "CS"] and all(r["error"] for r in rows)
    captured = capsys.readouterr()
    assert "2 failed" in captured.out and "all 2 inputs failed" in captured.err
    one_ok = tmp / "one_ok.csv"
    code = main(["predict", str(tmp / "run" / "best.pt"), "--smiles", "CS", "CCO", "--out",
                 str(one_ok)])  # fmt: skip
    assert code == 0


def test_config_command_lists_every_key_with_its_default(capsys):
    import dataclasses

    import yaml

    from geolinrpe.train import Config

    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = {line.split(":")[0]: line for line in lines if not line.startswith(" ")}
    count = 0
    for section in dataclasses.fields(Config):
        instance = section.default_factory()
        for f in dataclasses.fields(instance):
            default = getattr(instance, f.name)
            word = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
            key = f"{section.name}.{f.name}"
            assert headers[key].endswith(f" = {word}"), headers[key]
            count += 1
    assert len(headers) == count
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "geolinrpe config" in capsys.readouterr().out
    assert main(["config", "model"]) == 0
    assert all(line.startswith(("model.", " ")) for line in capsys.readouterr().out.splitlines())
    assert main(["config", "modle"]) == 2
    assert "unknown config section 'modle'" in capsys.readouterr().err


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
    out = capsys.readouterr().out
    assert "meta-train" in out
    from geolinrpe.optim.cli import DESCRIPTION

    # the whole description, not its first docstring line cut mid-sentence
    description = out.split("\n\n")[1]
    assert " ".join(description.split()) == DESCRIPTION
    assert description.rstrip().endswith(".") and "evaluate" in description
    assert "``" not in out
