"""Host (CPU) time per eager call of the Hopper backends' linear, and where it goes.

Eager prefill and decode without CUDA graphs are bound by host launch overhead when the GPU work
per call is short. For each backend and M: microseconds of host time per call (many calls, no
synchronisation: M=1 GPU work is shorter than the host's) and the top functions of a cProfile run.

python benchmarks/profile_host.py [--n 4096] [--k 4096] [--ms 1,2048] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import make_fp4_weights, python_profile  # noqa: E402

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--ms", default="1,64,2048")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    wt, wst, gw = make_fp4_weights(args.n, args.k, 1, MARLIN)[0]
    for m in [int(v) for v in args.ms.split(",")]:
        x = torch.randn(m, args.k, device="cuda", dtype=torch.bfloat16)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        alpha44, alpha16 = (1 / (gx * gw)).float(), (1 / gw).float()
        calls = {
            "w4a4": lambda: TRITON_W4A4.linear(x, wt, wst, gx, alpha44, None, args.n),
            "w4a16": lambda: MARLIN.linear(x, wt, wst, None, alpha16, None, args.n),
        }
        for name, fn in calls.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            n = args.calls if m < 1024 else max(args.calls // 20, 20)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            gpu = (time.perf_counter() - t0) / n * 1e6
            print(f"=== {name} M={m}: host {host:.1f} us per call, host+GPU {gpu:.1f} us per call")
            print(python_profile(fn, calls=min(n, 500)))


if __name__ == "__main__":
    main()
