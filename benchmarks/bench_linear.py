"""NVFP4 linear on Hopper: cuBLAS bf16 vs naive emulation vs our W4A4 (fused) and W4A16 (marlin).

Llama-3-8B shapes N x K at M = 1, 16, 64, 128, 1024, 4096. Each method runs inside one CUDA
graph over rotating weight copies (> 200 MB, nothing stays in L2), median of replays, time per
call; the three graphs of a cell are replayed in turns, so that clock drift under sustained load
hits them alike; eager time too (through torch.ops.fp4.linear, as the layers call it; same rotation). Weight-byte bandwidth is NVFP4 weight +
scale bytes over time, against the measured device copy bandwidth (bytes read + written).

Every call of a cell reads the same activations x (in L2 from call to call where it fits, as a layer's input
just written by the kernel before would be); ``--rotate-x`` gives each call its own (NOTES.md v40f: the same
times within run-to-run noise at M = 1024 and 4096).

python benchmarks/bench_linear.py [--ms 1,16,...] [--shapes 0,1,2,3] [--no-eager] [--no-emulation] [--rotate-x]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (LLAMA_SHAPES, fp4_weight_bytes, kernel_resources, measured_env, print_table,  # noqa: E402
                     rotating_weights, time_eager_us, time_graphs_us, write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import triton_gemm as G  # noqa: E402
from fp4_compile.ops.cuda_small_m import launch_config as small_m_launch_config  # noqa: E402
from fp4_compile.ops.cuda_small_m import use_codes, use_small_m  # noqa: E402
from fp4_compile.ops.cuda_wgmma import device_launch_config as wgmma_launch_config  # noqa: E402
from fp4_compile.ops.cuda_wgmma import use_wgmma  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402

MS = [1, 16, 64, 128, 1024, 4096]


def emulation_linear(x, pw, sw, gw, gx):
    """Naive: quantize-dequantize x, dequantize the weight, bf16 matmul (pure torch, format.py)."""
    xq = F.dequantize_nvfp4(*F.quantize_nvfp4(x, gx), gx, dtype=x.dtype)
    w = F.dequantize_nvfp4(pw, sw, gw, dtype=x.dtype)
    return xq @ w.t()


def geomean(v):
    v = [a for a in v if a and a > 0]
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--no-emulation", action="store_true")
    ap.add_argument("--rotate-x", action="store_true",
                    help="each call of a graph its own activations too (else every call reads the same x, which "
                         "stays in L2 from call to call where it fits, as a layer's input just written does)")
    args = ap.parse_args()
    info, bw, tf = measured_env()
    rows = []
    for si in args.shapes.split(","):
        n, k = LLAMA_SHAPES[int(si)]
        ws, wb = rotating_weights(n, k, TRITON_W4A4)
        pw0, sw0 = TRITON_W4A4.restore_weight(ws[0][0], ws[0][1], n, k)
        for m in [int(v) for v in args.ms.split(",")]:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                  for _ in range(max(len(ws), len(wb)) if args.rotate_x else 1)]
            x = xs[0]
            gx = F.global_scale_from_amax(torch.stack([v.float().abs().amax() for v in xs]).amax()).reshape(1)
            alphas = [(1 / (gx * gw)).float() for _, _, gw in ws]
            inv_gw = [(1 / gw).float() for _, _, gw in ws]
            bf16 = [lambda w=w, x=xs[i % len(xs)]: x @ w.t() for i, w in enumerate(wb)]
            w4a4 = [lambda w=w, a=a, x=xs[i % len(xs)]: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n)
                    for i, (w, a) in enumerate(zip(ws, alphas))]
            w4a16 = [lambda w=w, a=a, x=xs[i % len(xs)]: MARLIN.linear(x, w[0], w[1], None, a, None, n)
                     for i, (w, a) in enumerate(zip(ws, inv_gw))]
            r = {"shape": f"{n}x{k}", "n": n, "k": k, "m": m}
            times = time_graphs_us({"bf16": bf16, "w4a4": w4a4, "w4a16": w4a16})  # in turns: same clocks
            r.update({f"{key}_us": t for key, t in times.items()})
            if not args.no_eager:  # through the op, as layers call it (its eager fast path included)
                r["bf16_eager_us"] = time_eager_us(bf16)
                r["w4a4_eager_us"] = time_eager_us(
                    [lambda w=w, a=a: torch.ops.fp4.linear(x, w[0], w[1], gx, a, None, n, TRITON_W4A4.name)
                     for w, a in zip(ws, alphas)])
                r["w4a16_eager_us"] = time_eager_us(
                    [lambda w=w, a=a: torch.ops.fp4.linear(x, w[0], w[1], w[2], a, None, n, MARLIN.name)
                     for w, a in zip(ws, inv_gw)])
            if not args.no_emulation and m <= 128:
                gw0 = ws[0][2]
                r["emul_eager_us"] = time_eager_us([lambda: emulation_linear(x, pw0, sw0, gw0, gx)], reps=5)
            wbytes = fp4_weight_bytes(n, k)
            flops = 2 * m * n * k
            for key in ("w4a4", "w4a16"):
                t = r[f"{key}_us"]
                r[f"{key}_x"] = round(r["bf16_us"] / t, 3)
                r[f"{key}_wGBps"] = round(wbytes / (t * 1e-6) / 1e9, 1)
                r[f"{key}_bw_frac"] = round(wbytes / (t * 1e-6) / 1e9 / bw, 3)
                r[f"{key}_TFLOPs"] = round(flops / (t * 1e-6) / 1e12, 1)
                r[f"{key}_tc_frac"] = round(flops / (t * 1e-6) / 1e12 / tf, 3)
                kmode = key if (key == "w4a16" or m <= G.FUSED_QUANT_MAX_M) else "w4a4+pq"
                codes = key == "w4a4" and use_codes(x, m, n)
                if codes or use_small_m(x, m, n):
                    rows_per_warp, stages, warps = small_m_launch_config(m, n, k, codes=codes)
                    r[f"{key}_cfg"] = f"CUDA small-M{' codes' if codes else ''} r{rows_per_warp} s{stages} w{warps}"
                elif use_wgmma(ws[0][0], m, after_quantization=key == "w4a4"):
                    r[f"{key}_cfg"] = "CUDA wgmma " + wgmma_launch_config(m, n, k, 0).label
                elif G.use_dequant(kmode, m, n, k):
                    r[f"{key}_cfg"] = "dequant+cuBLAS"
                else:
                    cfg = G.pick_config(kmode, m, n, k, x.device)
                    r[f"{key}_cfg"] = (f"BM{cfg.BM} BN{cfg.BN} BK{cfg.BK} S{cfg.SPLIT_K} w{cfg.num_warps} "
                                       f"s{cfg.num_stages}{'' if cfg.DOT else ' fma'}")
            r["bf16_wGBps"] = round(n * k * 2 / (r["bf16_us"] * 1e-6) / 1e9, 1)
            r["bf16_TFLOPs"] = round(flops / (r["bf16_us"] * 1e-6) / 1e12, 1)
            # kernel resources of the GEMM the linear ran (same config, same compiled kernel)
            for key in ("w4a4", "w4a16"):
                fused = key == "w4a4" and m <= G.FUSED_QUANT_MAX_M
                kmode = key if (key == "w4a16" or fused) else "w4a4+pq"
                if (G.use_dequant(kmode, m, n, k) or use_small_m(x, m, n) or (key == "w4a4" and use_codes(x, m, n))
                        or use_wgmma(ws[0][0], m, after_quantization=key == "w4a4")):
                    continue  # (the CUDA kernels' registers: nvcc -Xptxas -v, tests/test_cuda_*.py)
                cdt = torch.float16 if key == "w4a4" else torch.bfloat16
                _, kh = G.fp4_gemm(x if fused else x.to(cdt), ws[0][0], ws[0][1], alphas[0], n=n, k=k,
                                   a_mode=1 if fused else 0, out_dtype=x.dtype, global_scale=gx, mode=kmode,
                                   compute_dtype=cdt, return_kernel=True)
                res = kernel_resources(kh)
                r[f"{key}_regs"], r[f"{key}_spills"] = res.get("n_regs"), res.get("n_spills")
            for kk, v in list(r.items()):
                if kk.endswith("_us"):
                    r[kk] = round(v, 2)
            rows.append(r)
            print(r, flush=True)
            write_json("bench_linear.json", {"env": info, "rows": rows})
        del ws, wb
        torch.cuda.empty_cache()
    # bars
    summary = {}
    for key in ("w4a4", "w4a16"):
        small = [r[f"{key}_x"] for r in rows if r["m"] <= 16]
        summary[key] = {
            "M<=16 geomean x": round(geomean(small), 3) if small else None,
            "M<=16 min x": min(small) if small else None,
            "M=1 bw_frac (28672x4096, 4096x14336)": [r[f"{key}_bw_frac"] for r in rows
                                                     if r["m"] == 1 and r["shape"] in ("28672x4096", "4096x14336")],
            "M=64 min x": min([r[f"{key}_x"] for r in rows if r["m"] == 64], default=None),
            "M=128 min x": min([r[f"{key}_x"] for r in rows if r["m"] == 128], default=None),
            "M>=1024 min x": min([r[f"{key}_x"] for r in rows if r["m"] >= 1024], default=None),
        }
    path = write_json("bench_linear.json", {"env": info, "rows": rows, "summary": summary})
    print(f"wrote {path}")
    print("summary:", summary)
    print_table(rows, ["shape", "m", "bf16_us", "emul_eager_us", "w4a4_us", "w4a4_x", "w4a16_us", "w4a16_x",
                       "w4a4_bw_frac", "w4a16_bw_frac", "w4a4_tc_frac", "w4a16_tc_frac", "bf16_eager_us",
                       "w4a4_eager_us", "w4a16_eager_us", "w4a4_regs", "w4a4_spills", "w4a16_regs", "w4a16_spills",
                       "w4a4_cfg", "w4a16_cfg"],
                f"NVFP4 linear, {info['gpu']}, copy {bw:.0f} GB/s, bf16 {tf:.0f} TFLOP/s "
                "(graph times over rotating weights, us; x = speedup over cuBLAS bf16)")
    _ = time


if __name__ == "__main__":
    main()
