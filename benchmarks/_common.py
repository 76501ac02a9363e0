"""Shared GPU timing helpers for the benchmarks (CUDA events, CUDA graphs, rotating weights)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (the package's timing helpers, imported by the benchmarks from here)
from fp4_compile.ops.gpu_timing import (capture_graph, copies_for, cuda_events, fp4_weight_bytes,  # noqa: E402,F401
                                        make_fp4_weights, relative_error as rel, rotating_fp4_weights, time_graphs_us)

LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # N x K


def out_dir() -> str | None:
    return os.environ.get("OUT") or None


def write_json(name: str, data) -> str:
    d = out_dir() or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    return path


def time_graph_us(calls, replays: int = 20, warmup: int = 3) -> float:
    """Median time per call (us) of ``calls`` (a list of 0-arg callables) captured in one CUDA graph."""
    return time_graphs_us({"calls": calls}, rounds=1, replays=replays, warmup=warmup)["calls"]


def time_eager_us(calls, reps: int = 10, warmup: int = 2) -> float:
    """Median time per call (us) of running ``calls`` back to back from Python (launch overhead included)."""
    for _ in range(warmup):
        for c in calls:
            c()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = cuda_events()
        a.record()
        for c in calls:
            c()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / len(calls))
    return statistics.median(ts)


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s, 1e9)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = cuda_events()
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1000.0)
    del src, dst
    return nbytes / statistics.median(ts) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time_eager_us([lambda: a @ b], reps=10)
    return 2 * n**3 / (t * 1e-6) / 1e12


def env_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measured_env(tensor_core: bool = True) -> tuple[dict, float, float | None]:
    """The run's environment with its measured floors, printed: (info, copy GB/s, bf16 TFLOP/s or None)."""
    info = env_info()
    bw = copy_bandwidth_gbs()
    info["copy_GBps"] = round(bw, 1)
    tf = None
    if tensor_core:
        tf = matmul_tflops()
        info["bf16_8192_TFLOPs"] = round(tf, 1)
    print(info, flush=True)
    return info, bw, tf


def shape_of(spec: str) -> tuple[int, int]:
    """N, K from a shape argument: an index into LLAMA_SHAPES, or "NxK"."""
    return tuple(map(int, spec.split("x"))) if "x" in spec else LLAMA_SHAPES[int(spec)]


def rotating_weights(n: int, k: int, kernels) -> tuple[list, list]:
    """``rotating_fp4_weights`` and as many bf16 weights [n, k] as rotate through more than L2."""
    bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2))]
    return rotating_fp4_weights(n, k, kernels), bf


def w4a4_decode_calls(x: torch.Tensor, gx: torch.Tensor, ws: list, alphas: list, n: int, quant: str,
                      after_quantization: bool = True, library=None, gemm_library=None) -> list:
    """W4A4 calls at decode sizes as the backend makes them, one per rotating weight: ``quant`` "codes" (the
    CUDA quantization kernel's activation codes), "cuda" or "triton" (the block values of that kernel), then
    the small-M GEMM behind it, launched with ``after_quantization`` (``cuda_small_m.dependent_launch_mode``).
    ``library``: another build of the CUDA quantization kernel (``cuda_quant.load_library``); ``gemm_library``
    another build of the small-M kernel (``cuda_small_m.load_library``)."""
    from fp4_compile.ops import cuda_quant, cuda_small_m, triton_quant

    k = x.shape[1]

    def call(w, a):
        if quant == "codes":
            q, s = cuda_quant.quantize(x, gx, cuda_quant.MODE_KERNEL_CODES, early_trigger=True, library=library)
            return cuda_small_m.small_m_gemm(q, w[0], w[1], a, n=n, out_dtype=torch.bfloat16, x_scale=s, k=k,
                                             after_quantization=after_quantization, library=gemm_library)
        if quant == "triton":
            v = triton_quant.launch_quant_triton(x, gx, cuda_quant.MODE_VALUES, torch.bfloat16, True)
        else:
            v = cuda_quant.quantize(x, gx, cuda_quant.MODE_VALUES, out_dtype=torch.bfloat16, early_trigger=True,
                                    library=library)
        return cuda_small_m.small_m_gemm(v, w[0], w[1], a, n=n, out_dtype=torch.bfloat16,
                                         after_quantization=after_quantization, library=gemm_library)

    return [lambda w=w, a=a: call(w, a) for w, a in zip(ws, alphas)]


def kernel_resources(kernel) -> dict:
    if kernel is None:
        return {}
    return {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None)}


def print_table(rows, cols, title=None):
    if title:
        print(title)
    widths = [max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) + " |")


def python_profile(fn, calls: int = 1, sort: str = "cumulative", lines: int = 18) -> str:
    """The top ``lines`` Python functions (cProfile, sorted by ``sort``) of ``calls`` calls of ``fn``,
    the GPU synchronised before and after: where an eager call spends its host time."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(lines)
    return "\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip())
