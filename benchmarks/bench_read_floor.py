"""How fast can this GPU stream a weight's bytes? The floor under the M=1 bandwidth bar.

Times read-only kernels (``read_floor.cu``: no arithmetic, every word folded into a value that is
never stored) over the packed-code bytes of the Llama-3-8B shapes, in CUDA graphs over rotating
copies larger than L2, and prints GB/s and the fraction of the measured copy bandwidth:
- ``contiguous``: a grid-stride stream of 16-byte loads (the best case);
- ``rows``: the small-M kernel's pattern (a 16-row block per CTA, its warps splitting K, lane (g, t)
  reading 16 bytes of rows g and g + 8 per 128-k group), one CTA per block or persistent CTAs;
- ``blocked``: the same loads where each group's 16 rows x 64 bytes are one contiguous kilobyte;
- ``kernel``: the small-M GEMM itself at M=1 (codes and scale bytes), for reference.

python benchmarks/bench_read_floor.py [--shapes 0,1,2,3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (copies_for, fp4_weight_bytes, measured_env, print_table, rotating_weights, shape_of,  # noqa: E402
                     time_graph_us, write_json)

from fp4_compile.ops.cuda_small_m import small_m_gemm  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402
from fp4_compile.ops.nvcc import build_shared_library, kernel_flags  # noqa: E402
from fp4_compile.ops.triton_gemm import num_sms  # noqa: E402

SOURCE = pathlib.Path(__file__).resolve().parent / "read_floor.cu"
PATTERNS = {"contiguous": 0, "rows": 1, "blocked": 2}


def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_shared_library(SOURCE, kernel_flags((9, 0)), "read_floor")))
    fn = lib.fp4c_read_floor
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_int] * 4 + [
        ctypes.c_void_p, ctypes.c_void_p]
    return lib


def variants(rows: int, sms: int) -> list[tuple[str, int, int, int, int]]:
    """(pattern, CTAs, warps, stages, L2 prefetch bytes)."""
    blocks = rows // 16
    out = [("contiguous", sms * c, 8, s, 0) for c in (4, 8) for s in (4, 8)]
    for pattern in ("rows", "blocked"):
        for warps in (4, 8):
            out.append((pattern, blocks, warps, 2, 128))
        out.append((pattern, blocks, 4, 4, 128))
        out.append((pattern, blocks, 4, 2, 0))
        for per_sm in (8, 16):
            out.append((pattern, min(blocks, sms * per_sm), 4, 2, 128))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="0,1,2,3", help="indices into the Llama shapes or NxK, comma-separated")
    args = ap.parse_args()
    info, bw, _ = measured_env(tensor_core=False)
    lib = library()
    sms = num_sms(0)
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows_out = []
    for spec in args.shapes.split(","):
        n, k = shape_of(spec)
        ldw = k // 2
        bufs = [torch.randint(0, 256, (n, ldw), dtype=torch.uint8, device="cuda")
                for _ in range(copies_for(n * ldw))]
        for pattern, ctas, warps, stages, prefetch in variants(n, sms):
            def call(b, pattern=pattern, ctas=ctas, warps=warps, stages=stages, prefetch=prefetch):
                err = lib.fp4c_read_floor(PATTERNS[pattern], b.data_ptr(), n, ldw, ctas, warps, stages, prefetch,
                                          sink.data_ptr(), torch.cuda.current_stream().cuda_stream)
                if err:
                    raise RuntimeError(f"read_floor {pattern} failed: CUDA error {err}")
            us = time_graph_us([lambda b=b: call(b) for b in bufs])
            gbs = n * ldw / us / 1e3
            rows_out.append({"shape": f"{n}x{k}", "pattern": pattern, "ctas": ctas, "warps": warps, "stages": stages,
                             "prefetch": prefetch, "us": round(us, 2), "GBps": round(gbs, 1),
                             "copy_frac": round(gbs / bw, 3)})
        del bufs
        ws, _ = rotating_weights(n, k, MARLIN)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        alpha = torch.ones(1, device="cuda")
        us = time_graph_us([lambda w=w: small_m_gemm(x, w[0], w[1], alpha, n=n, out_dtype=torch.bfloat16)
                            for w in ws])
        gbs = fp4_weight_bytes(n, k) / us / 1e3
        rows_out.append({"shape": f"{n}x{k}", "pattern": "kernel M=1", "us": round(us, 2), "GBps": round(gbs, 1),
                         "copy_frac": round(gbs / bw, 3)})
        del ws
        torch.cuda.empty_cache()
    path = write_json("bench_read_floor.json", {"env": info, "rows": rows_out})
    print(f"wrote {path}")
    print_table(rows_out, ["shape", "pattern", "ctas", "warps", "stages", "prefetch", "us", "GBps", "copy_frac"],
                title=f"read floor, {info['gpu']}, copy {bw:.0f} GB/s (graph times over rotating copies)")


if __name__ == "__main__":
    main()
