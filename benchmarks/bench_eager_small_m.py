"""Eager W4A16 at M = 9..16: the kernel the dispatch picks against each kernel forced.

At M = 9..16 an eager call on the C++ fast path takes the decode kernel, or the wgmma kernel on weights of more
than ``cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS`` elements whose launch fills ``WAVE_EFFICIENCY`` of its waves
(``cuda_wgmma.use_wgmma``). For each shape and M, eager calls through ``fp4::linear`` over rotating weights:
today's pick, then the decode kernel forced (the element limit raised past any weight) and the wgmma kernel
forced (limit and fill 0), with the wgmma kernel's launch configuration and fill (NOTES.md v47, v48b).

python benchmarks/bench_eager_small_m.py [--shapes 8192x8192,10240x8192] [--ms 9,12,16]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_info, print_table, rotating_fp4_weights, shape_of, time_eager_us, write_json  # noqa: E402

from fp4_compile.ops import cuda_wgmma, fast_linear  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402

FORCED = {"small_m": (2**62, None), "wgmma": (0, 0.0)}  # (EAGER_SMALL_M_MIN_ELEMENTS, WAVE_EFFICIENCY)


def time_with(limits: tuple[int, float | None], calls) -> float:
    """Eager us per call with the eager rule's two limits set (None: keep), the fast path's plans remade."""
    saved = cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS, cuda_wgmma.WAVE_EFFICIENCY
    cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS = limits[0]
    cuda_wgmma.WAVE_EFFICIENCY = saved[1] if limits[1] is None else limits[1]
    try:
        fast_linear.forget_plans()
        return round(time_eager_us(calls), 2)
    finally:
        cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS, cuda_wgmma.WAVE_EFFICIENCY = saved
        fast_linear.forget_plans()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8192x8192,10240x8192,5120x13824,28672x4096,4096x14336,6144x4096",
                    help="N x K layer shapes, comma-separated")
    ap.add_argument("--ms", default="9,12,16", help="M values (9..16)")
    args = ap.parse_args()
    torch.manual_seed(0)
    sms, clusters = cuda_wgmma.num_sms(0), cuda_wgmma.cluster_ctas(0)
    rows = []
    for spec in args.shapes.split(","):
        n, k = shape_of(spec)
        ws = rotating_fp4_weights(n, k, MARLIN)
        alphas = [(1 / gw).float().reshape(1) for _, _, gw in ws]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls = [lambda w=w, a=a: torch.ops.fp4.linear(x, w[0], w[1], w[2], a, None, n, MARLIN.name)
                     for w, a in zip(ws, alphas)]
            cfg = cuda_wgmma.device_launch_config(m, n, k, 0)
            row = {"shape": spec, "m": m, "wgmma_config": cfg.label,
                   "wgmma_fill": round(cuda_wgmma.wave_fill(m, n, k, cfg, sms, clusters), 3),
                   "pick": "wgmma" if cuda_wgmma.use_wgmma(ws[0][0], m, host_bound=True) else "small_m",
                   "eager_pick_us": time_with((cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS, None), calls)}
            row.update({f"eager_{name}_us": time_with(limits, calls) for name, limits in FORCED.items()})
            rows.append(row)
            print(row, flush=True)
        del ws
        torch.cuda.empty_cache()
    path = write_json("bench_eager_small_m.json", {"env": env_info(), "rows": rows})
    print_table(rows, list(rows[0]), title=f"eager W4A16 at M = {args.ms}, us ({path})")


if __name__ == "__main__":
    main()
