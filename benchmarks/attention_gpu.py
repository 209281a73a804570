"""GPU attention at 16k-1M tokens: the fused Triton kernels against the torch engine and peers.

One sequence per batch row (B = 1), H = 8 heads, D = 32 head dim, bf16 inputs, 1D positions
(the token index). Methods, each timed forward and forward+backward (median of CUDA-event
timings after a warm-up; peak memory from ``torch.cuda.max_memory_allocated`` over one
call, inputs excluded):

* ``flt-triton``: ``RPEAttention``'s engine with ``engine="triton"`` (:mod:`geolinrpe.ops.fused`):
  mask mode, FAVOR+ with r = 64 features, ``flt-kernel`` (Gaussian) with m = 32 RPE features
  (16 frequencies), bidirectional;
* ``flt-torch``: the same featurizer on the chunked torch engine (``engine="torch"``);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` without RPE (flash);
* ``flex-rpe``: FlexAttention with a ``score_mod`` adding the Gaussian RPE bias
  ``-(i - j)^2 / (2 l^2)``: exact RPE attention, O(N^2);
* ``fla-linear``: flash-linear-attention's ``chunk_linear_attn`` without RPE (causal: its
  kernels have no bidirectional form) when ``fla`` is importable.

Methods whose projected time exceeds ``--budget`` seconds per call (from the previous size,
at their complexity) are skipped and recorded as such, so the default run stays within
5 minutes. Targets (issue 16, one H100): FLT fwd+bwd at N = 1M within 10 ms and 4 GB, at
least 3x faster than ``flt-torch`` and 60x faster than ``flex-rpe`` at N = 262k.

    python benchmarks/attention_gpu.py --json attention_gpu.json     # on a GPU
    python benchmarks/attention_gpu.py --quick                       # tiny sizes; CPU ok
        (without CUDA --quick runs the Triton kernels in the interpreter and times nothing
        that means anything: it checks the script end to end)
    python benchmarks/attention_gpu.py --compile sm_90 --json compile.json   # no GPU needed

``--compile ARCH`` compiles every kernel variant ahead of time for a CUDA architecture with
Triton's bundled ``ptxas`` (no GPU needed) and reports registers, stack (spills) and shared
memory per program from ``cuobjdump -res-usage``: that the kernels build for the target,
and how heavy they are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

if __name__ == "__main__" and "--quick" in sys.argv and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
if __name__ == "__main__" and "--compile" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones

import torch

from geolinrpe import RPEAttention
from geolinrpe.ops import linear_attention

HEADS, HEAD_DIM, FEATURES, RPE_FEATURES = 8, 32, 64, 32
LENGTHSCALE = 64.0  # tokens


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(call, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (CUDA events on a GPU, wall time otherwise)."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            call()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _peak(call) -> float | None:
    """Peak memory of one call beyond what was allocated before it (GiB)."""
    if not torch.cuda.is_available():
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _flt_layer(device):
    layer = RPEAttention(
        HEADS * HEAD_DIM,
        HEADS,
        rpe="flt-kernel",
        pos_dim=1,
        mode="mask",
        kernel="favor+",
        num_features=FEATURES,
        rpe_options={"num_frequencies": RPE_FEATURES // 2, "lengthscale": LENGTHSCALE},
    ).to(device)
    return layer.featurizer


def methods(device):
    """``{name: (complexity exponent, make(n) -> (forward, backward_inputs))}``."""
    featurizer = _flt_layer(device)
    bf16 = torch.bfloat16

    def qkv(n, layout="bnhd"):
        shape = (1, n, HEADS, HEAD_DIM) if layout == "bnhd" else (1, HEADS, n, HEAD_DIM)
        return [torch.randn(shape, device=device, dtype=bf16, requires_grad=True) for _ in range(3)]

    def flt(engine):
        def make(n):
            q, k, v = qkv(n)
            pos = torch.arange(n, device=device, dtype=torch.float32).view(1, n, 1)
            return lambda: linear_attention(
                q, k, v, pos, featurizer=featurizer, engine=engine, check_finite=False
            ), (q, k, v)

        return make

    def sdpa(n):
        q, k, v = qkv(n, "bhnd")
        f = torch.nn.functional.scaled_dot_product_attention
        return lambda: f(q, k, v), (q, k, v)

    def flex(n):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = qkv(n, "bhnd")
        scale = 1 / (2 * LENGTHSCALE**2)

        def score_mod(score, b, h, i, j):
            return score - (i - j).to(score.dtype) ** 2 * scale

        compiled = torch.compile(flex_attention)
        return lambda: compiled(q, k, v, score_mod=score_mod), (q, k, v)

    def fla(n):
        from fla.ops.linear_attn import chunk_linear_attn

        q, k, v = qkv(n)
        return lambda: chunk_linear_attn(q, k, v)[0], (q, k, v)

    table = {
        "flt-triton": (1, flt("triton")),
        "flt-torch": (1, flt("torch")),
        "sdpa": (2, sdpa),
        "flex-rpe": (2, flex),
    }
    try:
        import fla  # noqa: F401

        table["fla-linear"] = (1, fla)
    except ImportError:
        pass
    return table


def run(sizes, repeats, budget, device):
    records, last = [], {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    name_dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for n in sizes:
        for name, (power, make) in methods(device).items():
            record = dict(method=name, n=n, heads=HEADS, head_dim=HEAD_DIM, device=name_dev)
            record.update(features=FEATURES, rpe_features=RPE_FEATURES, dtype="bfloat16")
            record.update(load_average=load)
            if name in last and last[name][1] * (n / last[name][0]) ** power > budget:
                reason = (
                    f"failed at N={last[name][0]}"
                    if math.isinf(last[name][1])
                    else f"projected over {budget:g} s per call"
                )
                record["skipped"] = reason
                records.append(record)
                print(f"{name:>11} N={n:>8}: skipped ({reason})")
                continue
            try:
                forward, inputs = make(n)

                def both(forward=forward):
                    out = forward()
                    out.float().pow(2).mean().backward()

                for call in (forward, both):  # warm-up (and compilation)
                    call()
                _sync()
                with torch.no_grad():
                    record["forward_s"] = _time(forward, repeats)
                    record["forward_peak_gib"] = _peak(forward)
                record["forward_backward_s"] = _time(both, repeats)
                record["forward_backward_peak_gib"] = _peak(both)
                last[name] = (n, record["forward_backward_s"])
                print(
                    f"{name:>11} N={n:>8}: fwd {record['forward_s'] * 1e3:9.2f} ms, "
                    f"fwd+bwd {record['forward_backward_s'] * 1e3:9.2f} ms, "
                    f"peak {record['forward_backward_peak_gib']} GiB"
                )
                del inputs
            except Exception as error:  # noqa: BLE001 - one method's failure is a record
                record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                print(f"{name:>11} N={n:>8}: {record['error']}")
                last[name] = (n, math.inf)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            records.append(record)
    return records


def compile_report(arch: str) -> list[dict]:
    """Compile each kernel variant for ``arch`` (``sm_90``) and read its resource usage."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from geolinrpe.ops import fused

    capability = int(arch.removeprefix("sm_"))
    target = GPUTarget("cuda", capability, 32)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    pointer = {"valid_ptr": "*i8", "work_ptr": "*i32", "offsets_ptr": "*i64"}
    halves = ("q_ptr", "k_ptr", "v_ptr", "x_ptr")
    variants = {
        "mask, FAVOR+": dict(KIND=0, LOGIT=False, MASK=True, NORM=0, M2_P=16),
        "mask, ELU+1, kernel norm": dict(KIND=1, LOGIT=False, MASK=True, NORM=1, M2_P=16),
        "logit, FAVOR+": dict(KIND=0, LOGIT=True, MASK=False, NORM=0, M2_P=RPE_FEATURES),
    }
    records = []
    for variant, flags in variants.items():
        consts = dict(
            BN=fused.BLOCK_N, BA=fused.BLOCK_A, BB=fused.BLOCK_B, D_P=HEAD_DIM, E_P=HEAD_DIM
        )
        consts.update(P=1, **flags)
        kernels = (fused._row_max_kernel, fused._state_kernel, fused._readout_kernel,
                   fused._causal_kernel)  # fmt: skip
        for kernel in kernels:
            own = {k: v for k, v in consts.items() if k in kernel.arg_names}
            signature = {}
            for name in kernel.arg_names:
                if name in own:
                    signature[name] = "constexpr"
                elif name.endswith("_ptr"):
                    signature[name] = "*bf16" if name in halves else pointer.get(name, "*fp32")
                else:
                    signature[name] = "fp32" if name == "scale" else "i32"
            index = {(kernel.arg_names.index(k),): v for k, v in own.items()}
            source = ASTSource(fn=kernel, signature=signature, constexprs=index)
            compiled = triton.compile(source, target=target)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
                handle.write(compiled.asm["cubin"])
                handle.flush()
                text = subprocess.run([tool, "-res-usage", handle.name], capture_output=True,
                                      text=True, check=True).stdout  # fmt: skip
            usage = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", text))
            record = dict(arch=arch, variant=variant, kernel=kernel.fn.__name__)
            record.update(registers=int(usage["REG"]), stack_bytes=int(usage["STACK"]))
            record.update(shared_bytes=compiled.metadata.shared, warps=compiled.metadata.num_warps)
            print(
                f"{variant:>26} {record['kernel']:>16}: {record['registers']} registers, "
                f"{record['stack_bytes']} B stack, {record['shared_bytes']} B shared"
            )
            records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU allowed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=8.0, help="seconds per call")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--compile", metavar="ARCH", help="compile for ARCH (sm_90) and stop")
    args = parser.parse_args(argv)
    if args.compile:
        records = compile_report(args.compile)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(records, handle, indent=1)
        return records
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        parser.error("needs a CUDA GPU (use --quick to check the script on the CPU)")
    sizes = [64, 256] if args.quick else [2**14, 2**16, 2**18, 2**20]
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    records = run(sizes, 1 if args.quick else args.repeats, args.budget, device)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    return records


if __name__ == "__main__":
    main()
