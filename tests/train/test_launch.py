"""Launching beyond torchrun: SLURM's environment, per-node cache building, the resume
agreement check, and atom-balanced sharding of each step's global batch."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geolinrpe.train import Config, run
from geolinrpe.train.distributed import (
    DistEnv,
    builds_data_first,
    check_resume_agreement,
    expand_hostlist,
    slurm_environment,
)
from geolinrpe.train.sampling import (
    AtomBalancedBatchSampler,
    EpochSampler,
    item_sizes,
    split_by_atoms,
)

GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()


# ---------------------------------------------------------------------------- host lists
@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),  # the padding of the start is kept
        ("a[1-2]b[3,5]", ["a1b3", "a1b5", "a2b3", "a2b5"]),
        ("x1,y[2],z", ["x1", "y2", "z"]),
        ("rack-1[001-002].cluster", ["rack-1001.cluster", "rack-1002.cluster"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[01-03", "node]", "n[a-b]", "n[5-3]", "a,,b", "n[]"])
def test_expand_hostlist_rejects_malformed_lists_naming_them(spec):
    with pytest.raises(ValueError, match="SLURM node list") as err:
        expand_hostlist(spec)
    assert repr(spec) in str(err.value)


# -------------------------------------------------------------------------- environment
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[007-010]",
    "SLURM_JOB_ID": "123456",
}


def test_slurm_environment_maps_rank_world_local_rank_master():
    env = slurm_environment(SLURM)
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_slurm_environment_precedence_and_overrides():
    # torchrun's variables win: nothing is derived
    assert slurm_environment({**SLURM, "RANK": "0", "WORLD_SIZE": "2"}) == {}
    assert slurm_environment({**SLURM, "LOCAL_RANK": "0"}) == {}
    # not under SLURM: nothing
    assert slurm_environment({"SLURM_JOB_ID": "1"}) == {}
    # MASTER_PORT / MASTER_ADDR given by the user are kept
    env = slurm_environment({**SLURM, "MASTER_PORT": "29999", "MASTER_ADDR": "head"})
    assert (env["MASTER_PORT"], env["MASTER_ADDR"]) == ("29999", "head")
    # SLURM_NODELIST when SLURM_JOB_NODELIST is absent; a step's own list and size first
    rest = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert slurm_environment({**rest, "SLURM_NODELIST": "c[3-4]"})["MASTER_ADDR"] == "c3"
    step = {**SLURM, "SLURM_STEP_NODELIST": "gpu[009-010]", "SLURM_STEP_NUM_TASKS": "6"}
    assert slurm_environment(step)["MASTER_ADDR"] == "gpu009"
    assert slurm_environment(step)["WORLD_SIZE"] == "6"
    # tasks on this node, for the threads per process
    per_node = {**SLURM, "SLURM_TASKS_PER_NODE": "3(x2),2", "SLURM_NODEID": "2"}
    assert slurm_environment(per_node)["LOCAL_WORLD_SIZE"] == "2"
    assert slurm_environment({**SLURM, "SLURM_NTASKS_PER_NODE": "4"})["LOCAL_WORLD_SIZE"] == "4"


def test_one_slurm_task_is_one_process():
    env = slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"})
    assert env == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # no rendezvous


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS"),
        ({"SLURM_PROCID": "8"}, "SLURM_PROCID"),
        ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID"),
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
    ],
)
def test_slurm_environment_errors_name_the_variable(change, key):
    environ = {k: v for k, v in {**SLURM, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=key):
        slurm_environment(environ)


# ------------------------------------------------------------------ caches, resume check
def test_local_rank_zero_of_every_node_builds_the_data_first():
    # 2 nodes x 3 processes: global ranks 0..5, local ranks 0..2 on each node
    envs = [DistEnv(rank=r, world_size=6, local_rank=r % 3) for r in range(6)]
    assert [r.rank for r in envs if builds_data_first(r)] == [0, 3]
    assert builds_data_first(DistEnv())  # one process


def test_check_resume_agreement():
    check_resume_agreement([40, 40, 40], ["ab" * 8] * 3)
    check_resume_agreement([0, 0], ["", ""])  # all fresh
    with pytest.raises(ValueError, match=r"rank 0: step 40.*rank 1: step 30") as err:
        check_resume_agreement([40, 30], ["ab" * 8, "cd" * 8])
    assert "train.resume" in str(err.value)
    with pytest.raises(ValueError, match=r"rank 1: step 0 \(no checkpoint\)"):
        check_resume_agreement([40, 0], ["ab" * 8, ""])  # a node without last.pt
    with pytest.raises(ValueError, match="different checkpoints at the same step"):
        check_resume_agreement([40, 40], ["ab" * 8, "cd" * 8])


# ------------------------------------------------------------------------ atom balance
def _skewed_sizes(n, seed=0):
    """Atoms per graph: mostly small molecules, a tail of large slabs (3 to 240)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(3, 30, (n,), generator=g)
    large = torch.randint(60, 241, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.2, large, small).tolist()


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_split_by_atoms_shares_every_item_once_non_empty_and_balanced(parts):
    sizes = _skewed_sizes(64, seed=parts)
    shares = split_by_atoms(sizes, parts)
    assert len(shares) == parts and all(shares)  # every part at least one item
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    assert all(share == sorted(share) for share in shares)  # batch order kept
    totals = [sum(sizes[i] for i in share) for share in shares]
    assert max(totals) - min(totals) <= max(sizes)  # the stated bound
    assert split_by_atoms(sizes, parts) == shares  # deterministic


