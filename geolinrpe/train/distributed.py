r"""Where this process stands in a run: one process, ``torchrun``, or SLURM's ``srun``.

* :class:`DistEnv` and ``_init_distributed``: the process group from torchrun's variables
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or, when they
  are absent, from SLURM's (:func:`slurm_environment`, :func:`expand_hostlist`).
* :func:`builds_data_first`: local rank 0 of every node builds data caches first.
* :func:`check_resume_agreement`: all processes resume from the same step and weights.
* :func:`choose_num_threads`: intra-op threads per process (``train.num_threads``, else
  ``OMP_NUM_THREADS``, else the node's cores split between its processes).
* ``_all_reduce``, ``_barrier``: collectives that are no-ops in a one-process run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SLURM_PORT_BASE",
    "DistEnv",
    "builds_data_first",
    "check_resume_agreement",
    "choose_num_threads",
    "expand_hostlist",
    "slurm_environment",
]


@dataclass
class DistEnv:
    """This process's place in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def _select_device(preference: str, local_rank: int) -> torch.device:
    """``auto``: CUDA device ``local_rank`` when CUDA is available, else the CPU. A process
    that sees a single CUDA device (SLURM's per-task GPU binding, ``--gpus-per-task=1``)
    takes device 0 whatever its local rank."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("config key 'train.device' is 'cuda' but CUDA is not available")
    return torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local_rank)


_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Variables whose presence means torchrun (or the user) describes the process group."""

SLURM_PORT_BASE = 20000
"""Under SLURM without ``MASTER_PORT``: port ``SLURM_PORT_BASE + SLURM_JOB_ID % 20000``."""


