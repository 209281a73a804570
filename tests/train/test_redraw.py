"""``train.redraw_every``: random features redrawn every k steps, the same on every process,
bitwise reproducible across a resume, without touching the global RNG."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.rpe import REGISTRY, build, names
from geolinrpe.train import Config, load_checkpoint, run
from geolinrpe.train import trainer as trainer_module
from geolinrpe.train.distributed import DistEnv
from geolinrpe.train.trainer import _Trainer, _unwrap, redraw_generator, redraw_random_features

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)
GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()


def tiny(qm9_root, out, *overrides):
    """64 train / 16 valid / 16 test molecules (4 steps per epoch), a two-layer FLT model."""
    return Config.load(
        None,
        [
            "data.task=qm9",
            f"data.path={qm9_root}",
            "data.max_molecules=160",
            "data.targets=[gap]",
            "data.train_size=64",
            "data.valid_size=16",
            "data.test_size=16",
            "data.batch_size=16",
            "model.name=molecule",
            "model.embed_dim=16",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.num_features=16",
            "model.rpe=flt-kernel",
            "model.rpe_options={num_frequencies: 8, frequencies: mc}",
            "model.kernel=favor+",  # random kernel features (the default ELU has none)
            "optim.lr=3e-3",
            f"train.out_dir={out}",
            "train.epochs=2",
            "train.progress=false",
            "train.plot=false",
            "train.tensorboard=false",
            "train.device=cpu",
            *overrides,
        ],
    )


def buffers(model):
    return {k: v.detach().clone() for k, v in _unwrap(model).named_buffers()}


def random_buffer_names(model):
    """The buffers of the favor+ feature maps and the RPEs (their random draws)."""
    return [k for k in buffers(model) if k.endswith(("projection", "base_frequencies"))]


def global_rng():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def assert_same_rng(before, after):
    assert torch.equal(before[0], after[0])
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1])
    assert before[1][2:] == after[1][2:]
    assert before[2] == after[2]


@pytest.fixture
def spy_steps(monkeypatch):
    """Records ``(step, buffers)`` at the entry of every training step (after any redraw,
    before the forward)."""
    seen = []
    original = trainer_module._Trainer._train_step

    def spy(self, batch, lr):
        seen.append((self.step, buffers(self.model)))
        return original(self, batch, lr)

    monkeypatch.setattr(trainer_module._Trainer, "_train_step", spy)
    return seen


# ------------------------------------------------------------------------------ (1)
def test_features_change_every_k_steps_and_not_in_between(qm9_root, tmp_path, spy_steps):
    run(tiny(qm9_root, tmp_path, "train.redraw_every=2", "train.max_steps=6"))
    assert [s for s, _ in spy_steps] == [0, 1, 2, 3, 4, 5]
    loaded = load_checkpoint(tmp_path / "last.pt", device="cpu")
    names_ = random_buffer_names(loaded.model)
    assert len(names_) == 4  # two layers: a feature map and an RPE each
    for (_, before), (s1, after) in zip(spy_steps[:-1], spy_steps[1:], strict=True):
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == (set(names_) if s1 in (2, 4) else set()), s1
    # step 0 runs on the features drawn at construction
    fresh = _Trainer(tiny(qm9_root, tmp_path / "fresh"), DistEnv())
    for name, value in buffers(fresh.model).items():
        assert torch.equal(value, spy_steps[0][1][name]), name
    # the draw before step 4 is the one of redraw_generator(seed, 4)
    redraw_random_features(loaded.model, redraw_generator(0, 4))
    for name in names_:
        assert torch.equal(buffers(loaded.model)[name], spy_steps[4][1][name]), name


def test_without_redraw_every_the_features_never_change(qm9_root, tmp_path, spy_steps):
    run(tiny(qm9_root, tmp_path, "train.max_steps=5"))
    first = spy_steps[0][1]
    for _, seen in spy_steps[1:]:
        for name, value in seen.items():
            assert torch.equal(value, first[name]), name


# ------------------------------------------------------------------------------ (2)
def test_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(qm9_root, tmp_path):
    # 8 steps, redraws before steps 3 and 6; the interrupted run stops after 6 steps
    # (mid-epoch, with last.pt saved before the redraw of step 6, the resumed run's first act)
    common = ["train.redraw_every=3", "train.eval_every=3", "train.log_every=1"]
    straight = run(tiny(qm9_root, tmp_path / "straight", *common))
    part = run(tiny(qm9_root, tmp_path / "resumed", *common, "train.stop_after_steps=6"))
    assert part["completed"] == 0.0 and part["step"] == 6.0
    resumed = run(tiny(qm9_root, tmp_path / "resumed", *common, "train.resume=auto"))

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():  # parameters and buffers
        assert torch.equal(value, b["model"][name]), name
    for s1, s2 in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"])
        assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for key in ("valid_mae", "test_mae", "best_valid_mae"):
        assert resumed[key] == straight[key], key
    # the features are the draw before step 6, not the initial ones
    loaded = load_checkpoint(tmp_path / "straight" / "last.pt", device="cpu")
    names_ = random_buffer_names(loaded.model)
    redraw_random_features(loaded.model, redraw_generator(0, 6))
    for name in names_:
        assert torch.equal(buffers(loaded.model)[name], a["model"][name]), name
    no_redraw = tiny(qm9_root, tmp_path / "plain", "train.max_steps=1")
    run(no_redraw)
    first = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    for name in names_:
        assert not torch.equal(first[name], a["model"][name]), name


# ------------------------------------------------------------------------------ (3)
def test_two_trainers_draw_the_same_features_at_a_step(qm9_root, tmp_path):
    """Two independent trainers (stand-ins for two DDP ranks) with different weights and
    global RNG states redraw the same features before step 4, and none before steps 0, 1
    and 3."""
    cfg = tiny(qm9_root, tmp_path, "train.redraw_every=2")
    env = DistEnv(device=torch.device("cpu"))
    one = _Trainer(cfg, env)
    with torch.no_grad():  # different weights
        for p in one.model.parameters():
            p.add_(1.0)
    two = _Trainer(cfg.replace([f"train.out_dir={tmp_path / 'two'}"]), env)
    names_ = random_buffer_names(one.model)
    assert len(names_) == 4
    start = buffers(one.model)

    torch.manual_seed(123)
    for step in (0, 1, 3):
        one.step = step
        assert not one._redraw()
    assert buffers(one.model).keys() == start.keys()
    for name, value in buffers(one.model).items():
        assert torch.equal(value, start[name]), name
    one.step = two.step = 4
    assert one._redraw()
    torch.manual_seed(456)
    np.random.seed(7)
    assert two._redraw()
    a, b = buffers(one.model), buffers(two.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in names_:
        assert not torch.equal(a[name], start[name]), name
    # another step, another draw; another seed, another draw
    two.step = 6
    two._redraw()
    other = Config.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": 1}})
    three = _Trainer(other.replace([f"train.out_dir={tmp_path / 'three'}"]), env)
    three.step = 4
    three._redraw()
    for name in names_:
        assert not torch.equal(buffers(two.model)[name], a[name]), name
        assert not torch.equal(buffers(three.model)[name], a[name]), name


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on the PATH")
@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_two_processes_with_redraws_match_one_process(qm9_root, tmp_path):
    """A torchrun job of two processes that redraws every step ends with the weights and
    features of one process with the same global batches."""
    common = ["train.redraw_every=1", "train.epochs=1", "train.log_every=1"]
    run(tiny(qm9_root, tmp_path / "one", *common))
    config = tmp_path / "ddp.yaml"
    config.write_text(tiny(qm9_root, tmp_path / "two", *common).to_yaml())
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "geolinrpe.cli", "train"]
        + [str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert b["world_size"] == 2 and a["step"] == b["step"] == 4
    for name, value in a["model"].items():
        if name.endswith(("projection", "base_frequencies")):
            assert torch.equal(value, b["model"][name]), name  # drawn, not computed
        else:
            assert torch.allclose(value, b["model"][name], atol=1e-5, rtol=1e-4), name


# ------------------------------------------------------------------------------ (4)
@pytest.mark.parametrize("value", ["0", "-2", "2.5", "two", "true", "[2]"])
def test_redraw_every_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="'train.redraw_every'"):
        Config.load(None, [f"train.redraw_every={value}"])


def test_redraw_every_accepts_positive_ints_and_null():
    assert Config().train.redraw_every is None
    assert Config.load(None, ["train.redraw_every=3"]).train.redraw_every == 3
    assert Config.load(None, ["train.redraw_every=null"]).train.redraw_every is None
    from geolinrpe.train.config import format_config_keys

    assert "train.redraw_every: int | null = null" in format_config_keys(["train"])


# ------------------------------------------------------------------------------ (5)
def test_a_trainer_redraw_leaves_the_global_rng_alone(qm9_root, tmp_path):
    trainer = _Trainer(tiny(qm9_root, tmp_path, "train.redraw_every=1"), DistEnv())
    trainer.step = 5
    before = global_rng()
    assert trainer._redraw()
    assert_same_rng(before, global_rng())


POS_DIM = {"flt-local": 1, "flt-radial": 3, "flt-periodic": 3, "spe-sine": 1, "spe-conv": 1}
OPTIONS = {"spe-conv": dict(grid_size=16), "toeplitz-fft": dict(max_offset=8)}


@pytest.mark.parametrize("name", names())
def test_every_rpe_redraws_from_the_generator_alone(name):
    """For every registered RPE (with favor+ where it has logit mode): a redraw leaves the
    global RNG alone, and the same generator seed gives the same draws (all randomness
    comes from the generator)."""
    pos_dim = POS_DIM.get(name, 1 if name == "lrpe-permutation" else 2)
    options = dict(OPTIONS.get(name, {}))
    if "dim" in __import__("inspect").signature(REGISTRY[name]).parameters:
        options["dim"] = 8
    probe = build(name, pos_dim=pos_dim, num_heads=2, **options)
    mode = "logit" if "logit" in probe.modes else probe.modes[0]
    attn = RPEAttention(
        16,
        2,
        rpe=name,
        pos_dim=pos_dim,
        mode=mode,
        kernel="favor+" if mode == "logit" else "elu",
        num_features=8,
        rpe_options=OPTIONS.get(name),
    )
    before = global_rng()
    assert sorted(redraw_random_features(attn, redraw_generator(0, 2))) == [
        "feature_map",
        "rpe",
    ]
    assert_same_rng(before, global_rng())
    first = buffers(attn)
    redraw_random_features(attn, redraw_generator(0, 4))
    second = buffers(attn)
    redraw_random_features(attn, redraw_generator(0, 2))
    again = buffers(attn)
    assert_same_rng(before, global_rng())
    for key, value in first.items():
        assert torch.equal(value, again[key]), key
    if mode == "logit":
        assert not torch.equal(first["feature_map.projection"], second["feature_map.projection"])
