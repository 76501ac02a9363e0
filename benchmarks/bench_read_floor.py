"""The ceiling under the M <= 16 bars: how fast can this GPU merely read an NVFP4 weight's bytes?

A kernel that only reads a weight (codes and block scales) bounds every W4 GEMM at M <= 16 from
below, launch and ramp included. This times, per Llama-3-8B shape, in CUDA graphs over rotating
copies larger than L2 and replayed in turns with cuBLAS bf16 and our linears at M = 1 and 16:
- read-only kernels (``read_floor.cu``: every loaded word folded into a value stored only if it
  equals a magic number) over ``fp4_weight_bytes(N, K)`` bytes: ``contiguous`` (a grid-stride stream
  of 16-byte loads), ``rows`` (the small-M kernel's pattern: a 16-row block per CTA, its warps
  splitting K) and ``blocked`` (each 16-row group one contiguous kilobyte), all launched with
  programmatic dependent launch after a wait for the grid before, as the package's kernels are;
- ``empty``: a grid that only waits, the chain's per-launch floor (EMPTY_LAUNCHES in one graph).

``floor_us`` is the fastest read; ``ceiling_x`` = bf16 time / floor, the speedup a kernel that did
nothing but read the weight would reach; ``w4a4_of_ceiling`` our speedup over that ceiling.

python benchmarks/bench_read_floor.py [--shapes 0,1,2,3] [--ms 1,16]
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
                     time_graphs_us, write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops.gpu_timing import geomean  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402
from fp4_compile.ops.nvcc import build_shared_library, kernel_flags  # noqa: E402
from fp4_compile.ops.triton_gemm import num_sms  # noqa: E402

SOURCE = pathlib.Path(__file__).resolve().parent / "read_floor.cu"
HOPPER_HEADERS = pathlib.Path(__file__).resolve().parent.parent / "fp4_compile" / "csrc" / "hopper"
PATTERNS = {"contiguous": 0, "rows": 1, "blocked": 2, "empty": 3}
EMPTY_LAUNCHES = 200


def library() -> ctypes.CDLL:
    flags = kernel_flags((9, 0)) + [f"-I{HOPPER_HEADERS}"]
    lib = ctypes.CDLL(str(build_shared_library(SOURCE, flags, "read_floor")))
    fn = lib.fp4c_read_floor
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_int] * 5 + [
        ctypes.c_void_p, ctypes.c_void_p]
    return lib


def variants(row_blocks: int, sms: int) -> list[tuple[str, int, int, int, int]]:
    """(pattern, CTAs, warps, stages, L2 prefetch bytes) of the read kernels."""
    out = [("contiguous", sms * c, 8, s, 0) for c in (2, 4, 8) for s in (4, 8)]
    for pattern in ("rows", "blocked"):
        for warps in (4, 8):
            out.append((pattern, row_blocks, warps, 2, 128))
        out.append((pattern, row_blocks, 4, 4, 128))
        out.append((pattern, min(row_blocks, sms * 16), 4, 2, 128))
    return out


def label(pattern: str, ctas: int, warps: int, stages: int, prefetch: int) -> str:
    return f"{pattern} c{ctas} w{warps} s{stages} p{prefetch}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="0,1,2,3", help="indices into the Llama shapes or NxK, comma-separated")
    ap.add_argument("--ms", default="1,16", help="activation rows of the linears timed beside the reads")
    args = ap.parse_args()
    info, bw, _ = measured_env(tensor_core=False)
    lib = library()
    sms = num_sms(0)
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    ms = [int(v) for v in args.ms.split(",")]
    rows_out = []
    for spec in args.shapes.split(","):
        n, k = shape_of(spec)
        nbytes = fp4_weight_bytes(n, k)
        ldb = nbytes // n  # codes and scales of a row: 9K/16 bytes, a multiple of 64 for K a multiple of 1024
        bufs = [torch.randint(0, 256, (n, ldb), dtype=torch.uint8, device="cuda") for _ in range(copies_for(nbytes))]

        def read(b, pattern, ctas, warps, stages, prefetch):
            err = lib.fp4c_read_floor(PATTERNS[pattern], b.data_ptr(), n, ldb, ctas, warps, stages, prefetch, 1,
                                      sink.data_ptr(),
                                      torch.cuda.current_stream().cuda_stream)  # (the capture's stream)
            if err:
                raise RuntimeError(f"read_floor {pattern} failed: CUDA error {err}")

        calls = {label(*v): [lambda b=b, v=v: read(b, *v) for b in bufs] for v in variants(n // 16, sms)}
        # many launches a graph: a replay of a few empty kernels takes the GPU less time than the host takes to
        # launch it, and queued replays would then time the host (NOTES.md v32a)
        calls["empty"] = [lambda b=bufs[0]: read(b, "empty", sms, 8, 2, 0)] * EMPTY_LAUNCHES
        ws, wb = rotating_weights(n, k, TRITON_W4A4)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
            alphas = [(1 / (gx * gw)).float() for _, _, gw in ws]
            inv_gw = [(1 / gw).float() for _, _, gw in ws]
            calls[f"bf16 M={m}"] = [lambda w=w, x=x: x @ w.t() for w in wb]
            calls[f"w4a4 M={m}"] = [lambda w=w, a=a, x=x, gx=gx: TRITON_W4A4.linear(x, w[0], w[1], gx, a, None, n)
                                    for w, a in zip(ws, alphas)]
            calls[f"w4a16 M={m}"] = [lambda w=w, a=a, x=x: MARLIN.linear(x, w[0], w[1], None, a, None, n)
                                     for w, a in zip(ws, inv_gw)]
        times = time_graphs_us(calls)
        reads = {name: t for name, t in times.items() if name.split()[0] in ("contiguous", "rows", "blocked")}
        best = min(reads, key=reads.get)
        floor = reads[best]
        for m in ms:
            bf16 = times[f"bf16 M={m}"]
            r = {"shape": f"{n}x{k}", "m": m, "bf16_us": round(bf16, 2), "floor_us": round(floor, 2),
                 "floor_read": best, "floor_copy_frac": round(nbytes / floor / 1e3 / bw, 3),
                 "empty_us": round(times["empty"], 2), "ceiling_x": round(bf16 / floor, 3)}
            for key in ("w4a4", "w4a16"):
                t = times[f"{key} M={m}"]
                r[f"{key}_us"] = round(t, 2)
                r[f"{key}_x"] = round(bf16 / t, 3)
                r[f"{key}_of_ceiling"] = round(floor / t, 3)
            rows_out.append(r)
            print(r, flush=True)
        rows_out.append({"shape": f"{n}x{k}", "reads_us": {name: round(t, 2) for name, t in sorted(reads.items())}})
        del bufs, ws, wb, calls
        torch.cuda.empty_cache()
    cells = [r for r in rows_out if "m" in r]
    summary = {"ceiling geomean x": round(geomean([r["ceiling_x"] for r in cells]), 3),
               "ceiling min x": min(r["ceiling_x"] for r in cells)}
    for key in ("w4a4", "w4a16"):
        summary[f"{key} geomean x"] = round(geomean([r[f"{key}_x"] for r in cells]), 3)
        summary[f"{key} geomean of ceiling"] = round(geomean([r[f"{key}_of_ceiling"] for r in cells]), 3)
    path = write_json("bench_read_floor.json", {"env": info, "rows": rows_out, "summary": summary})
    print(f"wrote {path}")
    print_table(cells, ["shape", "m", "bf16_us", "floor_us", "floor_copy_frac", "empty_us", "ceiling_x", "w4a4_us",
                        "w4a4_x", "w4a4_of_ceiling", "w4a16_us", "w4a16_x", "w4a16_of_ceiling", "floor_read"],
                title=f"read floor under the M<=16 bars, {info['gpu']}, copy {bw:.0f} GB/s (graphs over rotating "
                      "copies, in turns)")
    print("summary:", summary)


if __name__ == "__main__":
    main()
