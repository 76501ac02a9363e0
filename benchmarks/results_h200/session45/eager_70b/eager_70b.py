"""Eager W4A16 at M = 9..16 on Llama-3-70B and odd shapes around the 2^25-element limit: today's eager pick
against the other kernel (forced by moving cuda_small_m.EAGER_VALUES_MAX_ELEMENTS)."""
import json, os, sys
import torch
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from _common import rotating_fp4_weights, shape_of, time_eager_us
from fp4_compile.ops import cuda_small_m, fast_linear
from fp4_compile.ops.hopper import MARLIN

out = {"gpu": torch.cuda.get_device_name(0), "rows": []}
torch.manual_seed(0)
for si in ["8192x8192", "10240x8192", "57344x8192", "8192x28672", "6144x4096", "4096x8192", "2048x16384",
           "5120x5120", "13824x5120", "5120x13824"]:
    n, k = shape_of(si)
    ws = rotating_fp4_weights(n, k, MARLIN)
    for m in (9, 12, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        alphas = [(1 / gw).float().reshape(1) for _, _, gw in ws]
        eager = [lambda w=w, a=a: torch.ops.fp4.linear(x, w[0], w[1], w[2], a, None, n, MARLIN.name)
                 for w, a in zip(ws, alphas)]
        row = {"shape": si, "m": m, "elements_over_limit": n * k > cuda_small_m.EAGER_VALUES_MAX_ELEMENTS}
        saved = cuda_small_m.EAGER_VALUES_MAX_ELEMENTS
        for name, limit in [("small_m", 2**62), ("wgmma", 0)]:
            cuda_small_m.EAGER_VALUES_MAX_ELEMENTS = limit
            try:
                fast_linear.forget_plans()
                row[f"eager_{name}_us"] = round(time_eager_us(eager), 2)
            finally:
                cuda_small_m.EAGER_VALUES_MAX_ELEMENTS = saved
                fast_linear.forget_plans()
        print(row, flush=True)
        out["rows"].append(row)
    del ws
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "eager_70b.json"), "w"), indent=1)
