"""Write fp4_compile/ops/tuned_wgmma_h100.py from sweeps of the wgmma kernel's launch configurations.

python benchmarks/make_wgmma_table.py SWEEP.json [SWEEP.json ...] [--margin 0.02]
python benchmarks/make_wgmma_table.py --score SWEEP.json [...]   (the cost model against each sweep; writes nothing)

For each (N, K) and M of the sweeps (``benchmarks/sweep_wgmma_configs.py``, run on an H100; a cell in
several sweeps takes the geometric mean of each variant's times) up to ``cuda_wgmma.LARGE_M`` (above it
the dispatch may leave the kernel), the table keeps the variant measured fastest over the modes swept
where the cost model's own pick ran ``margin`` or more slower, and no entry (the cost model) elsewhere
(``fp4_compile.ops.wgmma_tuning``, whose rule ``fp4c tune`` applies to a device's own table). Prints the
cells it overrides. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fp4_compile.ops.gpu_timing import geomean  # noqa: E402
from fp4_compile.ops.wgmma_tuning import (MARGIN, cluster_capacity, merge_cells, model_slowdowns,  # noqa: E402
                                          picks_from_cells, timed_splits)

OUT = os.path.join(ROOT, "fp4_compile", "ops", "tuned_wgmma_h100.py")


def merged_cells(paths: list[str]) -> tuple[dict, dict]:
    """``wgmma_tuning.merge_cells`` of the sweep files."""
    try:
        return merge_cells([json.load(open(path)) for path in paths])
    except ValueError as e:
        sys.exit(f"{e} ({paths})")


def table(env: dict, cells: dict, margin: float) -> tuple[tuple[int, ...], dict, list[str]]:
    """(the M grid, picks per (N, K) on it, lines describing each override) from ``merged_cells``."""
    picks, lines = picks_from_cells(env, cells, margin)
    grid = sorted({m for v in picks.values() for m in v})
    if any(sorted(v) != grid for v in picks.values()):
        sys.exit("every shape of the sweeps needs the same M values")
    return tuple(grid), {nk: tuple(v[m] for m in grid) for nk, v in sorted(picks.items())}, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep_wgmma_configs.json files")
    ap.add_argument("--margin", type=float, default=MARGIN,
                    help="override the cost model where its pick ran at least this much slower than the best")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--score", action="store_true",
                    help="print how the cost model's picks do against each sweep (geomean and worst), write nothing")
    args = ap.parse_args()
    if args.score:
        for path in args.sweeps:
            env, cells = merged_cells([path])
            ratios = model_slowdowns(env, cells)
            print(f"{os.path.relpath(path, ROOT)}: the model's pick over the best {geomean(ratios):.4f}x "
                  f"(geomean of {len(ratios)} cell-modes), worst {max(ratios):.3f}x")
        return
    env, cells = merged_cells(args.sweeps)
    grid, picks, lines = table(env, cells, args.margin)
    print("\n".join(lines))
    overrides = sum(1 for v in picks.values() for label in v if label)
    entries = sum(len(v) for v in picks.values())
    about = f"{env['gpu']} ({env['sms']} SMs), torch {env['torch']}, {len(args.sweeps)} sweep(s) from {env['time']}"
    src = ('"""Measured launch configurations of the wgmma kernel on the H100 SXM (generated; benchmarks/NOTES.md v28).'
           "\n\nRegenerate: python benchmarks/sweep_wgmma_configs.py on the GPU, then\n"
           'python benchmarks/make_wgmma_table.py sweep_wgmma_configs.json [...].\n"""\n\n'
           f"ABOUT = {about!r}\n"
           "SWEEPS = (  # the table's sources\n" + "".join(f"    {os.path.relpath(path, ROOT)!r},\n"
                                                         for path in args.sweeps) + ")\n"
           f"MARGIN = {args.margin}  # overridden where the cost model's pick ran this much slower or more"
           f" ({overrides} of {entries} cells)\n"
           f"CAPABILITY = (9, 0)\nSMS = {env['sms']}\n"
           f"CLUSTER_CTAS = {cluster_capacity(env)!r}  # CTAs of the kernel that fit at once, per cluster size\n"
           f"SPLITS = {timed_splits(env)!r}  # the K split counts of the variants its sweeps timed\n"
           f"M_GRID = {grid!r}\n"
           "# (N, K) -> one entry per M_GRID value: for M above the value before and up to this one, the\n"
           "# launch configuration (LaunchConfig.label), or None for the cost model's pick.\n"
           "# fmt: off\nPICKS = {\n" + "".join(f"    {nk!r}: {v!r},\n" for nk, v in picks.items()) + "}\n")
    with open(args.out, "w") as f:
        f.write(src)
    print(f"wrote {args.out}: {overrides} overrides in {entries} cells "
          f"(geomean of the model's pick / best over them: {geomean(model_slowdowns(env, cells)):.4f})")


if __name__ == "__main__":
    main()
