"""Decode-sized M: the CUDA small-M kernel against the Triton kernels and cuBLAS bf16.

For the Llama-3-8B shapes at M = 1, 2, 4, 8, 16, in CUDA graphs over rotating weights:
- cuBLAS bf16;
- W4A16 through Triton, through the CUDA kernel at each variant (rows per warp, stages, warps per
  CTA, L2 prefetch bytes of the weight loads), and through the backend's own dispatch; from M = 9 also
  the CUDA kernel at its launch rule against the wgmma kernel, the two choices of eager calls there, with
  the eager dispatch's pick;
- W4A4 linear (quantization included) through Triton, through the backend, and through the CUDA
  kernel on the activations' block values (bf16) or on their codes (``MODE_KERNEL_CODES``).
Checks that the CUDA and Triton outputs agree before timing. The floor under these times (a kernel that only
reads the weight's bytes): ``bench_read_floor.py``.

python benchmarks/bench_small_m.py [--ms 1,16] [--shapes 0,2,1024x4096] [--no-variants]
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
from fp4_compile.ops import hopper  # noqa: E402
from fp4_compile.ops import triton_gemm as G  # noqa: E402
from fp4_compile.ops.cuda_small_m import CODES_MIN_M, DISPATCH_MAX_M, small_m_gemm  # noqa: E402
from fp4_compile.ops import cuda_wgmma  # noqa: E402
from fp4_compile.ops import cuda_quant  # noqa: E402
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402

# (rows per warp, stages, warps, L2 prefetch bytes); 1 and 2 warps: the launch rule's picks at large N, and the
# H200's faster choice at 28672x4096 (NOTES.md v44e)
VARIANTS = [(16, 2, 4, 0), (16, 2, 8, 0), (16, 2, 4, 64), (16, 2, 8, 64), (16, 2, 1, 128), (16, 2, 2, 128),
            (16, 2, 4, 128), (16, 2, 8, 128), (16, 2, 6, 128), (16, 4, 4, 128), (16, 2, 4, 256), (32, 2, 4, 128),
            (32, 2, 8, 128)]


# warps per CTA to time the W4A4 kernel on activation codes at (M >= CODES_MIN_M), besides the launch rule's pick
CODES_WARPS = (1, 2, 4, 8)


def variant_key(rpw: int, stages: int, warps: int, prefetch: int) -> str:
    return f"w4a16_cuda_r{rpw}s{stages}w{warps}p{prefetch}_us"



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--no-variants", action="store_true", help="skip the W4A16 launch-configuration variants")
    args = ap.parse_args()
    variants = [] if args.no_variants else VARIANTS
    info, bw, _ = measured_env(tensor_core=False)
    rows = []
    for si in args.shapes.split(","):
        n, k = shape_of(si)
        ws, bf = rotating_weights(n, k, MARLIN)
        wbytes = fp4_weight_bytes(n, k)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
            alphas = [(1 / gw).float() for _, _, gw in ws]
            alphas44 = [(1 / (gx * gw)).float() for _, _, gw in ws]
            row = {"shape": f"{n}x{k}", "m": m}
            # agreement first (same weight copy, fp32-accumulated both ways)
            wt, wst, _ = ws[0]
            o_cuda = small_m_gemm(x, wt, wst, alphas[0], n=n, out_dtype=torch.float32)
            o_tri = G.fp4_gemm(x, wt, wst, alphas[0], n=n, k=k, a_mode=0, out_dtype=torch.float32,
                               compute_dtype=torch.bfloat16, mode="w4a16")
            row["w4a16_cuda_vs_triton_rel"] = f"{rel(o_cuda, o_tri):.1e}"
            row["bf16_us"] = round(time_graph_us([lambda w=w: x @ w.t() for w in bf]), 2)
            row["w4a16_triton_us"] = round(time_graph_us(
                [lambda w=w, a=a: G.fp4_gemm(x, w[0], w[1], a, n=n, k=k, a_mode=0, out_dtype=torch.bfloat16,
                                             compute_dtype=torch.bfloat16, mode="w4a16")
                 for w, a in zip(ws, alphas)]), 2)
            for rpw, stages, warps, prefetch in variants:
                if stages == 4 and m > 8:
                    continue
                row[variant_key(rpw, stages, warps, prefetch)] = round(time_graph_us(
                    [lambda w=w, a=a: small_m_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16,
                                                   rows_per_warp=rpw, stages=stages, warps=warps,
                                                   prefetch=prefetch)
                     for w, a in zip(ws, alphas)]), 2)
            # the backends' own dispatch (CUDA kernel where it wins, else Triton)
            row["w4a16_backend_us"] = round(time_graph_us(
                [lambda w=w, a=a: MARLIN.linear(x, w[0], w[1], None, a, None, n) for w, a in zip(ws, alphas)]), 2)
            row["w4a4_backend_us"] = round(time_graph_us(
                [lambda w=w, a=a: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n)
                 for w, a in zip(ws, alphas44)]), 2)
            # programmatic dependent launch (ops/pdl.py) off and on: W4A4 = the quantization and
            # the GEMM, W4A16 = GEMMs back to back
            for pdl in ("0", "1"):
                os.environ["FP4C_PDL"] = pdl
                row[f"w4a4_pdl{pdl}_us"] = round(time_graph_us(
                    [lambda w=w, a=a: small_m_gemm(fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16), w[0], w[1], a,
                                                   n=n, out_dtype=torch.bfloat16)
                     for w, a in zip(ws, alphas44)]), 2)
                row[f"w4a16_pdl{pdl}_us"] = round(time_graph_us(
                    [lambda w=w, a=a: small_m_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                     for w, a in zip(ws, alphas)]), 2)
            os.environ.pop("FP4C_PDL")
            # W4A4 on the activations' codes: equal to the block-value path (the same products, scaled
            # by 2^-8, summed in the same order)
            def w4a4_codes(w, a, warps=None):
                xq, xs = cuda_quant.quantize(x, gx, cuda_quant.MODE_KERNEL_CODES, early_trigger=True)
                return small_m_gemm(xq, w[0], w[1], a, n=n, out_dtype=torch.bfloat16, x_scale=xs, k=k, warps=warps)
            o_values = small_m_gemm(fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16), wt, wst, alphas44[0], n=n,
                                    out_dtype=torch.bfloat16)
            row["w4a4_codes_equal_values"] = bool(torch.equal(w4a4_codes(ws[0], alphas44[0]), o_values))
            row["w4a4_codes_us"] = round(time_graph_us(
                [lambda w=w, a=a: w4a4_codes(w, a) for w, a in zip(ws, alphas44)]), 2)
            for warps in CODES_WARPS if variants and m >= CODES_MIN_M else ():
                row[f"w4a4_codes_w{warps}_us"] = round(time_graph_us(
                    [lambda w=w, a=a: w4a4_codes(w, a, warps) for w, a in zip(ws, alphas44)]), 2)
            # eager W4A16 at M = 9..16 (cuda_wgmma.use_wgmma, host-bound): the fast path replays either
            # kernel at the same host cost, so their GPU times decide (NOTES.md v46b)
            if m > DISPATCH_MAX_M and cuda_wgmma.unavailable_reason(torch.cuda.current_device()) is None:
                row["w4a16_small_m_us"] = round(time_graph_us(
                    [lambda w=w, a=a: small_m_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                     for w, a in zip(ws, alphas)]), 2)
                row["w4a16_wgmma_us"] = round(time_graph_us(
                    [lambda w=w, a=a: cuda_wgmma.wgmma_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                     for w, a in zip(ws, alphas)]), 2)
                row["w4a16_eager_pick"] = "wgmma" if cuda_wgmma.use_wgmma(wt, m, host_bound=True) else "small_m"
            use, use_codes = hopper.use_small_m, hopper.use_codes
            hopper.use_small_m = hopper.use_codes = lambda *a: False
            try:
                row["w4a4_triton_us"] = round(time_graph_us(
                    [lambda w=w, a=a: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n)
                     for w, a in zip(ws, alphas44)]), 2)
            finally:
                hopper.use_small_m, hopper.use_codes = use, use_codes
            best = min([v for key, v in row.items() if key.startswith("w4a16_cuda_r") and key.endswith("_us")]
                       + [row["w4a16_backend_us"]])
            row["w4a16_best_x"] = round(row["bf16_us"] / best, 2)
            row["w4a16_best_bw"] = round(wbytes / (best * 1e-6) / 1e9 / bw, 2)
            row["w4a4_backend_x"] = round(row["bf16_us"] / row["w4a4_backend_us"], 2)
            rows.append(row)
            print(row, flush=True)
        del ws, bf
        torch.cuda.empty_cache()
    path = write_json("bench_small_m.json", {"env": info, "rows": rows})
    cols = ["shape", "m", "bf16_us", "w4a16_triton_us",
            *[variant_key(*v) for v in variants], "w4a16_best_x", "w4a16_best_bw",
            "w4a4_triton_us", "w4a4_backend_us", "w4a4_backend_x", "w4a4_pdl0_us", "w4a4_pdl1_us", "w4a4_codes_us",
            *[f"w4a4_codes_w{w}_us" for w in (CODES_WARPS if variants else ())], "w4a4_codes_equal_values",
            "w4a16_pdl0_us", "w4a16_pdl1_us", "w4a16_small_m_us", "w4a16_wgmma_us", "w4a16_eager_pick",
            "w4a16_cuda_vs_triton_rel"]
    print_table(rows, cols, title=f"small M (us per call, CUDA graphs; copy {bw:.0f} GB/s) -> {path}")


if __name__ == "__main__":
    main()
