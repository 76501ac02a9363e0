"""One launch of the CUDA mid-M kernel for a profiler (ncu): warm-up, then the launch to profile.

ncu --clock-control none -k regex:nvfp4_mid_m --launch-skip 1 --launch-count 1 --set full \
    python benchmarks/profile_mid_m.py --shape 4096x4096 --m 64 --tile 64,128,8 --splits 1
"""

from __future__ import annotations

import argparse

import torch

from fp4_compile import format as F
from fp4_compile.ops.cuda_mid_m import mid_m_gemm
from fp4_compile.ops.hopper import MARLIN


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x4096", help="NxK")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--tile", default="64,128,8", help="activation rows,weight rows,warps")
    ap.add_argument("--splits", type=int, default=1)
    args = ap.parse_args()
    n, k = map(int, args.shape.split("x"))
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    gw = F.global_scale_from_amax(w.float().abs().amax()).reshape(1)
    wt, wst = MARLIN.prepare_weight(*F.quantize_nvfp4(w, gw))
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    tile = tuple(int(v) for v in args.tile.split(","))
    for _ in range(2):  # the first launch builds and warms up; the second is profiled
        mid_m_gemm(x, wt, wst, (1 / gw).float(), n=n, out_dtype=torch.bfloat16, tile=tile, splits=args.splits)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
