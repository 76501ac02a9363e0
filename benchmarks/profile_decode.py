"""Where a decode step's GPU time goes, kernel by kernel: bf16 + Inductor against the NVFP4 models.

Builds the decoder layers of bench_model.py (random weights), compiles the bf16 model with Inductor
and each NVFP4 model (calibrated scales) with backend="fp4", captures one decode step (1 token,
1024-token KV cache) in a CUDA graph, and profiles replays of it (torch.profiler: CUPTI reports
the kernels of a graph replay). Prints, per model: the replay time, the sum of its kernels' times
and the idle time between them, the kernels of the first layer in order (us each, and the gap
before each), the host time of the replay call (``launch_us``: the GPU waits that long before a
step when the host launches it only after the last one finished, as bench_model.py does), and the
time per kernel class summed over the step (the GEMMs, the quantization, attention, the other
Inductor kernels). The step time minus the GEMMs is what bench_model.py's decode ratio cannot
shrink by faster GEMMs. The step is timed as one replay on an idle GPU (``step_us``) and as queued
replays (``queued_step_us``); after the first model's profile the isolated replays of the later models
read 15-35 us high (the profiler stays loaded in the process; bench_model.py's figures and the queued
ones do not show it, NOTES.md v21a).

python benchmarks/profile_decode.py [--layers 4] [--merged] [--backends triton-w4a4,marlin] [--tokens 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402
from bench_model import capture_graph, compile_fp4, decode_inputs, random_stack, replay_time_us  # noqa: E402

import fp4_compile  # noqa: E402

# kernel name fragments -> class (first match wins)
CLASSES = [("quant", ("nvfp4_quant", "quant_kernel", "quantize")), ("gemm", ("nvfp4_small_m", "nvfp4_wgmma", "fp4_gemm", "gemm",
                                                             "nvjet", "cutlass", "sm90_xmma", "splitK", "splitk")),
           ("attention", ("flash", "fmha", "attention", "sdpa")), ("inductor", ("triton_",))]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k.lower() in low for k in keys):
            return cls
    return "other"


def replay_kernels(graph: torch.cuda.CUDAGraph, replays: int) -> list[list[tuple[float, float, str]]]:
    """The kernels (start, end, name) of each of ``replays`` graph replays, in order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    # replays are separated by a host synchronize: split at the largest gaps
    if not kernels:
        return []
    gaps = sorted(range(1, len(kernels)), key=lambda i: kernels[i][0] - kernels[i - 1][1], reverse=True)
    cuts = sorted(gaps[:replays - 1])
    out, start = [], 0
    for c in cuts + [len(kernels)]:
        out.append(kernels[start:c])
        start = c
    return out


def launch_us(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    """Host time of ``graph.replay()`` (cudaGraphLaunch), the GPU idle before each replay."""
    import time

    times = []
    for _ in range(replays):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def summarize(label: str, model: nn.Module, x: torch.Tensor, caches, layers: int, replays: int) -> dict:
    with torch.no_grad():
        graph = capture_graph(model, (x, caches))
        step = replay_time_us(graph)
        step_us = step.isolated_us
        launch = launch_us(graph)
        runs = replay_kernels(graph, replays)
    if not runs:
        print(f"\n{label}: step {step_us:.1f} us; the profiler reported no kernels inside the graph replays")
        return {"model": label, "step_us": round(step_us, 1), "queued_step_us": round(step.queued_us, 1)}
    per_run = []
    for ks in runs:
        busy = sum(e - s for s, e, _ in ks)
        span = ks[-1][1] - ks[0][0]
        by_class: dict[str, float] = {}
        for s, e, name in ks:
            by_class[kernel_class(name)] = by_class.get(kernel_class(name), 0.0) + (e - s)
        per_run.append((span, busy, by_class, len(ks)))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    classes = sorted({c for _, _, bc, _ in per_run for c in bc})
    row = {"model": label, "step_us": round(step_us, 1), "queued_step_us": round(step.queued_us, 1),
           "kernels": per_run[0][3],
           "span_us": round(med([p[0] for p in per_run]), 1), "busy_us": round(med([p[1] for p in per_run]), 1),
           **{f"{c}_us": round(med([p[2].get(c, 0.0) for p in per_run]), 1) for c in classes}}
    row["idle_us"] = round(row["span_us"] - row["busy_us"], 1)
    row["launch_us"] = round(launch, 1)
    print(f"\n{label}: step {row['step_us']} us (graph replay, events; queued replays {row['queued_step_us']}); under the profiler: span {row['span_us']} us, "
          f"kernels {row['busy_us']} us busy, {row['idle_us']} us idle between them, {row['kernels']} kernels; "
          + ", ".join(f"{c} {row[f'{c}_us']}" for c in classes))
    ks = runs[len(runs) // 2]
    per_layer = len(ks) // layers
    print(f"  the first layer's {per_layer} kernels (gap before, us; time, us; class; name):")
    prev_end = ks[0][0]
    for s, e, name in ks[:per_layer]:
        print(f"  {s - prev_end:6.2f} {e - s:7.2f}  {kernel_class(name):9s} {name[:90]}")
        prev_end = e
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--backends", default="triton-w4a4,marlin")
    ap.add_argument("--merged", action="store_true", help="q/k/v and gate/up as one projection each (as vLLM)")
    ap.add_argument("--tokens", type=int, default=1, help="sequences in the decode step (one token each)")
    ap.add_argument("--replays", type=int, default=5)
    args = ap.parse_args()
    base = random_stack(args.layers, args.merged)
    x, caches = decode_inputs(args.tokens, args.layers)
    rows = [summarize("bf16 (inductor)", torch.compile(base, backend="inductor"), x, caches, args.layers, args.replays)]
    torch._dynamo.reset()
    for backend in args.backends.split(","):
        q = copy.deepcopy(base)
        fp4_compile.quantize_model(q, backend=backend, calibration_data=[(x, caches)], progress=False)
        model, _ = compile_fp4(q)
        rows.append(summarize(f"nvfp4 {backend}", model, x, caches, args.layers, args.replays))
        del q, model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    name = f"profile_decode{'_merged' if args.merged else ''}_{args.tokens}.json"
    print(f"\nwrote {write_json(name, {'layers': args.layers, 'merged': args.merged, 'rows': rows})}")
    cols = sorted({k for r in rows for k in r if k.endswith("_us")})
    print("| model | " + " | ".join(cols) + " |")
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(str(r.get(c, 0.0)) for c in cols) + " |")


if __name__ == "__main__":
    main()
