r"""Time and peak memory of one attention forward against the number of tokens N.

Axes: b batch (1), n/i/j tokens, h heads (4), d head dim (32), e value dim (32),
p position dim (3), m RPE features (2 x 16 frequencies = 32), r kernel features (64).

All methods see the same float32 inputs for a given N (fixed seeds): ``q, k [1, n, h, d]``
with entries ``0.5 N(0, 1)``, ``v [1, n, h, e]`` with ``N(0, 1)``, positions
``pos [1, n, 3]`` with ``POS_SCALE N(0, 1)``, the RPE
``ShiftInvariantKernelRPE(pos_dim=3, num_heads=4, num_frequencies=16)`` (Gaussian kernel,
lengthscale 1, amplitude 1) and FAVOR+ features ``PositiveRandomFeatures`` with 64 features.

Methods (inference: ``torch.no_grad``; every step from the inputs to the output is timed):

* ``sdpa-bias``: exact biased softmax ``softmax(q k^T / sqrt(d) + B) v`` with
  ``torch.nn.functional.scaled_dot_product_attention(attn_mask=B)``. The dense bias
  ``B [1, h, n, n]`` is built as ``psi_q psi_k^T`` from the RPE's symmetric features
  (``[n, h, 2m]`` each), which is the RPE estimate ``f_hat(r_i - r_j)``, with no
  ``n^2 m`` intermediate. O(n^2) time and memory.
* ``naive-kronecker``: mask mode with masked normalisation computed the textbook way:
  materialise ``phi(q_i) (x) psi_q(r_i)`` and ``phi(k_j) (x) psi_k(r_j)`` (``[1, n, h, r * m]``,
  32 KiB per token and side), then ordinary linear attention ``phi_q^T (phi_k^T [v, 1])``.
  O(n) time, but O(n r m) memory.
* ``mask``: ``linear_attention(featurizer=MaskMode(fm, rpe, d**-0.25), normalize="kernel")``.
* ``logit``: ``linear_attention(featurizer=LogitMode(fm2, rpe, d**-0.25), normalize="masked")``
  with ``fm2 = PositiveRandomFeatures(d + m, 64)``: the Performer estimate of ``sdpa-bias``.

Measurement. Each (method, N) runs in a fresh child process
(``python benchmarks/attention_scaling.py --worker METHOD N``, one JSON line on stdout):

1. a forward at N = 256 on separate inputs loads kernels and thread pools;
2. the inputs are built, freed heap memory is returned to the OS (``malloc_trim``), the
   resident-set high-water mark is reset (``/proc/self/clear_refs``, value 5) and the
   current RSS is read;
3. one forward runs (also the warm-up of the timing); peak extra memory is the high-water
   mark (``VmHWM``) minus the RSS before, so it counts every page the forward touched,
   the output included. On CUDA it is ``torch.cuda.max_memory_allocated()`` minus
   ``torch.cuda.memory_allocated()`` before the forward;
4. the forward is repeated (7 times for N <= 4k, 5 up to 16k, 3 above, and more until
   0.5 s are measured) and the median wall time is reported (``torch.cuda.synchronize``
   around each repeat on GPU);
5. for N <= 2048 (and the smallest N of the run), the max abs difference to a reference
   computed in the same process: ``mask`` and ``logit`` against the explicit quadratic
   form ``feature_attention`` of the same featurizer, ``naive-kronecker`` against
   ``linear_attention(MaskMode, normalize="masked")``, ``sdpa-bias`` against
   ``softmax_attention`` with the bias from ``rpe.estimate(r_i - r_j)``; the check is
   repeated in float64 (column ``f64 diff``) to separate rounding from a wrong result,
   and ``max|ref|`` gives the scale of the reference output.

CPU load. On a shared machine another job makes a multi-threaded forward stall at every
OpenMP barrier, which can inflate small-N timings a hundredfold. Before each worker the
driver waits until other processes use less than 10% of the cores (``--max-wait`` seconds
in all per run: 600 by default, 10 with ``--quick``); the worker records the share of the
cores that other processes used during its timed repeats (``/proc/stat`` busy time minus
its own CPU time; column ``others``), and a row disturbed by 10% or more is rerun up to
three times, keeping the least disturbed (``--quick`` never reruns, so its timings are
only as good as the machine is idle). ``--threads`` sets the workers' torch threads
(default: one per core).

Sources. The driver copies ``geolinrpe`` to a temporary directory at the start (the work
tree, or its last commit with ``--library head``) and puts it first on the workers'
``PYTHONPATH``, so edits made while the run lasts do not mix versions; the header prints
the commit and a hash of the copied sources.

Memory is reported in MiB and as a ratio to the bytes of ``q, k, v`` and ``pos``. Methods
whose dense tensors (the bias, or the two Kronecker feature tensors) would exceed 40% of
the RAM (GPU memory on CUDA) are skipped with the size they would need.

The summary fits the slope of log(time) against log(N) per method, over N >= 8k and over
all N, and checks three targets: (a) slope <= 1.1 for N >= 8k in ``mask`` and ``logit``;
(b) peak extra memory at N = 64k <= 3x the bytes of q, k, v and pos for ``mask`` and
``logit`` (stated for the CPU); (c) ``logit`` faster than ``sdpa-bias`` at N = 16k.

Usage::

    python benchmarks/attention_scaling.py                  # CPU: N = 1k .. 64k (~6 min)
    python benchmarks/attention_scaling.py --quick          # N = 1k, 2k, 4k (~40 s)
    python benchmarks/attention_scaling.py --sizes 1k,8k --json out.json
    python benchmarks/attention_scaling.py --device cuda    # N = 1k .. 1M
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import hashlib
import io
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from torch import Tensor

import geolinrpe
from geolinrpe.features import PositiveRandomFeatures
from geolinrpe.ops import (
    LogitMode,
    MaskMode,
    feature_attention,
    linear_attention,
    softmax_attention,
)
from geolinrpe.rpe import ShiftInvariantKernelRPE

HEADS = 4  # h
HEAD_DIM = 32  # d
VALUE_DIM = 32  # e
POS_DIM = 3  # p
NUM_FREQUENCIES = 16  # m = 2 * 16 RPE features
NUM_FEATURES = 64  # r
QK_STD = 0.5
POS_SCALE = 1.0
SEED = 0
DTYPE = torch.float32

METHODS = ("sdpa-bias", "naive-kronecker", "mask", "logit")
CPU_SIZES = [2**i for i in range(10, 17)]  # 1k .. 64k
QUICK_SIZES = [2**10, 2**11, 2**12]  # 1k .. 4k
CUDA_SIZES = [2**i for i in range(10, 21)]  # 1k .. 1M
WARMUP_N = 256
CHECK_MAX_N = 2048  # correctness column up to this N (and at the smallest N up to 8k)
MEMORY_FRACTION = 0.4  # skip dense methods whose big tensors exceed this share of memory
SLOPE_FROM_N = 8192
SLOPE_TARGET = 1.1
MEMORY_TARGET_N = 65536
MEMORY_TARGET_RATIO = 3.0
SPEED_TARGET_N = 16384
TARGET_METHODS = ("mask", "logit")
WORKER_TIMEOUT_S = 1200
IDLE_SHARE = 0.1  # wait before a worker while other processes use >= 10% of the cores
IDLE_SAMPLE_S = 0.5
IDLE_POLL_S = 5.0
MAX_WAIT_S = 600.0  # default total waiting for an idle machine per run (10 s with --quick)
RETRIES = 3  # reruns of a disturbed row (none with --quick)
MIN_TIMING_S = 0.5  # keep repeating small-N forwards until this much time is measured
MIB = 2**20


@dataclass
class BenchConfig:
    """What one benchmark run measures."""

    device: str
    sizes: list[int]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    quick: bool = False
    json_path: str | None = None
    threads: int | None = None  # torch threads in the workers (default: torch's, = cores)
    library: str = "worktree"  # geolinrpe sources to measure: "worktree" or "head"
    max_wait_s: float = MAX_WAIT_S  # total waiting for an idle machine before workers


@dataclass
class Problem:
    """Modules and inputs shared by every method at one N."""

    rpe: ShiftInvariantKernelRPE
    fm: PositiveRandomFeatures  # on d inputs (mask mode)
    fm2: PositiveRandomFeatures  # on d + m inputs (logit mode)
    q: Tensor  # [1, n, h, d]
    k: Tensor  # [1, n, h, d]
    v: Tensor  # [1, n, h, e]
    pos: Tensor  # [1, n, p]

    def double(self) -> Problem:
        """A float64 copy of the modules and inputs (for the reference check)."""
        modules = (copy.deepcopy(m).double() for m in (self.rpe, self.fm, self.fm2))
        inputs = (t.double() for t in (self.q, self.k, self.v, self.pos))
        return Problem(*modules, *inputs)

    @property
    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.pos))


def build_problem(n: int, device: str, seed: int = SEED) -> Problem:
    """Deterministic modules and inputs, drawn on the CPU and then moved to ``device``.

    In-place scaling keeps the build free of temporaries as large as an input.
    """
    torch.manual_seed(SEED)  # module draws use the global generator
    rpe = ShiftInvariantKernelRPE(POS_DIM, HEADS, NUM_FREQUENCIES)
    fm = PositiveRandomFeatures(HEAD_DIM, NUM_FEATURES)
    fm2 = PositiveRandomFeatures(HEAD_DIM + rpe.num_features, NUM_FEATURES)
    gen = torch.Generator().manual_seed(seed + n)
    q = torch.randn(1, n, HEADS, HEAD_DIM, generator=gen, dtype=DTYPE).mul_(QK_STD)
    k = torch.randn(1, n, HEADS, HEAD_DIM, generator=gen, dtype=DTYPE).mul_(QK_STD)
    v = torch.randn(1, n, HEADS, VALUE_DIM, generator=gen, dtype=DTYPE)
    pos = torch.randn(1, n, POS_DIM, generator=gen, dtype=DTYPE).mul_(POS_SCALE)
    inputs = (t.to(device) for t in (q, k, v, pos))
    return Problem(rpe.to(device), fm.to(device), fm2.to(device), *inputs)


# ---------------------------------------------------------------- methods (forward passes)


def sdpa_bias(p: Problem) -> Tensor:
    """Exact biased softmax with a dense ``[1, h, n, n]`` bias ``psi_q psi_k^T``."""
    psi_q = p.rpe.query_features(p.pos, split="symmetric")  # [1, n, h, m]
    psi_k = p.rpe.key_features(p.pos, split="symmetric")
    bias = torch.einsum("bihm,bjhm->bhij", psi_q, psi_k)
    out = F.scaled_dot_product_attention(
        p.q.transpose(1, 2), p.k.transpose(1, 2), p.v.transpose(1, 2), attn_mask=bias
    )
    return out.transpose(1, 2)  # [1, n, h, e]


def naive_kronecker(p: Problem) -> Tensor:
    """Mask mode, masked normalisation, with materialised ``[1, n, h, r * m]`` features."""
    mode = MaskMode(p.fm, p.rpe, HEAD_DIM**-0.25)
    fq, fk = mode.query(p.q, p.pos), mode.key(p.k, p.pos)
    # query scales cancel in the ratio; keys share one per-head scale
    key_scale = torch.exp(fk.log_scale - fk.log_scale.amax(1, keepdim=True))  # [1, n, h]
    phi_k = fk.phi * key_scale[..., None]
    kron_q = (fq.phi[..., :, None] * fq.psi[..., None, :]).flatten(-2)  # [1, n, h, r * m]
    kron_k = (phi_k[..., :, None] * fk.psi[..., None, :]).flatten(-2)
    values = torch.cat([p.v, p.v.new_ones(p.v.shape[:-1] + (1,))], dim=-1)  # [v, 1]
    state = torch.einsum("bnhx,bnhe->bhxe", kron_k, values)
    out = torch.einsum("bnhx,bhxe->bnhe", kron_q, state)
    return out[..., :-1] / out[..., -1:]


def mask_mode(p: Problem, normalize: str = "kernel") -> Tensor:
    mode = MaskMode(p.fm, p.rpe, HEAD_DIM**-0.25)
    return linear_attention(p.q, p.k, p.v, p.pos, featurizer=mode, normalize=normalize)


def logit_mode(p: Problem) -> Tensor:
    mode = LogitMode(p.fm2, p.rpe, HEAD_DIM**-0.25)
    return linear_attention(p.q, p.k, p.v, p.pos, featurizer=mode, normalize="masked")


FORWARDS: dict[str, Callable[[Problem], Tensor]] = {
    "sdpa-bias": sdpa_bias,
    "naive-kronecker": naive_kronecker,
    "mask": mask_mode,
    "logit": logit_mode,
}


# ---------------------------------------------------------------- references (same process)


def rpe_bias_reference(p: Problem, rows: int = 256) -> Tensor:
    """``f_hat(r_i - r_j)`` as ``[1, h, n, n]`` from ``rpe.estimate``, in row blocks."""
    pos = p.pos[0]
    blocks = [p.rpe.estimate(pos[i : i + rows, None] - pos[None]) for i in range(0, len(pos), rows)]
    return torch.cat(blocks).permute(2, 0, 1)[None]  # [i, j, h] -> [1, h, i, j]


def reference(method: str, p: Problem) -> tuple[str, Tensor]:
    """Name and output of the reference each method is checked against."""
    if method == "sdpa-bias":
        bias = rpe_bias_reference(p)
        return "softmax_attention(bias=rpe.estimate)", softmax_attention(p.q, p.k, p.v, bias)
    if method == "naive-kronecker":
        return "linear_attention(mask, masked)", mask_mode(p, normalize="masked")
    if method == "mask":
        mode = MaskMode(p.fm, p.rpe, HEAD_DIM**-0.25)
        out = feature_attention(p.q, p.k, p.v, p.pos, featurizer=mode, normalize="kernel")
        return "feature_attention(mask, kernel)", out
    mode = LogitMode(p.fm2, p.rpe, HEAD_DIM**-0.25)
    out = feature_attention(p.q, p.k, p.v, p.pos, featurizer=mode, normalize="masked")
    return "feature_attention(logit, masked)", out


# ---------------------------------------------------------------- memory and CPU-load helpers


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _release_free_heap() -> None:
    """Give freed malloc memory back to the OS so that the RSS baseline is live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` (and ``ru_maxrss``) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def total_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes(device: str) -> int:
    """Memory free for a new process now (``MemAvailable``; free GPU memory on CUDA)."""
    if device == "cuda":
        return torch.cuda.mem_get_info(0)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return total_memory_bytes(device)


def dense_bytes(method: str, n: int) -> int:
    """Bytes of the O(n^2) or O(n r m) tensors that decide whether a method fits."""
    if method == "sdpa-bias":
        return HEADS * n * n * 4  # the bias
    if method == "naive-kronecker":
        return 2 * n * HEADS * NUM_FEATURES * 2 * NUM_FREQUENCIES * 4  # query and key features
    return 0


def _cpu_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (``/proc/stat``, all cores)."""
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def others_share(seconds: float = IDLE_SAMPLE_S) -> float:
    """Share of all cores busy over ``seconds`` while this process sleeps."""
    busy, start = _cpu_busy_s(), time.monotonic()
    time.sleep(seconds)
    return (_cpu_busy_s() - busy) / ((time.monotonic() - start) * (os.cpu_count() or 1))


def wait_for_idle(max_wait_s: float) -> float:
    """Sleep until other processes use less than ``IDLE_SHARE`` of the cores; seconds waited.

    On a shared machine a concurrent job makes a 2-thread forward wait at every OpenMP
    barrier for a descheduled thread (an elementwise op on 262k floats took 6 ms instead
    of 0.05 ms here), so timings are only meaningful on an otherwise idle machine.
    """
    start = time.monotonic()
    while others_share() >= IDLE_SHARE and time.monotonic() - start < max_wait_s:
        time.sleep(IDLE_POLL_S)
    return time.monotonic() - start


def library_fingerprint(root: Path) -> str:
    """Short sha256 of the ``.py`` files of the package at ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True)


def snapshot_library(source: str, dest: Path) -> str:
    """Copy ``geolinrpe`` into ``dest`` so that every worker imports the same sources.

    Others may edit the package while a run lasts. ``source="worktree"`` copies the files
    as they are at the start; ``"head"`` extracts the last commit (uncommitted edits
    excluded). Returns ``<commit>``, or ``<commit>+modified`` for a modified work tree.
    """
    root = Path(geolinrpe.__file__).parent
    try:
        head = _git(root.parent, "rev-parse", "HEAD")
        commit = head.stdout.decode().strip()[:7] if head.returncode == 0 else "unknown"
        if source == "head":
            archive = _git(root.parent, "archive", head.stdout.decode().strip(), root.name)
            if archive.returncode != 0:
                raise RuntimeError(f"git archive failed: {archive.stderr.decode().strip()}")
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(dest, filter="data")
            return commit
        dirty = _git(root.parent, "status", "--porcelain", "--", str(root)).stdout.strip()
    except OSError:  # no git
        if source == "head":
            raise
        commit, dirty = "unknown", b""
    shutil.copytree(root, dest / root.name, ignore=shutil.ignore_patterns("__pycache__"))
    return commit + ("+modified" if dirty else "")


# ---------------------------------------------------------------- worker (one child process)


def repeats_for(n: int) -> int:
    return 7 if n <= 4096 else 5 if n <= 16384 else 3


def time_forward(
    forward: Callable[[], object], repeats: int, sync: Callable[[], None]
) -> tuple[list[float], float]:
    """Wall times of ``repeats`` calls (more until ``MIN_TIMING_S`` is spent, at most 50).

    Also returns the share of all cores that *other* processes used meanwhile
    (``/proc/stat`` busy time minus this process's CPU time; resolution 1 clock tick).
    """
    times: list[float] = []
    busy, own = _cpu_busy_s(), _own_cpu_s()
    while len(times) < repeats or (sum(times) < MIN_TIMING_S and len(times) < 50):
        sync()
        start = time.perf_counter()
        forward()
        sync()
        times.append(time.perf_counter() - start)
    others = (_cpu_busy_s() - busy) - (_own_cpu_s() - own)
    return times, max(0.0, others / (sum(times) * (os.cpu_count() or 1)))


def measure(method: str, n: int, device: str, check: bool) -> dict:
    """Peak memory, median time and (optionally) the reference difference of one forward."""
    forward = FORWARDS[method]
    cuda = device == "cuda"
    library = Path(geolinrpe.__file__).parent  # the snapshot the driver put on PYTHONPATH

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        forward(build_problem(WARMUP_N, device, seed=SEED + 1))  # load kernels, thread pools
        sync()
        p = build_problem(n, device)
        sync()
        hwm_reset = True
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
            hwm_reset = _reset_peak_rss()
            before = _status_kib("VmRSS") * 1024
        start = time.perf_counter()
        out = forward(p)
        sync()
        first_s = time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = max(_status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            peak = peak * 1024 - before
        del out
        times, others = time_forward(lambda: forward(p), repeats_for(n), sync)
        row = {
            "method": method,
            "n": n,
            "device": device,
            "time_ms": 1e3 * median(times),
            "times_ms": [1e3 * t for t in times],
            "first_ms": 1e3 * first_s,
            "peak_extra_bytes": peak,
            "input_bytes": p.input_bytes,
            "memory_ratio": peak / p.input_bytes,
            "baseline_bytes": before,
            "peak_reset": hwm_reset,
            "others_cpu_share": others,
            "library": library_fingerprint(library),
            "library_path": str(library),
            "reference": None,
            "max_abs_diff": None,
            "max_abs_diff_float64": None,
            "output_max_abs": None,
        }
        if check:
            name, ref = reference(method, p)
            row["reference"] = name
            row["max_abs_diff"] = (forward(p) - ref).abs().max().item()
            row["output_max_abs"] = ref.abs().max().item()
            p64 = p.double()
            row["max_abs_diff_float64"] = (
                (forward(p64) - reference(method, p64)[1]).abs().max().item()
            )
    return row


# ---------------------------------------------------------------- driver


def run_worker(
    method: str, n: int, device: str, check: bool, threads: int | None, env: dict[str, str]
) -> dict:
    """Measure one (method, N) in a fresh process with environment ``env``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(n)]
    cmd += ["--device", device] + (["--check"] if check else [])
    cmd += [] if threads is None else ["--threads", str(threads)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "device": device, "error": "timeout"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"method": method, "n": n, "device": device, "error": tail[0]}
    return json.loads(lines[-1])


def measure_when_idle(
    method: str, n: int, cfg: BenchConfig, check: bool, wait_budget: float, env: dict[str, str]
) -> tuple[dict, float]:
    """Run a worker after waiting for an idle machine.

    Reruns it (at most ``RETRIES`` times, never with ``--quick``, while ``wait_budget``
    seconds of waiting remain) when other processes used ``IDLE_SHARE`` or more of the
    cores during its timing, and keeps the least disturbed row.
    """
    best, waited, shares = None, 0.0, []
    for _ in range(1 if cfg.quick else RETRIES + 1):
        waited += wait_for_idle(max(wait_budget - waited, 0.0))
        row = run_worker(method, n, cfg.device, check, cfg.threads, env)
        if "error" in row:
            return row, waited
        shares.append(row["others_cpu_share"])
        if best is None or row["others_cpu_share"] < best["others_cpu_share"]:
            best = row
        if best["others_cpu_share"] < IDLE_SHARE or waited >= wait_budget:
            break
    return best | {"others_cpu_share_per_attempt": shares}, waited


def machine_info(device: str, threads: int | None = None) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(total_memory_bytes("cpu") / 2**30, 1),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average_1min": os.getloadavg()[0],
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(total_memory_bytes("cuda") / 2**30, 1)
    return info


def fit_slope(rows: list[dict], min_n: int) -> float | None:
    """Least-squares slope of log(time) against log(N) over timed rows with N >= min_n."""
    pts = [(math.log(r["n"]), math.log(r["time_ms"])) for r in rows if r["n"] >= min_n]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def size_label(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def parse_sizes(text: str) -> list[int]:
    units = {"k": 2**10, "m": 2**20}
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = units.get(item[-1:], 1)
        sizes.append(int(item[:-1] if scale > 1 else item) * scale)
    if any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sorted(set(sizes))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'method':<16}{'N':>6}{'time ms':>11}{'peak MiB':>10}{'x qkv+pos':>10}"
        f"{'max|diff|':>11}{'f64 diff':>10}{'max|ref|':>10}{'others':>8}  reference"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        label = f"{r['method']:<16}{size_label(r['n']):>6}"
        if "skipped" in r or "error" in r:
            note = r.get("skipped") or f"error: {r['error']}"
            dashes = f"{'-':>11}{'-':>10}{'-':>10}{'-':>11}{'-':>10}{'-':>10}{'-':>8}"
            lines.append(f"{label}{dashes}  {note}")
            continue
        note = r["reference"] or ""
        if not r["peak_reset"]:
            note += " (peak RSS not reset: upper bound)"
        lines.append(
            f"{label}{r['time_ms']:>11.1f}{r['peak_extra_bytes'] / MIB:>10.1f}"
            f"{r['memory_ratio']:>10.2f}{_fmt(r['max_abs_diff'], '.1e'):>11}"
            f"{_fmt(r['max_abs_diff_float64'], '.1e'):>10}"
            f"{_fmt(r['output_max_abs'], '.3g'):>10}{r['others_cpu_share']:>8.0%}  {note}".rstrip()
        )
    return "\n".join(lines)


def _verdict(checks: list[bool | None]) -> str:
    if not checks or any(c is None for c in checks):
        return "N/A"
    return "PASS" if all(checks) else "FAIL"


def _find(rows: list[dict], method: str, n: int) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["n"] == n), None)


def _slope_target(slopes: dict) -> dict:
    values = {m: slopes.get(m, {}).get(f"n>={SLOPE_FROM_N}") for m in TARGET_METHODS}
    return {
        "text": f"time slope <= {SLOPE_TARGET} for N >= {size_label(SLOPE_FROM_N)}",
        "measured": ", ".join(f"{m} {_fmt(s, '.2f')}" for m, s in values.items()),
        "values": values,
        "status": _verdict([None if s is None else s <= SLOPE_TARGET for s in values.values()]),
    }


def _memory_target(rows: list[dict], device: str) -> dict:
    found = {m: _find(rows, m, MEMORY_TARGET_N) for m in TARGET_METHODS}
    measured = []
    for m, r in found.items():
        if r is None:
            measured.append(f"{m} -")
        else:
            mib = f"{r['peak_extra_bytes'] / MIB:.0f} MiB / {r['input_bytes'] / MIB:.0f} MiB"
            measured.append(f"{m} {r['memory_ratio']:.2f}x ({mib})")
    where = "" if device == "cpu" else f" (measured on {device}; the target is for the CPU)"
    ratio = MEMORY_TARGET_RATIO
    return {
        "text": f"peak extra memory at N = {size_label(MEMORY_TARGET_N)} <= {ratio:g}x "
        f"bytes of q, k, v, pos{where}",
        "measured": ", ".join(measured),
        "values": {m: None if r is None else r["memory_ratio"] for m, r in found.items()},
        "status": _verdict(
            [None if r is None else r["memory_ratio"] <= ratio for r in found.values()]
        ),
    }


def _speed_target(rows: list[dict]) -> dict:
    logit, sdpa = _find(rows, "logit", SPEED_TARGET_N), _find(rows, "sdpa-bias", SPEED_TARGET_N)
    faster, measured = None, "-"
    if logit is not None and sdpa is not None:
        faster = logit["time_ms"] < sdpa["time_ms"]
        measured = (
            f"logit {logit['time_ms']:.1f} ms, sdpa-bias {sdpa['time_ms']:.1f} ms "
            f"(sdpa-bias / logit = {sdpa['time_ms'] / logit['time_ms']:.1f})"
        )
    return {
        "text": f"logit faster than sdpa-bias at N = {size_label(SPEED_TARGET_N)}",
        "measured": measured,
        "values": {
            m: None if r is None else r["time_ms"]
            for m, r in (("logit", logit), ("sdpa-bias", sdpa))
        },
        "status": _verdict([faster]),
    }


def summarize(rows: list[dict], methods: list[str], device: str) -> dict:
    """Slopes of log(time) vs log(N) per method and the three targets."""
    timed = [r for r in rows if "time_ms" in r]
    slopes = {}
    for m in methods:
        mine = [r for r in timed if r["method"] == m]
        slopes[m] = {"all": fit_slope(mine, 0), f"n>={SLOPE_FROM_N}": fit_slope(mine, SLOPE_FROM_N)}
    targets = {
        "a": _slope_target(slopes),
        "b": _memory_target(timed, device),
        "c": _speed_target(timed),
    }
    return {"slopes": slopes, "targets": targets}


def format_summary(summary: dict) -> str:
    key = f"n>={SLOPE_FROM_N}"
    lines = [f"slope of log(time) vs log(N)   N >= {size_label(SLOPE_FROM_N)}   all N"]
    for method, s in summary["slopes"].items():
        lines.append(f"  {method:<28}{_fmt(s[key], '.2f'):>10}{_fmt(s['all'], '.2f'):>8}")
    lines.append("")
    lines.append("targets")
    for name, t in summary["targets"].items():
        lines.append(f"  ({name}) {t['text']}: {t['measured']}  {t['status']}")
    return "\n".join(lines)


def measure_all(cfg: BenchConfig, env: dict[str, str]) -> list[dict]:
    """One row per (N, method): measured in a worker, or skipped when it cannot fit."""
    budget = MEMORY_FRACTION * total_memory_bytes(cfg.device)
    wait_budget = cfg.max_wait_s
    rows = []
    for n in cfg.sizes:
        check = n <= CHECK_MAX_N or (n == cfg.sizes[0] and n <= 4 * CHECK_MAX_N)
        for method in cfg.methods:
            need, free = dense_bytes(method, n), available_memory_bytes(cfg.device)
            if need > min(budget, free):
                because = "" if need > budget else f", {free / 1e9:.1f} GB available"
                skipped = f"skipped: needs {need / 1e9:.1f} GB{because}"
                row = {"method": method, "n": n, "device": cfg.device, "skipped": skipped}
            else:
                row, waited = measure_when_idle(method, n, cfg, check, wait_budget, env)
                wait_budget -= waited
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    rows.sort(key=lambda r: (cfg.methods.index(r["method"]), r["n"]))
    return rows


def run(cfg: BenchConfig) -> dict:
    info = machine_info(cfg.device, cfg.threads)
    print(
        f"# {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, torch {info['torch']}"
        f" ({info['threads']} threads), device {cfg.device}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
        + f", {info['date']}, load average {info['load_average_1min']:.2f}",
        flush=True,
    )
    print(
        f"# float32, batch 1, h={HEADS}, d={HEAD_DIM}, e={VALUE_DIM}, pos 3D x {POS_SCALE}, "
        f"m={2 * NUM_FREQUENCIES} RPE features, r={NUM_FEATURES} kernel features",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="geolinrpe-bench-") as snapshot:
        info["geolinrpe_git"] = snapshot_library(cfg.library, Path(snapshot))
        info["geolinrpe_sources"] = library_fingerprint(Path(snapshot) / "geolinrpe")
        print(
            f"# geolinrpe {cfg.library} at git {info['geolinrpe_git']}, "
            f"sources sha256 {info['geolinrpe_sources']}",
            flush=True,
        )
        path = os.environ.get("PYTHONPATH")
        env = os.environ | {"PYTHONPATH": snapshot + (os.pathsep + path if path else "")}
        rows = measure_all(cfg, env)
    summary = summarize(rows, cfg.methods, cfg.device)
    print()
    print(format_table(rows))
    print()
    print(format_summary(summary))
    info["load_average_1min_end"] = os.getloadavg()[0]
    print(f"\n# load average at the end: {info['load_average_1min_end']:.2f}")
    foreign = [
        r for r in rows if r.get("library", info["geolinrpe_sources"]) != info["geolinrpe_sources"]
    ]
    if foreign:  # a worker did not import the snapshot
        print(f"# WARNING: {len(foreign)} rows measured other geolinrpe sources than the snapshot")
    result = {"machine": info, "config": asdict(cfg), "rows": rows, "summary": summary}
    if cfg.json_path:
        with open(cfg.json_path, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"\nwrote {cfg.json_path}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1k, 2k, 4k only")
    parser.add_argument("--sizes", type=parse_sizes, help="comma-separated N, e.g. 1k,4k,16384")
    parser.add_argument("--json", dest="json_path", help="write rows and summary to this file")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
    )
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: cores)")
    parser.add_argument(
        "--library",
        choices=("worktree", "head"),
        default="worktree",
        help="measure a copy of the geolinrpe work tree (default) or of its last commit",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        help=f"seconds to wait in all for an idle machine ({MAX_WAIT_S:g}; 10 with --quick)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.worker:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        method, n = args.worker
        print(json.dumps(measure(method, int(n), args.device, args.check)))
        return
    methods = METHODS if args.methods is None else args.methods.split(",")
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    default = CUDA_SIZES if args.device == "cuda" else CPU_SIZES
    sizes = args.sizes or (QUICK_SIZES if args.quick else default)
    max_wait = args.max_wait
    if max_wait is None:
        max_wait = 10.0 if args.quick else MAX_WAIT_S
    # SIGTERM unwinds like Ctrl-C: the running worker is killed, the snapshot removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = BenchConfig(
        device=args.device,
        sizes=sizes,
        methods=list(methods),
        quick=args.quick,
        json_path=args.json_path,
        threads=args.threads,
        library=args.library,
        max_wait_s=max_wait,
    )
    run(cfg)


if __name__ == "__main__":
    main()
