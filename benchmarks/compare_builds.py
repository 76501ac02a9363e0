"""A/B timing of a CUDA kernel built from other source files (say, a git revision or a variant)
against the working tree's build, in one process on one GPU, the builds' graphs replayed in turns
so that clock drift hits them alike.

    git show REV:fp4_compile/csrc/hopper/nvfp4_wgmma.cu > /tmp/old.cu
    python benchmarks/compare_builds.py /tmp/old.cu [--cases 4096x14336x1024,28672x4096x1024]
    python benchmarks/compare_builds.py --kernel small_m /tmp/old_small_m.cu --cases 28672x4096x1
    python benchmarks/compare_builds.py --kernel small_m --codes /tmp/old_small_m.cu --cases 4096x4096x8
    python benchmarks/compare_builds.py --kernel quant /tmp/old_quant.cu --cases 4096x14336x1
    python benchmarks/compare_builds.py --kernel small_m --w4a4 triton /tmp/old_small_m.cu --cases 4096x14336x1

Each file is built beside copies of the working tree's headers (``*.cuh``): to compare a change of
a header, inline the other header into the file. All builds must share the kernel's C signature;
they run through the package's launcher with the working tree's launch configuration for the case.
``--codes``: the small-M kernel on W4A4 activation codes (quantized once, outside the timed graphs),
else on bf16 activations; ``--w4a4 codes|cuda|triton``: each build's small-M kernel in W4A4 calls as the
backend makes them, behind that quantization kernel (codes, or the CUDA or Triton kernel's block values),
which then runs in the timed graphs too. ``--kernel quant`` times W4A4 calls at decode sizes, each build's quantization
kernel (block values, or codes with ``--codes``) and then the package's small-M kernel on its output,
launched behind it as the backend does (``_common.w4a4_decode_calls``: its first weight loads before its wait).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (measured_env, print_table, rotating_fp4_weights, time_graphs_us, w4a4_decode_calls,  # noqa: E402
                     write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import cuda_quant, cuda_small_m, cuda_wgmma  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402

KERNELS = {"wgmma": cuda_wgmma, "small_m": cuda_small_m, "quant": cuda_quant}
DEFAULT_CASES = {"wgmma": "4096x14336x1024,28672x4096x1024,4096x4096x1024,4096x4096x2048",
                 "small_m": "28672x4096x1,4096x14336x1,6144x4096x1,4096x4096x1,28672x4096x8"}
DEFAULT_CASES["quant"] = DEFAULT_CASES["small_m"]


def gemm_calls(kernel: str, library, x: torch.Tensor, ws: list, alphas: list, n: int,
               x_codes: tuple | None = None) -> list:
    """One call per rotating weight through the package's launcher, with ``library`` (None: the package's build).
    ``x_codes``: (codes, scales) of x for the small-M kernel on activation codes."""
    m, k = x.shape
    if x_codes is not None:
        return [lambda w=w, a=a: cuda_small_m.small_m_gemm(x_codes[0], w[0], w[1], a, n=n, out_dtype=torch.bfloat16,
                                                           x_scale=x_codes[1], k=k, library=library)
                for w, a in zip(ws, alphas)]
    if kernel == "wgmma":
        cfg = cuda_wgmma.device_launch_config(m, n, k, 0)
        opts = dict(tile=(cfg.bn, cfg.wm), splits=cfg.splits, workspace=cfg.workspace)
        gemm = cuda_wgmma.wgmma_gemm
    else:
        opts = {}
        gemm = cuda_small_m.small_m_gemm
    return [lambda w=w, a=a: gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16, library=library, **opts)
            for w, a in zip(ws, alphas)]


def config_label(kernel: str, m: int, n: int, k: int) -> str:
    """The package's launch of the GEMM timed (the small-M kernel's for ``quant``)."""
    if kernel == "wgmma":
        return cuda_wgmma.device_launch_config(m, n, k, 0).label
    rows, stages, warps = cuda_small_m.launch_config(m, n, k)
    return f"r{rows}s{stages}w{warps}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("others", nargs="+", help="source files to time against the working tree's build")
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="wgmma")
    ap.add_argument("--cases", help="NxKxM, comma-separated (default: a few per kernel)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--codes", action="store_true", help="small_m: W4A4 on activation codes")
    ap.add_argument("--w4a4", choices=("codes", "cuda", "triton"),
                    help="small_m: W4A4 calls, behind this quantization kernel")
    args = ap.parse_args()
    if args.codes and args.kernel == "wgmma":
        ap.error("--codes times the small-M kernel (--kernel small_m or quant)")
    if args.w4a4 and (args.kernel != "small_m" or args.codes):
        ap.error("--w4a4 times the small-M kernel behind a quantization kernel (--kernel small_m, without --codes)")
    module = KERNELS[args.kernel]
    info, _, _ = measured_env()
    libraries = {"A": None}  # A: the package's build
    with tempfile.TemporaryDirectory() as tmp:
        for i, other in enumerate(args.others):
            # each build beside copies of the working tree's headers, under a name of its own
            src = pathlib.Path(tmp) / f"b{i}" / module.SOURCE.name
            src.parent.mkdir()
            shutil.copy(other, src)
            for header in module.SOURCE.parent.glob("*.cuh"):
                shutil.copy(header, src.parent / header.name)
            libraries[f"B{i}"] = module.load_library(src, f"{args.kernel}_b{i}")
    rows = []
    for case in (args.cases or DEFAULT_CASES[args.kernel]).split(","):
        n, k, m = (int(v) for v in case.split("x"))
        ws = rotating_fp4_weights(n, k, MARLIN)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        alphas = [(1 / gw).float() for _, _, gw in ws]
        x_codes = None
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        if args.codes or args.w4a4 or args.kernel == "quant":
            alphas = [(a / gx).float() for a in alphas]
        if args.kernel == "quant" or args.w4a4:
            quant = args.w4a4 or ("codes" if args.codes else "cuda")
            replaced = "gemm_library" if args.w4a4 else "library"  # the kernel that the builds replace
            calls = {name: w4a4_decode_calls(x, gx, ws, alphas, n, quant, **{replaced: lib})
                     for name, lib in libraries.items()}
            outs = [c[0]() for c in calls.values()]
            assert all(torch.equal(o, outs[0]) for o in outs), "the builds' W4A4 outputs differ"
        else:
            if args.codes:
                x_codes = cuda_quant.quantize(x, gx, cuda_quant.MODE_KERNEL_CODES)
            calls = {name: gemm_calls(args.kernel, lib, x, ws, alphas, n, x_codes) for name, lib in libraries.items()}
        times = time_graphs_us(calls, rounds=args.rounds)
        row = {"case": case, "config": config_label(args.kernel, m, n, k), "A_us": round(times["A"], 2)}
        for name in libraries:
            if name != "A":
                row[f"{name}_us"] = round(times[name], 2)
                row[f"A_over_{name}"] = round(times["A"] / times[name], 3)
        rows.append(row)
        print(row, flush=True)
        del ws
        torch.cuda.empty_cache()
    name = f"compare_{args.kernel}{'_codes' if args.codes else ''}{f'_w4a4_{args.w4a4}' if args.w4a4 else ''}_builds.json"
    path = write_json(name, {"env": info, "others": args.others, "rows": rows})
    print_table(rows, list(rows[0]),
                title=f"{args.kernel} kernel, working tree (A) against {args.others} (B0...) -> {path}")


if __name__ == "__main__":
    main()
