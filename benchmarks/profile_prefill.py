"""Where the NVFP4 prefill time goes: eager call vs CUDA-graph replay, and the top kernels.

Builds the decoder layers of bench_model.py (random weights), compiles the bf16 model with
Inductor and the NVFP4 model (triton-w4a4, calibrated scales) with backend="fp4", and for a
2048-token prefill prints: the eager time of one call, the time of the same call replayed
in a CUDA graph (GPU time without launch overhead), the kernel launches per call and the
top kernels by GPU time. Usage: python benchmarks/profile_prefill.py [--layers 2] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import python_profile  # noqa: E402
from bench_model import D, compile_fp4, graph_time_us, random_stack  # noqa: E402

import fp4_compile  # noqa: E402


def eager_us(fn, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def profile(fn, label: str) -> int:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in events)
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print(f"\n{label}: {launches} kernel launches per call; top kernels by GPU time (us):")
    for e in sorted(events, key=lambda e: -getattr(e, key))[:10]:
        print(f"  {getattr(e, key):9.1f}  x{e.count:<3d} {e.key[:100]}")
    # where the GPU waits for the host: idle time between consecutive kernels of the eager call
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    gaps = [(b[0] - a[1], a[2], b[2]) for a, b in zip(kernels, kernels[1:]) if b[0] > a[1]]
    print(f"GPU idle between kernels: {sum(g for g, _, _ in gaps):.0f} us in {len(gaps)} gaps; the largest (us, after -> before):")
    for g, after, before in sorted(gaps, reverse=True)[:8]:
        print(f"  {g:8.1f}  {after[:60]} -> {before[:60]}")
    return launches


def host_profile(fn, label: str) -> None:
    """Host time of one eager call (until it returns, before the GPU finishes) and its top Python
    functions: where an eager prefill is bound by launch overhead."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e6
    print(f"{label}: host {host:.0f} us per call (without the profiler); top Python functions by own time:")
    print(python_profile(fn, sort="tottime", lines=15))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    base = random_stack(args.layers)
    x = torch.randn(1, args.tokens, D, device="cuda", dtype=torch.bfloat16)
    rows = []
    with torch.no_grad():
        models = [("bf16 inductor", torch.compile(base, backend="inductor"))]
        quant = copy.deepcopy(base)
        fp4_compile.quantize_model(quant, backend="triton-w4a4", calibration_data=[(x,)], progress=False)
        models.append(("nvfp4 triton-w4a4 fp4", compile_fp4(quant)[0]))
        for label, model in models:
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            eager = eager_us(lambda: model(x))
            graph = graph_time_us(model, (x,), replays=10).isolated_us
            launches = profile(lambda: model(x), label)
            host_profile(lambda: model(x), label)
            rows.append((label, eager, graph, launches))
            torch._dynamo.reset()
    print(f"\nprefill of {args.tokens} tokens through {args.layers} layers, {torch.cuda.get_device_name()}")
    print("| model | eager us | CUDA graph us | launches | eager - graph us |")
    print("|---|---|---|---|---|")
    for label, eager, graph, launches in rows:
        print(f"| {label} | {eager:.0f} | {graph:.0f} | {launches} | {eager - graph:.0f} |")
    if len(rows) == 2:
        print(f"NVFP4/bf16 speed: eager {rows[0][1] / rows[1][1]:.2f}x, CUDA graph {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
