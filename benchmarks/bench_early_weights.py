"""The small-M GEMM's first weight loads before its PDL wait (``cuda_small_m.dependent_launch_mode``), off and on.

W4A4 calls as the backend makes them at decode sizes, in CUDA graphs over rotating weights replayed in turns:
the quantization kernel (block values at M=1: Triton, as graphs take it, and CUDA, as eager calls take it;
codes at M = 8..16) and the small-M GEMM behind it, launched with ``after_quantization`` False (pdl 1) and True
(pdl 2; the kernel takes it on codes at M > 8). The outputs of both are checked bit-equal first.

python benchmarks/bench_early_weights.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (measured_env, print_table, rotating_fp4_weights, time_graphs_us, w4a4_decode_calls,  # noqa: E402
                     write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402

CASES = [(4096, 14336, 1), (28672, 4096, 1), (4096, 4096, 1), (6144, 4096, 1),
         (4096, 4096, 16), (6144, 4096, 16), (4096, 14336, 16), (4096, 4096, 8), (28672, 4096, 8)]


def main() -> None:
    info, _, _ = measured_env(tensor_core=False)
    rows = []
    for n, k, m in CASES:
        ws = rotating_fp4_weights(n, k, MARLIN)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        alphas = [(1 / (gx * gw)).float() for _, _, gw in ws]
        quants = ("triton", "cuda") if m == 1 else ("codes",)
        calls = {f"{q}_{when}": w4a4_decode_calls(x, gx, ws, alphas, n, q, after_quantization=when == "early")
                 for q in quants for when in ("wait", "early")}
        first = {name: fns[0]() for name, fns in calls.items()}
        torch.cuda.synchronize()
        bits_equal = all(torch.equal(first[f"{q}_wait"], first[f"{q}_early"]) for q in quants)
        times = time_graphs_us(calls, rounds=6, replays=5)
        row = {"case": f"{n}x{k} M={m}", "bits_equal": bits_equal}
        for q in quants:
            row[f"{q}_wait_us"], row[f"{q}_early_us"] = round(times[f"{q}_wait"], 2), round(times[f"{q}_early"], 2)
            row[f"{q}_ratio"] = round(times[f"{q}_early"] / times[f"{q}_wait"], 3)
        rows.append(row)
        print(row, flush=True)
        del ws
        torch.cuda.empty_cache()
    path = write_json("bench_early_weights.json", {"env": info, "rows": rows})
    cols = ["case", "bits_equal"] + [f"{q}_{c}" for q in ("triton", "cuda", "codes") for c in ("wait_us", "early_us",
                                                                                               "ratio")]
    print_table(rows, cols, title=f"weights before the PDL wait, us (ratio = early / wait), {info['gpu']} -> {path}")


if __name__ == "__main__":
    main()
