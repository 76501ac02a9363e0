"""Eager W4A16 at M = 9..16: the small-M kernel on bf16 values (today's eager pick) against the wgmma kernel
(today's pick from M = 17), GPU time in graphs and eager time through fp4::linear; and the wgmma kernel's
exactness at M = 1..16 (fp32 out against the float64 product; bf16 with bias within output rounding)."""
import json, os, sys
import torch
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from _common import rel, rotating_weights, shape_of, time_eager_us, time_graphs_us
from fp4_compile import format as F
from fp4_compile.ops import cuda_small_m, cuda_wgmma, fast_linear
from fp4_compile.ops.cuda_small_m import small_m_gemm
from fp4_compile.ops.cuda_wgmma import wgmma_gemm
from fp4_compile.ops.hopper import MARLIN

out = {"gpu": torch.cuda.get_device_name(0), "exact": [], "rows": []}
torch.manual_seed(0)
# exactness at M = 1..16 on odd and Llama-like shapes, every tile
for n, k in [(1000, 1040), (72, 208), (4096, 4096), (28672, 512)]:
    pw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    sw = (torch.rand(n, k // 16, device="cuda") * 2 + 0.25).to(torch.float8_e4m3fn)
    gw = torch.tensor(3.7, device="cuda")
    wt, wst = MARLIN.prepare_weight(pw, sw)
    for m in range(1, 17):
        x = (torch.randn(m, k, device="cuda") * torch.logspace(-2, 1, k, device="cuda")).to(torch.bfloat16)
        ref = x.double() @ F.block_values(pw, sw).double().t() / gw.double()
        bias = torch.randn(n, device="cuda").to(torch.bfloat16)
        worst = 0.0
        for tile in cuda_wgmma.TILES:
            for splits, ws_ in [(1, False), (2, False), (3, True)]:
                o = wgmma_gemm(x, wt, wst, (1 / gw).float().reshape(1), n=n, out_dtype=torch.float32, tile=tile,
                               splits=splits, workspace=ws_)
                assert o.shape == (m, n) and torch.isfinite(o).all()
                worst = max(worst, rel(o, ref))
        o = wgmma_gemm(x, wt, wst, (1 / gw).float().reshape(1), n=n, out_dtype=torch.bfloat16, bias=bias)
        r16 = rel(o, ref + bias.double())
        out["exact"].append({"n": n, "k": k, "m": m, "fp32_rel_worst": worst, "bf16_bias_rel": r16})
        assert worst <= 1e-5 and r16 <= 6e-3, (n, k, m, worst, r16)
print("exact: all", len(out["exact"]), "cells within 1e-5 (fp32) / 6e-3 (bf16 + bias)", flush=True)

for si in ["6144x4096", "4096x4096", "28672x4096", "4096x14336", "14336x4096", "1024x4096"]:
    n, k = shape_of(si)
    ws, bf = rotating_weights(n, k, MARLIN)
    for m in (9, 12, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        alphas = [(1 / gw).float().reshape(1) for _, _, gw in ws]
        t = time_graphs_us({
            "bf16": [lambda w=w: x @ w.t() for w in bf],
            "small_m": [lambda w=w, a=a: small_m_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                        for w, a in zip(ws, alphas)],
            "wgmma": [lambda w=w, a=a: wgmma_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16)
                      for w, a in zip(ws, alphas)]})
        row = {"shape": si, "m": m, **{f"{kk}_us": round(v, 2) for kk, v in t.items()},
               "wgmma_cfg": cuda_wgmma.device_launch_config(m, n, k, 0).label}
        eager = [lambda w=w, a=a: torch.ops.fp4.linear(x, w[0], w[1], w[2], a, None, n, MARLIN.name)
                 for w, a in zip(ws, alphas)]
        fast_linear.forget_plans()
        row["eager_today_us"] = round(time_eager_us(eager), 2)
        saved = cuda_small_m.MAX_M, cuda_wgmma.DISPATCH_MIN_M
        cuda_small_m.MAX_M, cuda_wgmma.DISPATCH_MIN_M = 8, 1
        try:
            fast_linear.forget_plans()
            row["eager_wgmma_us"] = round(time_eager_us(eager), 2)
        finally:
            cuda_small_m.MAX_M, cuda_wgmma.DISPATCH_MIN_M = saved
            fast_linear.forget_plans()
        print(row, flush=True)
        out["rows"].append(row)
    del ws, bf
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "eager_m9_16.json"), "w"), indent=1)