def test_split_by_atoms_beats_equal_graph_counts_and_keeps_parts_non_empty():
    sizes = [200, 200, 3, 3, 3, 3, 3, 3]  # halves: 406 vs 12 atoms
    shares = split_by_atoms(sizes, 2)
    assert [sum(sizes[i] for i in s) for s in shares] == [209, 209]
    assert shares == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert split_by_atoms([500, 1, 1], 3) == [[0], [1], [2]]  # one item each, however heavy
    assert split_by_atoms([0, 0, 0], 3) == [[0], [1], [2]]  # empty graphs too
    with pytest.raises(ValueError, match="2 items into 3"):
        split_by_atoms([1, 1], 3)


def test_atom_balanced_sampler_covers_each_index_once_and_equals_the_global_batches():
    sizes = _skewed_sizes(50)  # 50 items, batch 8 over 2 processes: 7 steps, last one short
    world, batch = 2, 8
    samplers = [AtomBalancedBatchSampler(sizes, batch, True, 3, r, world) for r in range(world)]
    reference = EpochSampler(len(sizes), True, 3)  # the one-process order
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        for s in samplers:
            s.set_epoch(epoch)
        mine = [s.batches() for s in samplers]
        assert len({len(m) for m in mine}) == 1 == len({len(s) for s in samplers})
        assert len(mine[0]) == -(-len(sizes) // batch)  # the steps of graphs balance
        order = reference.indices()
        for k, pieces in enumerate(zip(*mine, strict=True)):
            assert all(pieces)  # no process gets an empty batch
            joined = sorted(i for piece in pieces for i in piece)
            assert joined == sorted(order[k * batch : (k + 1) * batch])  # one process's batch
            loads = [sum(sizes[i] for i in piece) for piece in pieces]
            assert max(loads) - min(loads) <= max(sizes[i] for i in joined)
        flat = sorted(i for m in mine for b in m for i in b)
        assert flat == list(range(len(sizes)))  # every index exactly once (50 % 2 == 0)
    # deterministic, epoch-dependent
    again = AtomBalancedBatchSampler(sizes, batch, True, 3, 1, world)
    again.set_epoch(1)
    assert again.batches() == samplers[1].batches()
    again.set_epoch(0)
    assert again.batches() != samplers[1].batches()


def test_atom_balanced_sampler_balances_better_than_equal_graph_counts():
    sizes = _skewed_sizes(512, seed=1)
    world, batch = 4, 64
    balanced = [AtomBalancedBatchSampler(sizes, batch, True, 0, r, world) for r in range(world)]
    graphs = [EpochSampler(len(sizes), True, 0, r, world) for r in range(world)]
    per = batch // world
    spread_atoms, spread_graphs = [], []
    for k in range(len(sizes) // batch):
        loads = [sum(sizes[i] for i in s.batches()[k]) for s in balanced]
        spread_atoms.append(max(loads) - min(loads))
        loads = [sum(sizes[i] for i in s.indices()[k * per : (k + 1) * per]) for s in graphs]
        spread_graphs.append(max(loads) - min(loads))
    assert max(spread_atoms) <= max(sizes)
    assert sum(spread_atoms) < sum(spread_graphs) / 10


def test_atom_balanced_sampler_resumes_mid_epoch_and_pads_like_the_graph_sampler():
    sizes = _skewed_sizes(21)  # 21 items over 2 processes: padded to 22 by wrapping around
    s = AtomBalancedBatchSampler(sizes, 4, True, 0, 1, 2)
    s.set_epoch(2)
    full = s.batches()
    s.set_epoch(2, skip=3)
    assert list(s) == full[3:] and len(s) == len(full) - 3
    both = [AtomBalancedBatchSampler(sizes, 4, True, 0, r, 2) for r in range(2)]
    pad = EpochSampler(len(sizes), True, 0, 0, 2)
    for x in (*both, pad):
        x.set_epoch(2)
    joined = [sorted(i for x in both for i in x.batches()[k]) for k in range(len(full))]
    order = pad.order()
    assert len(order) == 22 and joined == [sorted(order[k : k + 4]) for k in range(0, 22, 4)]
    with pytest.raises(ValueError, match="data.batch_size"):
        AtomBalancedBatchSampler(sizes, 2, True, 0, 0, 4)


def test_item_sizes_reads_slices_without_building_items(qm9_root):
    from torch.utils.data import Subset

    from geolinrpe.data.qm9 import QM9

    dataset = QM9(str(qm9_root), max_molecules=160, log=False)
    view = dataset[torch.tensor([5, 0, 17, 99])]
    assert item_sizes(view) == [len(dataset[i].z) for i in (5, 0, 17, 99)]
    assert item_sizes(Subset(view, [3, 1])) == [len(dataset[99].z), len(dataset[0].z)]
    assert item_sizes([dataset[2], dataset[3]]) == [len(dataset[2].z), len(dataset[3].z)]


# ------------------------------------------------------------------ launching processes
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _overrides(root, out, task):
    if task == "qm9":  # molecules of 3 to 15 atoms: equal graph counts either way
        data = [
            "data.task=qm9",
            f"data.path={root}",
            "data.max_molecules=160",
            "data.train_size=32",
            "data.valid_size=6",
            "data.test_size=6",
            "data.batch_size=8",  # global: 4 steps
            "data.balance=graphs",
        ]
    else:  # 13 to 29 atoms; with seed 3 one step is shared 1 + 3 graphs (17 + 55 atoms)
        data = [
            "data.task=oc20-s2ef",
            f"data.path={root}",
            "data.valid_size=3",
            "data.test_size=3",
            "data.batch_size=4",  # 10 training frames: 3 steps, the last one short
            "data.balance=atoms",
            "model.options={periodic: true}",
            "train.seed=3",
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
        "train.epochs=1",
        "train.log_every=1",
        "train.progress=false",
        "train.plot=false",
        "train.tensorboard=false",
        "train.device=cpu",
        f"train.out_dir={out}",
    ]


def _train_losses(out):
    with open(Path(out) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["train_loss"]) for r in rows if r["train_loss"]]


def _launch_two_slurm_tasks(config, extra=((), ())):
    """Run ``geolinrpe train config`` as two plain processes with SLURM's variables (one
    node, ``localhost``, a free port); ``extra[r]``: overrides of rank ``r``. Returns the
    processes and their ``(stdout, stderr)``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    base.update(
        OMP_NUM_THREADS="1",
        MASTER_PORT=str(_free_port()),
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="4242",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "geolinrpe.cli", "train", str(config), *extra[r]],
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return procs, outputs


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
@pytest.mark.parametrize("task", ["qm9", "oc20-s2ef"])
def test_plain_processes_with_slurm_variables_train_as_one_job(qm9_root, tmp_path, task):
    """Two ``python -m geolinrpe.cli train`` processes (no torchrun) with SLURM's variables
    join one process group: the same losses and weights as one process with the same
    global batches. QM9 with ``data.balance: graphs``; S2EF with ``atoms``, where the two
    processes hold different numbers of graphs in a step, so the per-graph energy loss must
    be averaged over the global batch."""
    if task == "qm9":
        root = qm9_root
    else:
        from geolinrpe.data.oc20 import make_synthetic
        from geolinrpe.train.tasks import build_task

        root = make_synthetic(tmp_path / "s2ef", 8, format="lmdb-s2ef", steps=5, frames=2)
        cfg = Config.load(None, _overrides(root, tmp_path / "x", task))
        sizes = item_sizes(build_task(cfg).datasets()["train"])
        counts = []
        for rank in range(2):
            sampler = AtomBalancedBatchSampler(sizes, 4, True, 3, rank, 2)
            counts.append([len(b) for b in sampler.batches()])
        assert counts[0] != counts[1]  # unequal graph counts in some step
    single = tmp_path / "one"
    run(Config.load(None, _overrides(root, single, task)))

    config = tmp_path / "slurm.yaml"
    config.write_text(Config.load(None, _overrides(root, tmp_path / "two", task)).to_yaml())
    procs, outputs = _launch_two_slurm_tasks(config)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert outputs[0][0].count("test_loss") == 1 and "test_loss" not in outputs[1][0]

    one, two = _train_losses(single), _train_losses(tmp_path / "two")
    assert len(one) == len(two) == (4 if task == "qm9" else 3)  # logged every step
    assert two == pytest.approx(one, rel=1e-4)
    a = torch.load(single / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert b["world_size"] == 2 and a["world_size"] == 1
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize(
    ("name", "state", "kind"),
    [
        ("qm9", {"std": torch.tensor([2.0])}, "l1"),
        ("qm9", {"std": torch.tensor([2.0])}, "mse"),
        ("point-cloud", {"num_classes": 3}, "l1"),  # cross-entropy
    ],
)
def test_global_item_mean_makes_unequal_shards_average_to_the_global_mean(name, state, kind):
    """Two shards of 1 and 3 graphs: with ``global_item_mean`` (``shard_count`` = the
    global count / 2, as the trainer sets it for ``data.balance: atoms``) the mean of the
    shards' losses is the loss of the whole batch; the per-shard mean is not."""
    from types import SimpleNamespace

    from geolinrpe.train.tasks import build_task

    task = build_task(Config.load(None, [f"data.task={name}", f"train.loss={kind}"]), state)
    g = torch.Generator().manual_seed(0)
    if name == "qm9":
        out = {"y": torch.randn(4, 1, generator=g)}
        batch = SimpleNamespace(y=torch.randn(4, 1, generator=g))
    else:
        out = {"y": torch.randn(4, 3, generator=g)}
        batch = SimpleNamespace(y=torch.tensor([0, 2, 1, 1]))

    def shard(lo, hi):
        return {"y": out["y"][lo:hi]}, SimpleNamespace(y=batch.y[lo:hi])

    whole = task.loss(out, batch)
    local = (task.loss(*shard(0, 1)) + task.loss(*shard(1, 4))) / 2
    assert float(local) != pytest.approx(float(whole), rel=1e-3)
    task.global_item_mean = True
    task.shard_count = lambda count: count * 0 + 4 / 2  # the sum over both shards / 2
    shared = (task.loss(*shard(0, 1)) + task.loss(*shard(1, 4))) / 2
    assert float(shared) == pytest.approx(float(whole), rel=1e-6)


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_processes_resuming_from_different_checkpoints_stop_naming_the_steps(qm9_root, tmp_path):
    """Rank 0 resumes at step 8, rank 1 at step 4 (as a node with an older ``last.pt``
    would): both stop before training, naming every rank's step. A rank whose checkpoint
    cannot be resumed stops the others instead of leaving them waiting. From the same
    file they resume together."""

    def cfg(out, *more):
        return Config.load(None, [*_overrides(qm9_root, out, "qm9"), "train.epochs=3", *more])

    for steps in (2, 4, 8):  # 4 steps per epoch: 2 is mid-epoch, for one process only
        run(cfg(tmp_path / f"s{steps}", f"train.stop_after_steps={steps}"))
    config = tmp_path / "resume.yaml"
    config.write_text(cfg(tmp_path / "two").to_yaml())
    resume = {k: [f"train.resume={tmp_path / f's{k}' / 'last.pt'}"] for k in (2, 4, 8)}

    procs, outputs = _launch_two_slurm_tasks(config, (resume[8], resume[4]))
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode != 0
        assert "rank 0: step 8" in err and "rank 1: step 4" in err, err[-2000:]

    procs, outputs = _launch_two_slurm_tasks(config, (resume[4], resume[2]))
    assert procs[1].returncode != 0 and "same number of processes" in outputs[1][1]
    assert procs[0].returncode != 0 and "rank 1 could not resume" in outputs[0][1]

    procs, outputs = _launch_two_slurm_tasks(config, (resume[8], resume[8]))
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert torch.load(tmp_path / "two" / "last.pt", weights_only=True)["step"] == 12
    assert len(_train_losses(tmp_path / "two")) == 4  # steps 9 to 12
