"""Security and robustness of training files: nothing read runs code, checkpoints are verified,
settings that weaken safety never come from a file, non-finite training stops before the
update, and bad options fail with the key named."""

import io
import math
import re
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from geolinrpe.cli import main
from geolinrpe.train import Config, load_checkpoint, run
from geolinrpe.train.checkpoint import (
    CheckpointError,
    UnverifiedCheckpointWarning,
    read_checkpoint,
    save_checkpoint,
)
from geolinrpe.train.config import UnsafeSettingWarning
from geolinrpe.train.trainer import NonFiniteError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


class Hostile:
    """Unpickles (unsafely) into ``exec(code)``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


def tiny(qm9_root, out, *overrides):
    """48 train / 16 valid / 16 test molecules, a one-layer FLT model."""
    return Config.load(
        None,
        [
            "data.task=qm9",
            f"data.path={qm9_root}",
            "data.max_molecules=160",
            "data.train_size=48",
            "data.valid_size=16",
            "data.test_size=16",
            "data.batch_size=16",
            "model.name=molecule",
            "model.embed_dim=16",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.num_features=8",
            "model.rpe_options={num_frequencies: 4}",
            "optim.lr=3e-3",
            f"train.out_dir={out}",
            "train.epochs=1",
            "train.progress=false",
            "train.plot=false",
            "train.tensorboard=false",
            "train.device=cpu",
            *overrides,
        ],
    )


SCHNET = [
    "model.name=schnet",
    "model.rpe=flt-kernel",
    "model.embed_dim=128",
    "model.num_layers=4",
    "model.num_heads=8",
    "model.num_features=64",
    "model.rpe_options={}",
    "model.options={hidden_channels: 16, num_filters: 16, num_interactions: 1, num_gaussians: 8}",
]


@pytest.fixture(scope="module")
def trained(qm9_root, tmp_path_factory):
    """A finished tiny run (3 steps): its last.pt is the checkpoint the tests damage."""
    out = tmp_path_factory.mktemp("run")
    run(tiny(qm9_root, out))
    return out


def _finite_checkpoint(path):
    ckpt = torch.load(path, weights_only=True)
    for name, value in ckpt["model"].items():
        assert torch.isfinite(value).all(), name
    return ckpt


# ------------------------------------------------------------------ code execution (1)
def test_load_checkpoint_and_eval_never_run_pickled_code(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    torch.save({"config": {}, "model": {}, "task_state": Hostile(marker)}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as err:
        load_checkpoint(path, device="cpu")
    assert "not loaded" in str(err.value)
    assert main(["eval", str(path), "--device", "cpu"]) == 2
    assert str(path) in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not loaded"):
        run(tiny(tmp_path, tmp_path / "run", f"train.resume={path}"))
    assert not marker.exists()


def test_lopt_evaluate_never_runs_pickled_code(tmp_path, capsys):
    from geolinrpe.optim.meta import load_checkpoint as load_lopt

    marker = tmp_path / "MARKER"
    path = tmp_path / "lopt.pt"
    torch.save({"net": Hostile(marker), "net_config": {}, "config": {}}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_lopt(path)
    code = main(["lopt", "evaluate", str(path), "--out", str(tmp_path / "eval")])
    assert code == 2 and str(path) in capsys.readouterr().err
    assert not marker.exists()


def test_lopt_checkpoint_round_trips_weights_only(tmp_path):
    from geolinrpe.optim.meta import MetaConfig, build_network, load_checkpoint, save_checkpoint

    cfg = MetaConfig(families=("quadratic",), rpe=None, meta_steps=1)
    net = build_network(cfg)
    opt = torch.optim.Adam(net.parameters())
    save_checkpoint(tmp_path / "c.pt", net, opt, cfg, {"valid": [(1, 0.5)], "seconds": 1.0})
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # plain data only
    assert raw["config"]["families"] == ["quadratic"] and raw["history"]["valid"] == [[1, 0.5]]
    net2, cfg2, _ = load_checkpoint(tmp_path / "c.pt")
    assert cfg2 == cfg
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    data = bytearray((tmp_path / "c.pt").read_bytes())
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "t.pt")


# -------------------------------------------------------------- safety settings (1c)
def test_checkpoint_never_weakens_safety_but_the_user_may(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    ckpt["config"]["data"]["options"] = {"safe": False}
    path = tmp_path / "unsafe.pt"
    save_checkpoint(ckpt, path)  # a valid hash: only the stored setting is hostile
    with pytest.warns(UnsafeSettingWarning, match=r"data\.options\.safe") as record:
        loaded = load_checkpoint(path, device="cpu")
    message = str(record[0].message)
    assert str(path) in message and "data.options.safe=false" in message  # how to opt in
    assert loaded.cfg.data.options["safe"] is True
    assert loaded.task.cfg.data.options["safe"] is True
    # the user opts in on the command line: it applies, with a warning naming the setting
    with pytest.warns(UnsafeSettingWarning, match=r"'data\.options\.safe' is false"):
        assert main(["eval", str(path), "data.options.safe=false", "--device", "cpu"]) == 0
    # ... or in their own config file
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"data": {"task": "oc20-is2re", "path": "x", "options": {}}}))
    with pytest.warns(UnsafeSettingWarning, match=r"data\.options\.safe"):
        cfg = Config.load(user, ["data.options.safe=false"])
    assert cfg.data.options["safe"] is False and cfg.unsafe_settings() == {
        "data.options.safe": False
    }
    assert cfg.safe_settings().data.options["safe"] is True
    with pytest.raises(ValueError, match=r"data\.options\.safe.*bool"):
        Config.load(None, ["data.options.safe=no thanks"])


def test_oc20_dataset_of_a_checkpoint_is_read_safely(trained, tmp_path):
    oc20 = pytest.importorskip("geolinrpe.data.oc20")
    if not hasattr(oc20, "make_synthetic"):
        pytest.skip("geolinrpe.data.oc20 has no make_synthetic")
    from geolinrpe.train.tasks import build_task

    data = oc20.make_synthetic(tmp_path / "d.lmdb", 4, format="lmdb-is2re", steps=3)
    values = Config.load(
        None, ["data.task=oc20-is2re", f"data.path={data}", "model.rpe=null"]
    ).to_dict()
    values["data"]["options"] = {"safe": False}
    with pytest.warns(UnsafeSettingWarning):
        cfg = Config.from_saved(values, "checkpoint 'x.pt'")
    dataset = build_task(cfg).datasets()["train"].dataset
    assert dataset.safe is True


# --------------------------------------------------------------- verified loading (8)
def _flip_tensor_bits(path: Path, out: Path, bits: int = 4096) -> None:
    """XOR ``bits`` bits (the low mantissa bits of float32 values) in the largest tensor's
    stored bytes, leaving the zip CRCs as they were."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[off + 26 : off + 30])
    start = off + 30 + name_len + extra_len
    n = min(bits // 8, info.file_size)
    for i in range(n):
        data[start + (i // 2) * 4 + i % 2] ^= 0xFF  # two low bytes of each float32
    out.write_bytes(bytes(data))


def test_flipped_bits_truncation_and_missing_keys_are_named(trained, tmp_path, capsys):
    last = trained / "last.pt"
    assert read_checkpoint(last)["step"] == 3  # a verified checkpoint loads

    flipped = tmp_path / "flipped.pt"
    _flip_tensor_bits(last, flipped)
    with pytest.raises(CheckpointError, match="integrity") as err:
        load_checkpoint(flipped, device="cpu")
    assert str(flipped) in str(err.value) and "CRC" in str(err.value)
    assert main(["eval", str(flipped), "--device", "cpu"]) == 2
    assert "integrity" in capsys.readouterr().err

    # consistent CRCs but a changed tensor (re-saved by hand): the SHA-256 catches it
    ckpt = torch.load(last, weights_only=True)
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = ckpt["model"][key] + 1e-3
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"integrity.*SHA-256 hash"):
        load_checkpoint(tmp_path / "edited.pt", device="cpu")

    data = last.read_bytes()
    for size in (0, 100, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated or not a checkpoint") as err:
            load_checkpoint(tmp_path / "cut.pt", device="cpu")
        assert str(tmp_path / "cut.pt") in str(err.value)

    for missing in ("model", "config", "task_state"):
        ckpt = torch.load(last, weights_only=True)
        del ckpt[missing]
        save_checkpoint(ckpt, tmp_path / "nokey.pt")
        with pytest.raises(CheckpointError, match=f"key '{missing}' is missing") as err:
            load_checkpoint(tmp_path / "nokey.pt", device="cpu")
        assert str(tmp_path / "nokey.pt") in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_resume_verifies_the_checkpoint_and_names_missing_keys(qm9_root, trained, tmp_path):
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    del ckpt["loss_window"]
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(ckpt, out / "last.pt")
    with pytest.raises(CheckpointError, match=r"key 'loss_window' is missing") as err:
        run(tiny(qm9_root, out, "train.resume=auto", "train.epochs=2"))
    assert str(out / "last.pt") in str(err.value)
    _flip_tensor_bits(trained / "last.pt", out / "last.pt")
    with pytest.raises(CheckpointError, match="integrity"):
        run(tiny(qm9_root, out, "train.resume=auto", "train.epochs=2"))
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    ckpt["best"] = {}
    save_checkpoint(ckpt, out / "last.pt")
    with pytest.raises(CheckpointError, match=r"cannot be resumed from: key 'metric'"):
        run(tiny(qm9_root, out, "train.resume=auto", "train.epochs=2"))


def test_checkpoints_of_older_versions_load_unverified(trained, tmp_path):
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    del ckpt["integrity"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.warns(UnverifiedCheckpointWarning, match="no integrity hash"):
        loaded = load_checkpoint(tmp_path / "old.pt", device="cpu")
    assert loaded.checkpoint["step"] == 3


def test_save_refuses_what_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['x'\]: a \w*Path is not plain data"):
        save_checkpoint({"x": Path("a")}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
    save_checkpoint({"x": [torch.ones(2, dtype=torch.bfloat16), (1, 2.5, None)]}, tmp_path / "c.pt")
    ckpt = read_checkpoint(tmp_path / "c.pt", ("x",))
    assert ckpt["x"][1] == (1, 2.5, None) and "integrity" not in ckpt
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    (tmp_path / "list.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        read_checkpoint(tmp_path / "list.pt")


# --------------------------------------------------------------- non-finite training (5)
def _diverge(qm9_root, out, *overrides):
    with pytest.raises(NonFiniteError) as err:
        run(tiny(qm9_root, out, *overrides))
    return str(err.value)


@pytest.mark.parametrize("model", ["molecule", "schnet"])
def test_nan_loss_stops_before_the_update(qm9_root, tmp_path, monkeypatch, model):
    """A NaN loss at step 5 (injected): error names step 5 and the rate; last.pt (step 4,
    written at the evaluation of step 4) stays finite and the model was not updated."""
    from geolinrpe.train import tasks

    calls = []
    original = tasks.QM9Task.loss

    def loss(self, out, batch):
        value = original(self, out, batch)
        calls.append(1)
        return value * math.nan if len(calls) == 5 else value

    monkeypatch.setattr(tasks.QM9Task, "loss", loss)
    extra = SCHNET if model == "schnet" else []
    out = tmp_path / "run"
    message = _diverge(
        qm9_root,
        out,
        *extra,
        "train.epochs=3",
        "train.eval_every=2",
        "optim.schedule=constant",
        "optim.lr=0.002",
    )
    assert "step 5" in message and "learning rate 0.002" in message
    assert "training loss is not finite" in message
    assert "optim.lr" in message and "optim.grad_clip" in message and "check the data" in message
    ckpt = _finite_checkpoint(out / "last.pt")
    assert ckpt["step"] == 4
    assert read_checkpoint(out / "best.pt")["step"] in (2, 4)


@pytest.mark.parametrize("model", ["molecule", "schnet"])
def test_huge_learning_rate_stops_with_finite_checkpoints_and_cli_status(
    qm9_root, tmp_path, capsys, model
):
    extra = SCHNET if model == "schnet" else []
    overrides = [
        *extra,
        "train.epochs=20",
        "train.max_steps=40",
        "train.eval_every=1",
        "optim.schedule=constant",
        "optim.lr=1e4",
        "optim.grad_clip=null",
    ]
    out = tmp_path / "run"
    cfg = tiny(qm9_root, out, *overrides)
    config = tmp_path / "cfg.yaml"
    config.write_text(cfg.to_yaml())
    assert main(["train", str(config)]) == 3
    message = capsys.readouterr().err
    assert "not finite" in message and "learning rate 1e+04" in message
    bad_step = int(re.search(r"at step (\d+)", message).group(1))
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            assert _finite_checkpoint(out / name)["step"] < bad_step
    assert "enable gradient clipping (optim.grad_clip)" in message


def test_non_finite_validation_metric_stops_and_is_never_best(qm9_root, tmp_path, monkeypatch):
    from geolinrpe.train import tasks

    evals = []
    original = tasks.QM9Task.compute_metrics

    def compute(self, sums):
        metrics = original(self, sums)
        evals.append(1)
        return {**metrics, "mae": math.inf} if len(evals) == 2 else metrics

    monkeypatch.setattr(tasks.QM9Task, "compute_metrics", compute)
    out = tmp_path / "run"
    message = _diverge(qm9_root, out, "train.epochs=3", "train.eval_every=1")
    assert "step 2" in message and "validation metrics are not finite (mae=inf)" in message
    assert "learning rate" in message
    for name in ("last.pt", "best.pt"):
        ckpt = _finite_checkpoint(out / name)
        assert ckpt["step"] == 1 and math.isfinite(ckpt["best"]["metric"])


# ------------------------------------------------------------------- bad options (9)
@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("optim.grad_clip=.inf", "optim.grad_clip"),
        ("optim.min_lr=.inf", "optim.min_lr"),
        ("train.force_weight=.nan", "train.force_weight"),
        ("train.time_limit_min=.inf", "train.time_limit_min"),
        ("optim.betas=[0.9, .nan]", "optim.betas"),
    ],
)
def test_non_finite_floats_are_refused(override, key):
    with pytest.raises(ValueError, match=re.escape(f"'{key}' must be")):
        Config.load(None, [override])


@pytest.mark.parametrize(
    "override, key, bound",
    [
        ("model.num_features=1e8", "model.num_features", "65,536"),
        ("model.embed_dim=131072", "model.embed_dim", "65,536"),
        ("model.num_layers=5000", "model.num_layers", "1,024"),
        ("model.num_heads=2048", "model.num_heads", "1,024"),
        ("model.rpe_options={num_frequencies: 1000000}", "model.rpe_options.num_frequencies", ""),
    ],
)
def test_size_options_have_upper_bounds(override, key, bound):
    with pytest.raises(ValueError, match=re.escape(f"{key}' must be at most {bound}")):
        Config.load(None, [override])


def test_schnet_size_options_are_bounded():
    with pytest.raises(ValueError, match=r"'model\.options\.hidden_channels' must be at most"):
        Config.load(None, [*SCHNET[:7], "model.options={hidden_channels: 100000000}"])


def test_every_shipped_config_still_validates():
    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert paths
    for path in paths:
        Config.load(path)


@pytest.mark.parametrize("where", ["proc", "file"])
def test_unwritable_out_dir_is_named(tmp_path, where):
    if where == "proc":
        if not Path("/proc/self").exists():
            pytest.skip("no /proc")
        out = "/proc/x"
    else:
        (tmp_path / "afile").write_text("")
        out = str(tmp_path / "afile" / "run")
    cfg = Config.load(
        None,
        [
            "data.task=point-cloud",
            "model.name=point-cloud",
            f"train.out_dir={out}",
            "train.device=cpu",
        ],
    )
    with pytest.raises(ValueError, match=re.escape("'train.out_dir': cannot create or write")):
        run(cfg)
    with pytest.raises(ValueError, match=re.escape(out)):
        run(cfg)


_DDP_SCRIPT = """
import math, os, sys
from geolinrpe.train import Config, run, tasks
from geolinrpe.train.trainer import NonFiniteError

original, calls = tasks.QM9Task.loss, []

def loss(self, out, batch):
    value = original(self, out, batch)
    calls.append(1)
    return value * math.nan if len(calls) == 3 and os.environ["RANK"] == "1" else value

tasks.QM9Task.loss = loss
try:
    run(Config.load(sys.argv[1]))
except NonFiniteError as err:
    with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".txt"), "w") as f:
        f.write(str(err))
    sys.exit(3)
"""


def test_a_nan_on_one_process_stops_every_process(qm9_root, tmp_path):
    """A NaN loss on process 1 only: both processes stop at the same step (no hang)."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None or not torch.distributed.is_gloo_available():
        pytest.skip("needs torchrun and gloo")
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    config = tmp_path / "ddp.yaml"
    config.write_text(tiny(qm9_root, tmp_path / "run", "train.eval_every=2").to_yaml())
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(config), tmp_path],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode != 0
    for rank in (0, 1):  # each process stopped at the same step, before the update
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("training stopped at step 3"), proc.stderr[-2000:]
    assert _finite_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2


def test_checkpoint_never_chooses_where_synthetic_data_is_written(tmp_path):
    """A stored data.options.make_synthetic with a data.path that does not exist would make
    `geolinrpe eval` write files where the checkpoint says: the setting is dropped instead."""
    target = tmp_path / "chosen" / "by_the_file.lmdb"
    values = Config.load(
        None, ["data.task=oc20-is2re", f"data.path={target}", "data.options={make_synthetic: 4}"]
    ).to_dict()
    with pytest.warns(UnsafeSettingWarning, match=r"data\.options\.make_synthetic=4 ignored"):
        cfg = Config.from_saved(values, "checkpoint 'x.pt'")
    assert "make_synthetic" not in cfg.data.options
    with pytest.raises(ValueError, match="does not exist"):
        cfg.validate()
    assert not target.parent.exists()
    # the user's own config may ask for it, without a safety warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsafeSettingWarning)
        mine = Config.load(None, [f"data.path={target}", "data.options={make_synthetic: 4}"])
    assert mine.data.options["make_synthetic"] == 4
