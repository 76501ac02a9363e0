"""Mid-sized M: the CUDA mid-M kernel (tile and K-split variants) against the backends' current
path and cuBLAS bf16.

For the Llama-3-8B shapes (and NxK given) at M = 16, 32, 64, 128, in CUDA graphs over rotating
weights: cuBLAS bf16; W4A16 and W4A4 (quantization included) through the backends' dispatch;
W4A16 through the mid-M kernel at each (M tile, weight rows, splits), "auto" being its own
launch_config; W4A4 as the quant kernel's block values fed to the mid-M kernel (auto config).
Checks the kernel against the Triton kernel on the same weights before timing.

python benchmarks/bench_mid_m.py [--ms 16,64] [--shapes 0,2,1024x4096] [--splits 1,2,4,8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (LLAMA_SHAPES, copies_for, copy_bandwidth_gbs, env_info, fp4_weight_bytes,  # noqa: E402
                     make_fp4_weights, print_table, time_graph_us, write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import triton_gemm as G  # noqa: E402
from fp4_compile.ops.cuda_mid_m import TILES, launch_config, mid_m_gemm  # noqa: E402
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="16,32,64,128")
    ap.add_argument("--shapes", default="0,1,2,3,1024x4096")
    ap.add_argument("--splits", default="1,2,4,8", help="explicit K splits timed besides the auto config")
    args = ap.parse_args()
    info = env_info()
    bw = copy_bandwidth_gbs()
    info["copy_GBps"] = round(bw, 1)
    print(info, flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for si in args.shapes.split(","):  # an index into LLAMA_SHAPES, or NxK
        n, k = map(int, si.split("x")) if "x" in si else LLAMA_SHAPES[int(si)]
        copies = copies_for(fp4_weight_bytes(n, k))
        ws = make_fp4_weights(n, k, copies, MARLIN)
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2))]
        wbytes = fp4_weight_bytes(n, k)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
            alphas = [(1 / gw).float() for _, _, gw in ws]
            alphas44 = [(1 / (gx * gw)).float() for _, _, gw in ws]
            auto = launch_config(m, n, k, sms)
            row = {"shape": f"{n}x{k}", "m": m, "auto": "t{}x{}w{}s{}".format(*auto)}
            wt, wst, _ = ws[0]
            o_mid = mid_m_gemm(x, wt, wst, alphas[0], n=n, out_dtype=torch.float32)
            o_tri = G.fp4_gemm(x, wt, wst, alphas[0], n=n, k=k, a_mode=0, out_dtype=torch.float32,
                               compute_dtype=torch.bfloat16, mode="w4a16")
            row["mid_vs_triton_rel"] = f"{rel(o_mid, o_tri):.1e}"
            row["bf16_us"] = round(time_graph_us([lambda w=w: x @ w.t() for w in bf]), 2)
            row["w4a16_backend_us"] = round(time_graph_us(
                [lambda w=w, a=a: MARLIN.linear(x, w[0], w[1], None, a, None, n) for w, a in zip(ws, alphas)]), 2)
            row["w4a4_backend_us"] = round(time_graph_us(
                [lambda w=w, a=a: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n)
                 for w, a in zip(ws, alphas44)]), 2)
            row["mid_auto_us"] = round(time_graph_us(
                [lambda w=w, a=a: mid_m_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                 for w, a in zip(ws, alphas)]), 2)
            row["w4a4_mid_us"] = round(time_graph_us(
                [lambda w=w, a=a: mid_m_gemm(fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16), w[0], w[1], a, n=n,
                                             out_dtype=torch.bfloat16)
                 for w, a in zip(ws, alphas44)]), 2)
            for tile in TILES:
                m_tile = tile[0]
                if m_tile < min(m, 64) or (m_tile > 16 and m_tile >= 2 * m):
                    continue  # tiles far from M
                for splits in [int(s) for s in args.splits.split(",")]:
                    row["t{}x{}w{}s{}_us".format(*tile, splits)] = round(time_graph_us(
                        [lambda w=w, a=a: mid_m_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16,
                                                     tile=tile, splits=splits)
                         for w, a in zip(ws, alphas)]), 2)
            variants = {key: v for key, v in row.items() if key.startswith("t") and key.endswith("_us")}
            best_key = min(variants, key=variants.get)
            row["best"] = best_key[:-3]
            row["best_us"] = variants[best_key]
            row["best_x"] = round(row["bf16_us"] / row["best_us"], 2)
            row["auto_x"] = round(row["bf16_us"] / row["mid_auto_us"], 2)
            row["w4a16_backend_x"] = round(row["bf16_us"] / row["w4a16_backend_us"], 2)
            row["w4a4_mid_x"] = round(row["bf16_us"] / row["w4a4_mid_us"], 2)
            row["w4a4_backend_x"] = round(row["bf16_us"] / row["w4a4_backend_us"], 2)
            row["best_bw"] = round(wbytes / (row["best_us"] * 1e-6) / 1e9 / bw, 2)
            rows.append(row)
            print(row, flush=True)
        del ws, bf
        torch.cuda.empty_cache()
    path = write_json("bench_mid_m.json", {"env": info, "rows": rows})
    cols = ["shape", "m", "bf16_us", "w4a16_backend_us", "w4a16_backend_x", "mid_auto_us", "auto", "auto_x",
            "best", "best_us", "best_x", "best_bw", "w4a4_backend_us", "w4a4_backend_x", "w4a4_mid_us", "w4a4_mid_x",
            "mid_vs_triton_rel"]
    print_table(rows, cols, title=f"mid M (us per call, CUDA graphs; copy {bw:.0f} GB/s) -> {path}")


if __name__ == "__main__":
    main()
