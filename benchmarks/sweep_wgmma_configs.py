"""Every launch configuration of the wgmma kernel, timed in turns, for its table of measured picks.

For each shape, M and mode: every (tile, K split, split reduction) of ``cuda_wgmma.launch_configs`` as a
CUDA graph over rotating weights (W4A16: bf16 activations; W4A4: the quantization kernel and the kernel
on its block values, which starts while the quantization kernel runs), the graphs replayed in turns so
that clock drift hits every variant alike. Each variant's output is checked against the launch
configuration's pick before it is timed. Writes
``sweep_wgmma_configs.json`` after every cell (a run cut short keeps what it timed);
``benchmarks/make_wgmma_table.py`` writes the table from it.

python benchmarks/sweep_wgmma_configs.py [--shapes 0,1,14336x4096] [--ms 32,64,128] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import measured_env, rel, rotating_fp4_weights, shape_of, time_graphs_us, write_json  # noqa: E402

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import cuda_wgmma  # noqa: E402
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402


GRAPH_BYTES = 16 * 2**30  # outputs held by the graphs timed together (each keeps its own memory pool)


def _time_in_chunks(calls: dict, pick: str, rounds: int, bytes_per_graph: int) -> dict:
    """``time_graphs_us`` over as many graphs at once as GRAPH_BYTES allows; every chunk also times
    the pick, and its times are scaled by the pick's first time over its time in the chunk (drift)."""
    per_chunk = max(2, GRAPH_BYTES // max(bytes_per_graph, 1))
    others = [label for label in calls if label != pick]
    times = {}
    for i in range(0, len(others), per_chunk - 1):
        chunk = time_graphs_us({label: calls[label] for label in [pick, *others[i:i + per_chunk - 1]]},
                               rounds=rounds)
        scale = times.setdefault(pick, chunk[pick]) / chunk[pick]
        times.update({label: t * scale for label, t in chunk.items() if label != pick})
    return times if others else time_graphs_us(calls, rounds=rounds)


def sweep_cell(x: torch.Tensor, weights: list, n: int, k: int, rounds: int, clusters: dict[int, int],
               w4a4: bool) -> dict:
    """Median us of every launch configuration at this (shape, M), and the configuration picked. ``w4a4``:
    each call is the quantization kernel's block values of x fed to the kernel (W4A4, which starts the
    GEMM while the quantization kernel runs), else x itself (W4A16)."""
    m = x.shape[0]
    pick = cuda_wgmma.device_launch_config(m, n, k, 0)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    alphas = [(1 / (gx * gw) if w4a4 else 1 / gw).float() for _, _, gw in weights]

    def call(cfg, w, a):
        xa = fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16) if w4a4 else x
        return cuda_wgmma.wgmma_gemm(xa, w[0], w[1], a, n=n, out_dtype=torch.bfloat16, tile=(cfg.bn, cfg.wm),
                                     splits=cfg.splits, workspace=cfg.workspace)

    expected = call(pick, weights[0], alphas[0])
    calls, errors = {}, {}
    for cfg in cuda_wgmma.launch_configs(k, clusters):
        err = rel(call(cfg, weights[0], alphas[0]), expected)
        if err > 1e-2:  # a broken variant is reported, never timed as if it were right
            errors[cfg.label] = err
            continue
        calls[cfg.label] = [lambda cfg=cfg, w=w, a=a: call(cfg, w, a) for w, a in zip(weights, alphas)]
    times = _time_in_chunks(calls, pick.label, rounds, m * n * 2 * len(weights))
    best = min(times, key=times.get)
    return {"shape": f"{n}x{k}", "n": n, "k": k, "m": m, "mode": "w4a4" if w4a4 else "w4a16", "pick": pick.label,
            "best": best, "pick_over_best": round(times[pick.label] / times[best], 4),
            "us": {label: round(t, 3) for label, t in sorted(times.items(), key=lambda kv: kv[1])}, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0,1,2,3,14336x4096,1024x4096",
                    help="N x K, or an index into the Llama-3-8B shapes (default: those four and two more)")
    ap.add_argument("--ms", default="17,32,48,64,96,128,192,256,384,512,1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=4, help="turns of replays per variant (5 replays each)")
    ap.add_argument("--modes", default="w4a16,w4a4", help="w4a16 (bf16 activations), w4a4 (block values of "
                                                         "the quantization kernel, timed with it)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_wgmma_configs.py needs a CUDA GPU")
    info, _, _ = measured_env(tensor_core=False)
    clusters = cuda_wgmma.cluster_ctas(0)
    info["cluster_ctas"] = clusters
    info["sms"] = cuda_wgmma.num_sms(0)
    out = {"env": info, "cells": []}
    start = time.time()
    for spec in args.shapes.split(","):
        n, k = shape_of(spec)
        weights = rotating_fp4_weights(n, k, MARLIN)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for mode in args.modes.split(","):
                cell = sweep_cell(x, weights, n, k, args.rounds, clusters, mode == "w4a4")
                out["cells"].append(cell)
                write_json("sweep_wgmma_configs.json", out)
                print(f"{time.time() - start:6.0f}s {mode:<5} {cell['shape']:>11} M={m:<5} pick {cell['pick']:<10} "
                      f"{cell['us'][cell['pick']]:8.2f} us, best {cell['best']:<10} {cell['us'][cell['best']]:8.2f} us "
                      f"({cell['pick_over_best']:.3f}x){' ERRORS ' + str(cell['errors']) if cell['errors'] else ''}",
                      flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
