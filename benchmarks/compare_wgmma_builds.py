"""A/B timing of the wgmma kernel built from two source files (say, the working tree and a git
revision), in one process on one GPU, alternating A and B so that clock drift hits both alike.

    git show REV:fp4_compile/csrc/hopper/nvfp4_wgmma.cu > /tmp/old.cu   (the header beside it is
    taken from the working tree)
    python benchmarks/compare_wgmma_builds.py /tmp/old.cu [--cases 4096x14336x1024,28672x4096x1024]

Both builds must share the C signature of fp4c_nvfp4_wgmma_gemm; both run through
cuda_wgmma.wgmma_gemm with the working tree's launch_config for the case (the same tile, split and
reduction for both).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import measured_env, print_table, rotating_weights, time_graph_us, write_json  # noqa: E402

from fp4_compile.ops import cuda_wgmma  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline", help="the B source file (A is the working tree's nvfp4_wgmma.cu)")
    ap.add_argument("--cases", default="4096x14336x1024,28672x4096x1024,4096x4096x1024,4096x4096x2048",
                    help="NxKxM, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    info, _, _ = measured_env()
    with tempfile.TemporaryDirectory() as tmp:
        # B is built beside a copy of the working tree's header, under a name of its own
        b_src = pathlib.Path(tmp) / "nvfp4_wgmma.cu"
        shutil.copy(args.baseline, b_src)
        for header in cuda_wgmma.SOURCE.parent.glob("*.cuh"):
            shutil.copy(header, pathlib.Path(tmp) / header.name)
        libs = {"A": None, "B": cuda_wgmma.load_library(b_src, "wgmma_b")}  # A: the package's build
    rows = []
    for case in args.cases.split(","):
        n, k, m = (int(v) for v in case.split("x"))
        ws, _ = rotating_weights(n, k, MARLIN)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        alphas = [(1 / gw).float() for _, _, gw in ws]
        cfg = cuda_wgmma.device_launch_config(m, n, k, 0)
        opts = dict(n=n, out_dtype=torch.bfloat16, tile=(cfg.bn, cfg.wm), splits=cfg.splits, workspace=cfg.workspace)
        times = {"A": [], "B": []}
        for _ in range(args.rounds):
            for name, lib in libs.items():
                times[name].append(time_graph_us(
                    [lambda w=w, a=a, lib=lib: cuda_wgmma.wgmma_gemm(x, w[0], w[1], a, library=lib, **opts)
                     for w, a in zip(ws, alphas)]))
        a, b = statistics.median(times["A"]), statistics.median(times["B"])
        rows.append({"case": case, "config": cfg.label, "A_us": round(a, 2), "B_us": round(b, 2),
                     "A_over_B": round(a / b, 3), "A_all": [round(t, 1) for t in times["A"]],
                     "B_all": [round(t, 1) for t in times["B"]]})
        print(rows[-1], flush=True)
        del ws
        torch.cuda.empty_cache()
    path = write_json("compare_wgmma_builds.json", {"env": info, "baseline": args.baseline, "rows": rows})
    print_table(rows, ["case", "config", "A_us", "B_us", "A_over_B", "A_all", "B_all"],
                title=f"wgmma kernel, working tree (A) against {args.baseline} (B) -> {path}")


if __name__ == "__main__":
    main()
