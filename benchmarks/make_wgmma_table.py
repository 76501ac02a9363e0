"""Write fp4_compile/ops/tuned_wgmma_h100.py from sweeps of the wgmma kernel's launch configurations.

python benchmarks/make_wgmma_table.py SWEEP.json [SWEEP.json ...] [--margin 0.02]
python benchmarks/make_wgmma_table.py --score SWEEP.json [...]   (the cost model against each sweep; writes nothing)

For each (N, K) and M of the sweeps (``benchmarks/sweep_wgmma_configs.py``, run on an H100; a cell in
several sweeps takes the geometric mean of each variant's times) up to ``cuda_wgmma.LARGE_M`` (above it
the dispatch may leave the kernel), the table keeps the variant measured fastest over the modes swept
(W4A16, W4A4: geometric mean, no mode more than TOLERANCE slower) where the cost model's own pick ran
``margin`` or more slower, and no entry (the cost model) elsewhere. Prints the cells it overrides. Runs
on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fp4_compile.ops import cuda_wgmma as W  # noqa: E402

TOLERANCE = 0.01  # a mode may run this much slower with an override (the others gaining more)
OUT = os.path.join(ROOT, "fp4_compile", "ops", "tuned_wgmma_h100.py")


def merged_cells(paths: list[str]) -> tuple[dict, dict]:
    """(env of the first sweep, {(N, K, M): {mode: {label: us}}}): a cell timed by several sweeps gets the
    geometric mean of each variant's times over them (the variants every one of them timed)."""
    env, times = None, {}
    for path in paths:
        data = json.load(open(path))
        env = env or data["env"]
        if (data["env"]["sms"], data["env"]["cluster_ctas"]) != (env["sms"], env["cluster_ctas"]):
            sys.exit(f"{path} was swept on another device")
        for cell in data["cells"]:
            key = (cell["n"], cell["k"], cell["m"])
            times.setdefault(key, {}).setdefault(cell.get("mode", "w4a16"), []).append(cell["us"])
    merged = {}
    for key, modes in times.items():
        merged[key] = {}
        for mode, runs in modes.items():
            labels = set.intersection(*(set(r) for r in runs))
            merged[key][mode] = {label: math.exp(sum(math.log(r[label]) for r in runs) / len(runs))
                                 for label in labels}
    return env, merged


def choice(modes: dict[str, dict[str, float]], model: str, margin: float) -> tuple[str | None, dict[str, float]]:
    """(the variant to take instead of the cost model's pick, or None; its time over the pick's per mode): of
    the variants no mode runs more than TOLERANCE slower than the pick, the one of least geometric mean time
    over the modes, where that mean is at least ``margin`` below the pick's."""
    labels = set.intersection(*(set(us) for us in modes.values()))

    def ratios(label):
        return {mode: us[label] / us[model] for mode, us in modes.items()}

    eligible = [label for label in labels if max(ratios(label).values()) <= 1 + TOLERANCE]
    best = min(eligible, key=lambda label: math.prod(ratios(label).values()))
    mean = math.prod(ratios(best).values()) ** (1 / len(modes))
    return (best if mean * (1 + margin) <= 1 else None), ratios(best)


def table(env: dict, cells: dict, margin: float) -> tuple[tuple[int, ...], dict, list[str]]:
    """(the M grid, picks per (N, K) on it, lines describing each override) from ``merged_cells``."""
    sms, clusters = env["sms"], {int(s): c for s, c in env["cluster_ctas"].items()}
    picks: dict[tuple[int, int], dict] = {}
    lines = []
    for (n, k, m), modes in sorted(cells.items()):
        if m > W.LARGE_M:
            continue
        model = W.launch_config(m, n, k, sms, clusters).label
        label, ratios = choice(modes, model, margin)
        picks.setdefault((n, k), {})[m] = label
        if label:
            lines.append(f"{n:>6}x{k:<6} M={m:<4} {model:<10} -> {label:<10} " + ", ".join(
                f"{mode} {modes[mode][model]:7.2f} -> {modes[mode][label]:7.2f} us ({r:.3f})"
                for mode, r in sorted(ratios.items())))
    grid = sorted({m for v in picks.values() for m in v})
    if any(sorted(v) != grid for v in picks.values()):
        sys.exit("every shape of the sweeps needs the same M values")
    return tuple(grid), {nk: tuple(v[m] for m in grid) for nk, v in sorted(picks.items())}, lines


def model_slowdowns(env: dict, cells: dict) -> list[float]:
    """The cost model's pick over the best variant, for each cell and mode up to LARGE_M."""
    clusters = {int(s): c for s, c in env["cluster_ctas"].items()}
    return [us[W.launch_config(m, n, k, env["sms"], clusters).label] / min(us.values())
            for (n, k, m), modes in cells.items() if m <= W.LARGE_M for us in modes.values()]


def geomean_slower(env: dict, cells: dict) -> float:
    """``model_slowdowns``' geometric mean."""
    ratios = model_slowdowns(env, cells)
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep_wgmma_configs.json files")
    ap.add_argument("--margin", type=float, default=0.02,
                    help="override the cost model where its pick ran at least this much slower than the best")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--score", action="store_true",
                    help="print how the cost model's picks do against each sweep (geomean and worst), write nothing")
    args = ap.parse_args()
    if args.score:
        for path in args.sweeps:
            env, cells = merged_cells([path])
            ratios = model_slowdowns(env, cells)
            print(f"{os.path.relpath(path, ROOT)}: the model's pick over the best {geomean_slower(env, cells):.4f}x "
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
           f"M_GRID = {grid!r}\n"
           "# (N, K) -> one entry per M_GRID value: for M above the value before and up to this one, the\n"
           "# launch configuration (LaunchConfig.label), or None for the cost model's pick.\n"
           "# fmt: off\nPICKS = {\n" + "".join(f"    {nk!r}: {v!r},\n" for nk, v in picks.items()) + "}\n")
    with open(args.out, "w") as f:
        f.write(src)
    print(f"wrote {args.out}: {overrides} overrides in {entries} cells "
          f"(geomean of the model's pick / best over them: {geomean_slower(env, cells):.4f})")


if __name__ == "__main__":
    main()
