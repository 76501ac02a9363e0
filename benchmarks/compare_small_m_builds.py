"""A/B/C of small-M kernel builds (decode variants) in one process, alternating."""
import os, pathlib, statistics, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import torch
from _common import rotating_weights, time_graph_us
from fp4_compile.ops import cuda_small_m
from fp4_compile.ops.hopper import MARLIN
variants = {v: pathlib.Path(__file__).resolve().parent / f"sm_{v}.cu" for v in sys.argv[1].split(",")}
cases = [tuple(int(a) for a in c.split("x")) for c in sys.argv[2].split(",")]
for n, k, m in cases:
    ws, _ = rotating_weights(n, k, MARLIN)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    alphas = [(1 / gw).float() for _, _, gw in ws]
    times = {v: [] for v in variants}
    for _ in range(3):
        for v, src in variants.items():
            cuda_small_m.SOURCE = src
            cuda_small_m._library.cache_clear()
            times[v].append(time_graph_us([lambda w=w, a=a: cuda_small_m.small_m_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                                           for w, a in zip(ws, alphas)]))
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med[next(iter(variants))]
    print(f"{n}x{k}x{m}: " + "  ".join(f"{v} {med[v]:.2f} ({med[v]/base:.3f})" for v in variants), flush=True)
    del ws
    torch.cuda.empty_cache()