def expand_hostlist(spec: str) -> list[str]:
    """Host names of a SLURM host list, in order: ``"node[01-03,07],gpu5"`` ->
    ``["node01", "node02", "node03", "node07", "gpu5"]``.

    Brackets hold comma-separated numbers and ``lo-hi`` ranges; the zero padding of ``lo``
    is kept (``[08-10]`` -> ``08, 09, 10``). Several bracket groups in one name expand as a
    product (``r[1-2]n[1-2]`` -> ``r1n1, r1n2, r2n1, r2n2``), as ``scontrol show hostnames``
    does.

    Raises:
        ValueError: unbalanced brackets, an empty name or range, or a range whose end is
            below its start; the message quotes ``spec``.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"SLURM node list {spec!r}: {why}")

    names: list[str] = []
    depth, start = 0, 0
    pieces: list[str] = []
    for i, ch in enumerate(spec):  # split at commas outside brackets
        if ch == "[":
            depth += 1
            if depth > 1:
                raise bad("nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise bad("']' without '['")
        elif ch == "," and depth == 0:
            pieces.append(spec[start:i])
            start = i + 1
    if depth:
        raise bad("'[' without ']'")
    pieces.append(spec[start:])
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            raise bad("an empty host name")
        expanded = [""]
        for part in re.split(r"(\[[^\]]*\])", piece):
            if part.startswith("["):
                numbers: list[str] = []
                for item in part[1:-1].split(","):
                    lo, dash, hi = item.strip().partition("-")
                    if not lo.isdigit() or (dash and not hi.isdigit()):
                        raise bad(f"{item.strip()!r} is not a number or a lo-hi range")
                    if not dash:
                        numbers.append(lo)
                        continue
                    if int(hi) < int(lo):
                        raise bad(f"range {item.strip()!r} ends below its start")
                    numbers += [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]
                expanded = [head + n for head in expanded for n in numbers]
            else:
                expanded = [head + part for head in expanded]
        names += expanded
    return names


def _tasks_on_node(spec: str, node: int) -> int | None:
    """Tasks on node ``node`` from ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``), or ``None``."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun-style variables derived from SLURM's, for a plain ``srun`` launch; ``{}``
    when torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set (they win) or
    ``SLURM_PROCID``/``SLURM_NTASKS`` are not.

    ``RANK`` = ``SLURM_PROCID``, ``WORLD_SIZE`` = ``SLURM_STEP_NUM_TASKS`` (else
    ``SLURM_NTASKS``), ``LOCAL_RANK`` = ``SLURM_LOCALID`` (0 when unset), ``MASTER_ADDR``
    = the first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``/``SLURM_NODELIST``
    (:func:`expand_hostlist`), ``MASTER_PORT`` = ``20000 + SLURM_JOB_ID % 20000``;
    ``MASTER_ADDR``/``MASTER_PORT`` already in ``environ`` are kept. ``LOCAL_WORLD_SIZE``
    comes from ``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` with ``SLURM_NODEID``
    when they say it.

    Raises:
        ValueError: a SLURM variable is not an integer, ``SLURM_PROCID`` is outside
            ``[0, world size)``, or a multi-process job has no node list / no
            ``SLURM_JOB_ID`` (and no ``MASTER_PORT``); the message names the variable.
    """
    if any(key in environ for key in _TORCHRUN_KEYS):
        return {}
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}

    def number(key: str, default: int | None = None) -> int:
        text = environ.get(key)
        if text is None or not text.strip():
            if default is None:
                raise ValueError(f"SLURM environment variable {key} is not set")
            return default
        try:
            return int(text)
        except ValueError:
            raise ValueError(
                f"SLURM environment variable {key} is {text!r}, not an integer"
            ) from None

    world_key = "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    world, rank = number(world_key), number("SLURM_PROCID")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"SLURM environment variable SLURM_PROCID is {rank}, outside [0, {world_key}={world})"
        )
    out = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(number("SLURM_LOCALID", 0)),
    }
    if world == 1:
        return out
    if "MASTER_ADDR" in environ:
        out["MASTER_ADDR"] = environ["MASTER_ADDR"]
    else:
        keys = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        key = next((k for k in keys if environ.get(k, "").strip()), None)
        if key is None:
            raise ValueError(
                "SLURM environment variables SLURM_JOB_NODELIST and SLURM_NODELIST are not set: "
                "no master address for a job of several tasks (set MASTER_ADDR)"
            )
        out["MASTER_ADDR"] = expand_hostlist(environ[key])[0]
    if "MASTER_PORT" in environ:
        out["MASTER_PORT"] = environ["MASTER_PORT"]
    else:
        out["MASTER_PORT"] = str(SLURM_PORT_BASE + number("SLURM_JOB_ID") % 20000)
    if environ.get("SLURM_NTASKS_PER_NODE", "").strip().isdigit():
        out["LOCAL_WORLD_SIZE"] = environ["SLURM_NTASKS_PER_NODE"].strip()
    elif environ.get("SLURM_TASKS_PER_NODE") and environ.get("SLURM_NODEID", "").isdigit():
        local = _tasks_on_node(environ["SLURM_TASKS_PER_NODE"], int(environ["SLURM_NODEID"]))
        if local is not None:
            out["LOCAL_WORLD_SIZE"] = str(local)
    return out


def _init_distributed(preference: str) -> DistEnv:
    """Reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, with
    ``MASTER_ADDR``/``MASTER_PORT``) or, when it is absent, SLURM's (:func:`slurm_environment`,
    whose variables are then exported to ``os.environ`` for torch and child processes), and
    joins the process group (gloo on CPU, NCCL on GPU) unless one is already initialised.
    One task (``WORLD_SIZE``/``SLURM_NTASKS`` 1) is a one-process run."""
    import torch.distributed as dist

    slurm = slurm_environment(os.environ)
    if int(slurm.get("WORLD_SIZE", "1")) > 1:
        os.environ.update(slurm)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", slurm.get("LOCAL_RANK", "0")))
    device = _select_device(preference, local_rank)
    if world <= 1:
        return DistEnv(device=device)
    here = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        here = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, here)


def builds_data_first(env: DistEnv) -> bool:
    """Whether this process loads the data (building caches such as QM9's ``processed/``)
    before the others of its node: local rank 0 of every node, so that nodes without a
    shared filesystem each build their own; the others wait at a barrier, then read it."""
    return env.local_rank == 0


def check_resume_agreement(steps: Sequence[int], digests: Sequence[str]) -> None:
    """Check that every process resumed from the same point of the same checkpoint.

    Args:
        steps: the resumed step of each process, by rank (0 for a fresh start).
        digests: a fingerprint of each process's resumed weights, by rank (``""`` for a
            fresh start).

    Raises:
        ValueError: the steps or fingerprints differ; the message lists the step of every
            rank (e.g. a node whose ``train.out_dir`` holds an older ``last.pt``).
    """
    if len(steps) != len(digests):
        raise ValueError(f"steps ({len(steps)}) and digests ({len(digests)}) differ in length")
    if len(set(steps)) <= 1 and len(set(digests)) <= 1:
        return
    listed = ", ".join(
        f"rank {r}: step {s}" + (f" (weights {d[:12]})" if d else " (no checkpoint)")
        for r, (s, d) in enumerate(zip(steps, digests, strict=True))
    )
    what = "steps" if len(set(steps)) > 1 else "checkpoints at the same step"
    raise ValueError(
        f"config key 'train.resume': the processes resumed from different {what} ({listed}); "
        "every process must read the same checkpoint (copy last.pt to every node's "
        "train.out_dir or use a shared filesystem)"
    )


def _available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_num_threads(
    setting: int | None,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> int | None:
    """The ``torch.set_num_threads`` of a training process, or ``None`` to leave torch's
    own choice (which follows ``OMP_NUM_THREADS``).

    ``train.num_threads`` (``setting``) wins when given. Otherwise ``None``, except under
    ``torchrun`` with several processes on this node (``LOCAL_WORLD_SIZE`` > 1) and no
    ``OMP_NUM_THREADS``: then ``max(1, cores // LOCAL_WORLD_SIZE)``, so that the processes
    share the cores instead of each taking all of them.

    Args:
        setting: ``train.num_threads``.
        environ: the environment (``os.environ``).
        cores: cores available to this process (default: its CPU affinity, else the count).
    """
    if setting is not None:
        return setting
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    local = environ.get("LOCAL_WORLD_SIZE") or environ.get("WORLD_SIZE") or "1"
    try:
        local_world = int(local)
    except ValueError:
        return None
    if local_world <= 1:
        return None
    cores = _available_cores() if cores is None else cores
    return max(1, cores // local_world)


def _all_reduce(tensor: Tensor, env: DistEnv, op: str = "sum") -> Tensor:
    """Sum (or max) over processes, in place; a no-op in a one-process run."""
    if env.distributed:
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        work = tensor.to(env.device) if env.device.type == "cuda" else tensor
        dist.all_reduce(work, op=reduce_op)
        tensor.copy_(work)
    return tensor


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- sampling
