"""Probe: mid-M (32..256) W4A16/W4A4 as weight dequantized into an L2-resident bf16 scratch + cuBLAS.
Not in the tree. Times in graphs over rotating weights, in turns."""
import os, sys, json
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../benchmarks"))
from _common import LLAMA_SHAPES, measured_env, rotating_weights, time_graphs_us, write_json
from fp4_compile import format as F
from fp4_compile.ops import triton_gemm as G, cublaslt, cuda_quant
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4
from fp4_compile.ops.triton_launch import launch_triton
from fp4_compile.ops.triton_quant import cdiv

def dequant_into(out, w, ws, n, k, row0=0):
    w = w.view(torch.int32); ws = ws.view(torch.uint8).view(torch.int16)
    launch_triton(G._dequant_weight_kernel, (cdiv(n, 64), cdiv(k, 256)), w[row0:], ws[row0:], out, n, k,
                  w.stride(0), ws.stride(0), out.stride(0), BN=64, BK=256, USE_ASM=True, IS_FP16=False, num_warps=4)

info, bw, tf = measured_env()
print(info, bw, tf, flush=True)
rows = []
lt = cublaslt.available(torch.device("cuda"))
print("cublaslt", lt, flush=True)
for si in [1, 0, 3, 2]:
    n, k = LLAMA_SHAPES[si]
    ws, wb = rotating_weights(n, k, TRITON_W4A4)
    scratch = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    fixed = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for m in [32, 64, 128, 256]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        inv = [(1 / gw).float() for _, _, gw in ws]
        al4 = [(1 / (gx * gw)).float() for _, _, gw in ws]
        def dq(w, a, xin):
            dequant_into(scratch, w[0], w[1], n, k)
            if lt:
                return cublaslt.gemm_alpha(xin, scratch, a, out_dtype=torch.bfloat16)
            return torch.mm(xin, scratch.t())
        def dq_chunks(w, a, xin, parts=2):
            outs = []
            step = n // parts
            for p in range(parts):
                sub = scratch[p * step:(p + 1) * step]
                dequant_into(sub, w[0], w[1], step, k, row0=p * step)
                outs.append(cublaslt.gemm_alpha(xin, sub, a, out_dtype=torch.bfloat16) if lt else torch.mm(xin, sub.t()))
            return outs
        def w4a4_dq(w, a):
            v = cuda_quant.quantize(x, gx, cuda_quant.MODE_VALUES, out_dtype=torch.bfloat16)
            return dq(w, a, v)
        calls = {
            "bf16": [lambda w=w: x @ w.t() for w in wb],
            "w4a16": [lambda w=w, a=a: MARLIN.linear(x, w[0], w[1], None, a, None, n) for w, a in zip(ws, inv)],
            "w4a4": [lambda w=w, a=a: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n) for w, a in zip(ws, al4)],
            "dq16": [lambda w=w, a=a: dq(w, a, x) for w, a in zip(ws, inv)],
            "dq16x2": [lambda w=w, a=a: dq_chunks(w, a, x, 2) for w, a in zip(ws, inv)],
            "dq16x4": [lambda w=w, a=a: dq_chunks(w, a, x, 4) for w, a in zip(ws, inv)],
            "dq4": [lambda w=w, a=a: w4a4_dq(w, a) for w, a in zip(ws, al4)],
            "deq_only": [lambda w=w: dequant_into(scratch, w[0], w[1], n, k) for w in ws],
            "mm_fixed": [lambda: x @ fixed.t() for _ in ws],
            "mm_scratch": [lambda: x @ scratch.t() for _ in ws],
        }
        # check the dequant path equals marlin's W4A16 to bf16 rounding
        ref = MARLIN.linear(x, ws[0][0], ws[0][1], None, inv[0], None, n).float()
        got = dq(ws[0], inv[0], x).float()
        err = float((got - ref).norm() / ref.norm())
        t = time_graphs_us(calls)
        r = {"shape": f"{n}x{k}", "m": m, "err_vs_marlin": err, **{kk: round(v, 2) for kk, v in t.items()}}
        r["x_w4a16"] = round(t["bf16"] / t["w4a16"], 3)
        r["x_dq16"] = round(t["bf16"] / t["dq16"], 3)
        r["x_dq16x2"] = round(t["bf16"] / t["dq16x2"], 3)
        r["x_w4a4"] = round(t["bf16"] / t["w4a4"], 3)
        r["x_dq4"] = round(t["bf16"] / t["dq4"], 3)
        print(r, flush=True)
        rows.append(r)
        write_json("l2_dequant.json", {"env": info, "rows": rows})
    del ws, wb
    torch.cuda.empty_cache()
