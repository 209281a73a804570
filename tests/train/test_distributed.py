"""Two-process DistributedDataParallel on CPU (gloo) through torchrun equals one process."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geolinrpe.data.oc20 import OC20, make_synthetic
from geolinrpe.data.qm9 import QM9
from geolinrpe.train import Config, run

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)


def _overrides(root, out, task="qm9"):
    if task == "qm9":
        data = [
            "data.task=qm9",
            f"data.path={root}",
            "data.max_molecules=160",
            "data.train_size=64",
            "data.valid_size=10",  # not divisible by 2: each process evaluates its own share
            "data.test_size=16",
            "data.batch_size=16",  # global: 8 per process
        ]
    else:  # forces: a per-atom loss over graphs of different sizes
        data = [
            "data.task=oc20-s2ef",
            f"data.path={root}",
            "data.valid_size=3",
            "data.test_size=3",
            "data.batch_size=4",  # 16 - 6 = 10 training frames: 3 steps, the last one short
            "model.options={periodic: true}",
        ]
    return [
        *data,
        "model.name=molecule",
        "model.embed_dim=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.num_features=16",
        "model.rpe=flt-kernel",
        "model.rpe_options={num_frequencies: 8}",
        "optim.lr=3e-3",
        "train.epochs=2",
        "train.log_every=1",
        "train.progress=false",
        "train.plot=false",
        "train.device=cpu",
        f"train.out_dir={out}",
    ]


def _losses(out):
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return (
        [float(r["train_loss"]) for r in rows if r["train_loss"]],
        [float(r["valid_loss"]) for r in rows if r["valid_loss"]],
    )


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on the PATH")
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)
@pytest.mark.parametrize("task", ["qm9", "oc20-s2ef"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, task):
    """QM9: a per-molecule loss. S2EF: energies and forces by autograd (double backward
    through DDP), with a force loss averaged over the atoms of the global batch although the
    two processes hold different numbers of atoms."""
    if task == "qm9":
        root = tmp_path / "qm9"
        QM9(str(root), max_molecules=160, log=False)  # built once, before the processes start
    else:
        root = make_synthetic(tmp_path / "s2ef", 8, format="lmdb-s2ef", steps=5, frames=2)
        sizes = {len(item.pos) for item in OC20(str(root), task="s2ef")}
        assert len(sizes) > 1  # graphs of different sizes
    single = run(Config.load(None, _overrides(root, tmp_path / "one", task)))

    config = tmp_path / "ddp.yaml"
    config.write_text(Config.load(None, _overrides(root, tmp_path / "two", task)).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "geolinrpe.cli", "train"]
        + [str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test_loss") == 1  # process 0 alone reports

    train_one, valid_one = _losses(tmp_path / "one")
    train_two, valid_two = _losses(tmp_path / "two")
    steps = 8 if task == "qm9" else 6  # 4 (3) steps per epoch, logged every step
    assert len(train_one) == len(train_two) == steps
    assert train_two == pytest.approx(train_one, rel=1e-4)
    assert valid_two == pytest.approx(valid_one, rel=1e-4)
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert b["world_size"] == 2
    for name, value in a.items():
        assert torch.allclose(value, b["model"][name], atol=1e-5, rtol=1e-4), name
    metric = "test_mae" if task == "qm9" else "test_forces_mae"
    value, unit = proc.stdout.split(metric)[1].split()[:2]  # printed as the epoch lines are
    scale, expected_unit = (1000, "meV") if task == "qm9" else (1, "eV/A")
    assert unit == expected_unit
    assert float(value) == pytest.approx(single[metric] * scale, rel=1e-4)
