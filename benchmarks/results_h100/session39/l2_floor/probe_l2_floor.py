"""Probe: each kernel with its weight in L2 (one weight, no rotation) against the rotating-weight time:
how much of a call is DRAM traffic and how much is the launch's fixed cost. Not in the tree."""
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../benchmarks"))
from _common import LLAMA_SHAPES, measured_env, rotating_weights, time_graphs_us, write_json
from fp4_compile import format as F
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4

info, bw, tf = measured_env()
print(info, flush=True)
rows = []
for si in [1, 0, 3, 2]:
    n, k = LLAMA_SHAPES[si]
    ws, wb = rotating_weights(n, k, TRITON_W4A4)
    for m in [1, 16, 64, 128]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        inv = [(1 / gw).float() for _, _, gw in ws]
        al4 = [(1 / (gx * gw)).float() for _, _, gw in ws]
        w0, b0, i0, a0 = ws[0], wb[0], inv[0], al4[0]
        r = len(ws)
        calls = {
            "bf16": [lambda w=w: x @ w.t() for w in wb],
            "bf16_l2": [lambda: x @ b0.t() for _ in range(len(wb))],
            "w4a16": [lambda w=w, a=a: MARLIN.linear(x, w[0], w[1], None, a, None, n) for w, a in zip(ws, inv)],
            "w4a16_l2": [lambda: MARLIN.linear(x, w0[0], w0[1], None, i0, None, n) for _ in range(r)],
            "w4a4": [lambda w=w, a=a: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n) for w, a in zip(ws, al4)],
            "w4a4_l2": [lambda: TRITON_W4A4.linear(x, w0[0], w0[1], gx, a0, None, n) for _ in range(r)],
        }
        t = time_graphs_us(calls)
        row = {"shape": f"{n}x{k}", "m": m, **{kk: round(v, 2) for kk, v in t.items()},
               "bf16_l2_fits": n * k * 2 < 40e6, "fp4_l2_fits": n * k * 0.5625 < 40e6}
        print(row, flush=True)
        rows.append(row)
        write_json("l2_floor.json", {"env": info, "rows": rows})
    del ws, wb
    torch.cuda.empty_cache()
