"""Programmatic dependent launch (ops/pdl.py) off and on, through the backends' linears.

For the Llama-3-8B shapes at several M: W4A4 (quantization + GEMM) and W4A16 linears back to
back over rotating weights in one CUDA graph, with FP4C_PDL=0 and FP4C_PDL=1 alternating three
times (medians), and the ratio. Whatever kernel the backends dispatch to at that M is what runs
(small-M kernel, Triton, wgmma, dequantize + cuBLASLt).

python benchmarks/bench_pdl.py [--ms 1,16,64,128,1024] [--shapes 0,1,2,3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (measured_env, print_table, rotating_fp4_weights, shape_of, time_graph_us,  # noqa: E402
                     write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16,64,128,1024")
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    info, _, _ = measured_env(tensor_core=False)
    rows = []
    for si in args.shapes.split(","):
        n, k = shape_of(si)
        ws = rotating_fp4_weights(n, k, MARLIN)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
            alphas44 = [(1 / (gx * w[2])).float() for w in ws]
            alphas = [(1 / w[2]).float() for w in ws]
            calls = {
                "w4a4": [lambda w=w, a=a: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n)
                         for w, a in zip(ws, alphas44)],
                "w4a16": [lambda w=w, a=a: MARLIN.linear(x, w[0], w[1], None, a, None, n) for w, a in zip(ws, alphas)],
            }
            row = {"shape": f"{n}x{k}", "m": m}
            for name, fns in calls.items():
                times = {"0": [], "1": []}
                for _ in range(args.repeats):
                    for pdl in ("0", "1"):
                        os.environ["FP4C_PDL"] = pdl
                        times[pdl].append(time_graph_us(fns))
                for pdl in ("0", "1"):
                    row[f"{name}_pdl{pdl}_us"] = round(statistics.median(times[pdl]), 2)
                row[f"{name}_ratio"] = round(row[f"{name}_pdl1_us"] / row[f"{name}_pdl0_us"], 3)
            os.environ.pop("FP4C_PDL")
            rows.append(row)
            print(row, flush=True)
        del ws
        torch.cuda.empty_cache()
    path = write_json("bench_pdl.json", {"env": info, "rows": rows})
    cols = ["shape", "m", "w4a4_pdl0_us", "w4a4_pdl1_us", "w4a4_ratio", "w4a16_pdl0_us", "w4a16_pdl1_us", "w4a16_ratio"]
    print_table(rows, cols, title=f"PDL off / on (us per linear, CUDA graphs; ratio = on / off) -> {path}")


if __name__ == "__main__":
    main()
