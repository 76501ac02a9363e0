"""Every launch configuration of the wgmma kernel, timed in turns, for its table of measured picks.

For each shape, M and mode: every (tile, K split, split reduction) of ``cuda_wgmma.launch_configs`` as a
CUDA graph over rotating weights, timed in turns against the cost model's pick
(``fp4_compile.ops.wgmma_tuning``, which ``fp4c tune`` also runs). Writes ``sweep_wgmma_configs.json``
after every cell (a run cut short keeps what it timed); ``benchmarks/make_wgmma_table.py`` writes the
built-in table from it.

python benchmarks/sweep_wgmma_configs.py [--shapes 0,1,14336x4096] [--ms 32,64,128] [--rounds 4]
python benchmarks/sweep_wgmma_configs.py --shapes 4608x3584@32/64,4096x4096@256   (Ms of their own)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import measured_env, shape_of, write_json  # noqa: E402

from fp4_compile.ops import wgmma_tuning  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0,1,2,3,14336x4096,1024x4096",
                    help="N x K, or an index into the Llama-3-8B shapes (default: those four and two more); "
                         "NxK@M/M/... times that shape at those M instead of --ms")
    ap.add_argument("--ms", default="17,32,48,64,96,128,192,256,384,512,1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=4, help="turns of replays per variant (5 replays each)")
    ap.add_argument("--modes", default="w4a16,w4a4", help="w4a16 (bf16 activations), w4a4 (block values of "
                                                         "the quantization kernel, timed with it)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_wgmma_configs.py needs a CUDA GPU")
    info, _, _ = measured_env(tensor_core=False)
    info.update(wgmma_tuning.sweep_env(0))
    out = {"env": info, "cells": []}
    start = time.time()
    for spec in args.shapes.split(","):
        spec, _, own_ms = spec.partition("@")
        ms = tuple(int(v) for v in (own_ms.split("/") if own_ms else args.ms.split(",")))
        for cell in wgmma_tuning.sweep_shape(*shape_of(spec), ms, tuple(args.modes.split(",")), args.rounds):
            out["cells"].append(cell)
            write_json("sweep_wgmma_configs.json", out)
            print(f"{time.time() - start:6.0f}s {cell['mode']:<5} {cell['shape']:>11} M={cell['m']:<5} "
                  f"model {cell['pick']:<10} {cell['us'][cell['pick']]:8.2f} us, best {cell['best']:<10} "
                  f"{cell['us'][cell['best']]:8.2f} us ({cell['pick_over_best']:.3f}x)"
                  f"{' ERRORS ' + str(cell['errors']) if cell['errors'] else ''}", flush=True)


if __name__ == "__main__":
    main()
