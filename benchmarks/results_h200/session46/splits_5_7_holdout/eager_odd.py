"""Eager W4A16 at M = 9..16 on shapes whose eager pick moved with the 5- and 7-way splits (their wave fill passed
WAVE_EFFICIENCY): today's pick against each kernel forced (EAGER_SMALL_M_MIN_ELEMENTS 2^62 -> the small-M kernel;
0 with WAVE_EFFICIENCY 0 -> wgmma)."""
import json, os, sys
import torch
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from _common import rotating_fp4_weights, shape_of, time_eager_us
from fp4_compile.ops import cuda_wgmma, fast_linear
from fp4_compile.ops.hopper import MARLIN

out = {"gpu": torch.cuda.get_device_name(0), "rows": []}
torch.manual_seed(0)
for si in sys.argv[1:]:
    n, k = shape_of(si)
    ws = rotating_fp4_weights(n, k, MARLIN)
    for m in (9, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        alphas = [(1 / gw).float().reshape(1) for _, _, gw in ws]
        eager = [lambda w=w, a=a: torch.ops.fp4.linear(x, w[0], w[1], w[2], a, None, n, MARLIN.name)
                 for w, a in zip(ws, alphas)]
        cfg = cuda_wgmma.device_launch_config(m, n, k, 0)
        row = {"shape": si, "m": m, "config": cfg.label,
               "pick": "wgmma" if cuda_wgmma.use_wgmma(ws[0][0], m, host_bound=True) else "small_m"}
        saved = cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS, cuda_wgmma.WAVE_EFFICIENCY
        for name, (limit, eff) in [("today", saved), ("small_m", (2**62, saved[1])), ("wgmma", (0, 0.0))]:
            cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS, cuda_wgmma.WAVE_EFFICIENCY = limit, eff
            try:
                fast_linear.forget_plans()
                row[f"eager_{name}_us"] = round(time_eager_us(eager), 2)
            finally:
                cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS, cuda_wgmma.WAVE_EFFICIENCY = saved
                fast_linear.forget_plans()
        print(row, flush=True)
        out["rows"].append(row)
    del ws
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "eager_odd.json"), "w"), indent=1)
