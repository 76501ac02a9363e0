"""The CUDA wgmma kernel (tile and K-split variants) against the backends' dispatch and cuBLAS bf16.

For the Llama-3-8B shapes (and NxK given) at M = 16 .. 4096, in CUDA graphs over rotating weights
(each M's activations stay the same across the rotation, as in bench_linear): cuBLAS bf16; W4A16
through the backends' dispatch; W4A16 as the weight dequantized to bf16 + cuBLASLt (the large-M
path, "dequant"); W4A16 through the wgmma kernel at its own launch_config ("auto")
and at each (tile, splits, split reduction: "w" = through global memory); W4A4 as the quantization kernel's block values fed to the wgmma kernel.
Each variant is checked against the float64 product before it is timed.

python benchmarks/bench_wgmma.py [--ms 64,128] [--shapes 0,2,1024x4096] [--splits 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (fp4_weight_bytes, measured_env, print_table, rel, rotating_weights, shape_of,  # noqa: E402
                     time_graph_us, write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import cuda_wgmma  # noqa: E402
from fp4_compile.ops.triton_gemm import dequant_mm  # noqa: E402
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="16,32,64,128,256,1024,4096")
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--splits", default="1,2,4,8", help="K splits timed for each tile (large M: 1 only)")
    args = ap.parse_args()
    info, bw, tf = measured_env()
    info["cluster_ctas"] = cuda_wgmma.cluster_ctas(0)
    print("CTAs of the kernel that fit at once, per K split (cluster size):", info["cluster_ctas"], flush=True)
    rows = []
    for si in args.shapes.split(","):
        n, k = shape_of(si)
        ws, bf = rotating_weights(n, k, MARLIN)
        wv0 = F.block_values(*MARLIN.restore_weight(ws[0][0], ws[0][1], n, k)).double()
        wbytes = fp4_weight_bytes(n, k)
        alphas = [(1 / gw).float() for _, _, gw in ws]
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
            alphas44 = [(1 / (gx * gw)).float() for _, _, gw in ws]
            ref = x.double() @ wv0.t() * alphas[0].double()
            auto = cuda_wgmma.device_launch_config(m, n, k, 0)
            row = {"shape": f"{n}x{k}", "m": m, "auto": auto.label}
            row["bf16_us"] = round(time_graph_us([lambda w=w: x @ w.t() for w in bf]), 2)
            row["w4a16_backend_us"] = round(time_graph_us(
                [lambda w=w, a=a: MARLIN.linear(x, w[0], w[1], None, a, None, n) for w, a in zip(ws, alphas)]), 2)
            row["dequant_us"] = round(time_graph_us(
                [lambda w=w, a=a: dequant_mm(x, w[0], w[1], a, n=n, k=k, out_dtype=torch.bfloat16)
                 for w, a in zip(ws, alphas)]), 2)
            row["w4a4_backend_us"] = round(time_graph_us(
                [lambda w=w, a=a: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n)
                 for w, a in zip(ws, alphas44)]), 2)
            out = cuda_wgmma.wgmma_gemm(x, ws[0][0], ws[0][1], alphas[0], n=n, out_dtype=torch.float32)
            row["auto_rel"] = f"{rel(out, ref):.1e}"
            row["wgmma_auto_us"] = round(time_graph_us(
                [lambda w=w, a=a: cuda_wgmma.wgmma_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                 for w, a in zip(ws, alphas)]), 2)
            row["w4a4_wgmma_us"] = round(time_graph_us(
                [lambda w=w, a=a: cuda_wgmma.wgmma_gemm(fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16), w[0], w[1],
                                                        a, n=n, out_dtype=torch.bfloat16)
                 for w, a in zip(ws, alphas44)]), 2)
            worst = 0.0
            splits_timed = [int(s) for s in args.splits.split(",")]
            for cfg in cuda_wgmma.launch_configs(k, cuda_wgmma.cluster_ctas(0)):
                if cfg.bn > max(32, 2 * m) or (m >= 512 and cfg.bn < 128) or cfg.splits not in splits_timed:
                    continue  # tiles far from M
                if m >= 2048 and cfg.splits > 1:
                    continue
                opts = dict(tile=(cfg.bn, cfg.wm), splits=cfg.splits, workspace=cfg.workspace)
                out = cuda_wgmma.wgmma_gemm(x, ws[0][0], ws[0][1], alphas[0], n=n, out_dtype=torch.float32, **opts)
                worst = max(worst, rel(out, ref))
                row[f"{cfg.label}_us"] = round(time_graph_us(
                    [lambda w=w, a=a: cuda_wgmma.wgmma_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16, **opts)
                     for w, a in zip(ws, alphas)]), 2)
            row["variants_worst_rel"] = f"{worst:.1e}"
            variants = {key: v for key, v in row.items() if key.startswith("t") and key.endswith("_us")}
            best_key = min(variants, key=variants.get)
            row["best"] = best_key[:-3]
            row["best_us"] = variants[best_key]
            for key in ("w4a16_backend", "dequant", "w4a4_backend", "wgmma_auto", "w4a4_wgmma", "best"):
                row[f"{key}_x"] = round(row["bf16_us"] / row[f"{key}_us"], 2)
            row["best_bw"] = round(wbytes / (row["best_us"] * 1e-6) / 1e9 / bw, 2)
            row["best_tflops"] = round(2 * m * n * k / (row["best_us"] * 1e-6) / 1e12, 1)
            rows.append(row)
            print(row, flush=True)
        del ws, bf
        torch.cuda.empty_cache()
    path = write_json("bench_wgmma.json", {"env": info, "rows": rows})
    cols = ["shape", "m", "bf16_us", "w4a16_backend_us", "w4a16_backend_x", "dequant_x", "wgmma_auto_us", "auto",
            "wgmma_auto_x",
            "best", "best_us", "best_x", "best_tflops", "w4a4_backend_x", "w4a4_wgmma_x", "auto_rel",
            "variants_worst_rel"]
    print_table(rows, cols, title=f"wgmma kernel (us per call, CUDA graphs; copy {bw:.0f} GB/s, "
                                  f"bf16 8192^3 {tf:.0f} TFLOP/s) -> {path}")


if __name__ == "__main__":
    main()
