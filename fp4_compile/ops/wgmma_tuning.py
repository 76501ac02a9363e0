"""Measuring the wgmma kernel's launch configurations on this GPU (``fp4c tune``,
``benchmarks/sweep_wgmma_configs.py``) and choosing a table of picks from the timings
(``wgmma_tables``, ``benchmarks/make_wgmma_table.py``).

A sweep times every (tile, K split, reduction) of ``cuda_wgmma.launch_configs`` at each (layer shape, M,
mode) as a CUDA graph over rotating weights, the graphs replayed in turns so that clock drift hits every
variant alike (``gpu_timing``). Modes: W4A16 (bf16 activations) and W4A4 (the quantization kernel's block
values fed to the kernel, which starts while the quantization kernel runs: the two modes can rank two
configurations the other way round, NOTES.md v28c). A table keeps, per cell, the variant of least
geometric-mean time over the modes where the cost model's pick ran a margin or more slower, and no mode
more than TOLERANCE slower than with the model's pick.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

import torch

from .. import format as fmt
from . import cuda_wgmma, nvcc
from .gpu_quant import fake_quantize_nvfp4_gpu
from .gpu_timing import relative_error, rotating_fp4_weights, time_graphs_us
from .hopper import MARLIN
from .wgmma_tables import POWER_OF_TWO_SPLITS, ShapePicks, device_identity, kernel_build

MODES = ("w4a16", "w4a4")
M_GRID = (17, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # the built-in table's; up to cuda_wgmma.LARGE_M
MARGIN = 0.02  # a measured pick replaces the cost model's where the model's ran this much slower or more
ROUNDS = 3  # turns of replays per variant (5 replays each)
TOLERANCE = 0.01  # ... and no mode runs more than this much slower with it (the others gaining more)
GRAPH_BYTES = 16 * 2**30  # outputs held by the graphs timed together (each keeps its own memory pool)

Cells = dict[tuple[int, int, int], dict[str, dict[str, float]]]  # (N, K, M) -> mode -> label -> us


def _time_in_chunks(calls: dict[str, list[Callable[[], Any]]], pick: str, rounds: int,
                    bytes_per_graph: int) -> dict[str, float]:
    """``time_graphs_us`` over as many graphs at once as GRAPH_BYTES allows; every chunk also times
    the pick, and its times are scaled by the pick's first time over its time in the chunk (drift)."""
    per_chunk = max(2, GRAPH_BYTES // max(bytes_per_graph, 1))
    others = [label for label in calls if label != pick]
    times: dict[str, float] = {}
    for i in range(0, len(others), per_chunk - 1):
        chunk = time_graphs_us({label: calls[label] for label in [pick, *others[i:i + per_chunk - 1]]},
                               rounds=rounds)
        scale = times.setdefault(pick, chunk[pick]) / chunk[pick]
        times.update({label: t * scale for label, t in chunk.items() if label != pick})
    return times if others else time_graphs_us(calls, rounds=rounds)


def sweep_cell(x: torch.Tensor, weights: list, n: int, k: int, rounds: int, w4a4: bool) -> dict[str, Any]:
    """Median us of every launch configuration of an [M, K] x [n, K] call (``weights``: rotating
    ``gpu_timing.make_fp4_weights`` items for MARLIN), and the cost model's pick. ``w4a4``: each call is
    the quantization kernel's block values of x fed to the kernel, else x itself (W4A16). Each variant's
    output is checked against the pick's before it is timed; a wrong one is reported, never timed."""
    m, index = x.shape[0], nvcc.device_index(x.device)
    clusters = cuda_wgmma.cluster_ctas(index)
    pick = cuda_wgmma.launch_config(m, n, k, cuda_wgmma.num_sms(index), clusters)
    gx = fmt.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    alphas = [(1 / (gx * gw) if w4a4 else 1 / gw).float() for _, _, gw in weights]

    def call(cfg, w, a):
        xa = fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16) if w4a4 else x
        return cuda_wgmma.wgmma_gemm(xa, w[0], w[1], a, n=n, out_dtype=torch.bfloat16, tile=(cfg.bn, cfg.wm),
                                     splits=cfg.splits, workspace=cfg.workspace)

    expected = call(pick, weights[0], alphas[0])
    calls, errors = {}, {}
    for cfg in cuda_wgmma.launch_configs(k, clusters):
        err = relative_error(call(cfg, weights[0], alphas[0]), expected)
        if err > 1e-2:
            errors[cfg.label] = err
            continue
        calls[cfg.label] = [lambda cfg=cfg, w=w, a=a: call(cfg, w, a) for w, a in zip(weights, alphas)]
    times = _time_in_chunks(calls, pick.label, rounds, m * n * 2 * len(weights))
    best = min(times, key=times.get)
    return {"shape": f"{n}x{k}", "n": n, "k": k, "m": m, "mode": "w4a4" if w4a4 else "w4a16", "pick": pick.label,
            "best": best, "pick_over_best": round(times[pick.label] / times[best], 4),
            "us": {label: round(t, 3) for label, t in sorted(times.items(), key=lambda kv: kv[1])}, "errors": errors}


def sweep_shape(n: int, k: int, ms: tuple[int, ...], modes: tuple[str, ...] = MODES, rounds: int = ROUNDS,
                device: torch.device | str = "cuda") -> Iterator[dict[str, Any]]:
    """``sweep_cell`` of each M and mode of one layer shape, on random weights made here."""
    weights = rotating_fp4_weights(n, k, MARLIN, device)
    try:
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            for mode in modes:
                yield sweep_cell(x, weights, n, k, rounds, mode == "w4a4")
    finally:
        del weights
        torch.cuda.empty_cache()


def sweep_env(device_index: int) -> dict[str, Any]:
    """What a sweep's timings hold for: the device (``wgmma_tables.device_identity`` and its cluster capacity,
    which ``merge_cells`` compares), the kernel's build (``wgmma_tables.kernel_build``) and when."""
    return {**device_identity(device_index), "cluster_ctas": cuda_wgmma.cluster_ctas(device_index),
            "splits": list(cuda_wgmma.SPLITS), "kernel": kernel_build(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def timed_splits(env: dict[str, Any]) -> tuple[int, ...]:
    """The K split counts whose variants a sweep timed (sweeps from before the 3- and 6-way splits have no
    record of them: the powers of two)."""
    return tuple(env.get("splits", POWER_OF_TWO_SPLITS))


def cluster_capacity(env: dict[str, Any]) -> dict[int, int]:
    """A sweep's cluster capacity, keyed by split count (JSON keeps the keys as strings)."""
    return {int(s): c for s, c in env["cluster_ctas"].items()}


def merge_cells(sweeps: list[dict[str, Any]]) -> tuple[dict[str, Any], Cells]:
    """(env of the first sweep, with the split counts all of them timed; its cells and those of the others):
    a cell timed by several sweeps of one kernel build gets the geometric mean of each variant's times over
    them (the variants every one of them timed); a later sweep (in list order) of another build (env
    "kernel"; sweeps before it had none) replaces the cell's earlier timings, which no longer hold. A sweep
    of another device (SMs, cluster capacity) is a ValueError."""
    env: dict[str, Any] | None = None
    runs: dict[tuple[int, int, int], dict[str, tuple[str | None, list[dict[str, float]]]]] = {}
    for i, sweep in enumerate(sweeps):
        env = env or sweep["env"]
        if (sweep["env"]["sms"], cluster_capacity(sweep["env"])) != (env["sms"], cluster_capacity(env)):
            raise ValueError(f"sweep {i} was timed on another device than sweep 0")
        kernel = sweep["env"].get("kernel")
        for cell in sweep["cells"]:
            modes = runs.setdefault((cell["n"], cell["k"], cell["m"]), {})
            mode = cell.get("mode", "w4a16")
            if mode not in modes or modes[mode][0] != kernel:
                modes[mode] = (kernel, [])
            modes[mode][1].append(cell["us"])
    cells: Cells = {}
    for key, modes in runs.items():
        cells[key] = {}
        for mode, (_, timed) in modes.items():
            labels = set.intersection(*(set(r) for r in timed))
            cells[key][mode] = {label: math.exp(sum(math.log(r[label]) for r in timed) / len(timed))
                                for label in labels}
    if env is None:
        return {}, cells
    splits = set.intersection(*(set(timed_splits(sweep["env"])) for sweep in sweeps))
    return {**env, "splits": sorted(splits)}, cells


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


def model_pick(env: dict[str, Any], n: int, k: int, m: int) -> str:
    """The cost model's pick for a cell of a sweep on ``env``'s device, among the split counts it timed."""
    return cuda_wgmma.launch_config(m, n, k, env["sms"], cluster_capacity(env), timed_splits(env)).label


def picks_from_cells(env: dict[str, Any], cells: Cells, margin: float = MARGIN
                     ) -> tuple[dict[tuple[int, int], dict[int, str | None]], list[str]]:
    """({(N, K): {M: the pick, or None for the cost model's}} up to LARGE_M, a line describing each
    override) from ``merge_cells``."""
    picks: dict[tuple[int, int], dict[int, str | None]] = {}
    lines = []
    for (n, k, m), modes in sorted(cells.items()):
        if m > cuda_wgmma.LARGE_M:
            continue
        model = model_pick(env, n, k, m)
        label, ratios = choice(modes, model, margin)
        picks.setdefault((n, k), {})[m] = label
        if label:
            lines.append(f"{n:>6}x{k:<6} M={m:<4} {model:<10} -> {label:<10} " + ", ".join(
                f"{mode} {modes[mode][model]:7.2f} -> {modes[mode][label]:7.2f} us ({r:.3f})"
                for mode, r in sorted(ratios.items())))
    return picks, lines


def shape_picks(by_m: dict[int, str | None], splits: tuple[int, ...]) -> ShapePicks:
    """One shape's ``picks_from_cells`` as a table entry; ``splits``: the K split counts its sweep timed."""
    grid = tuple(sorted(by_m))
    return ShapePicks(grid, tuple(by_m[m] for m in grid), splits)


def model_slowdowns(env: dict[str, Any], cells: Cells) -> list[float]:
    """The cost model's pick over the best variant, for each cell and mode up to LARGE_M."""
    return [us[model_pick(env, n, k, m)] / min(us.values())
            for (n, k, m), modes in cells.items() if m <= cuda_wgmma.LARGE_M for us in modes.values()]


def table_slowdowns(env: dict[str, Any], cells: Cells, picks: dict[tuple[int, int], dict[int, str | None]]
                    ) -> list[float]:
    """As ``model_slowdowns``, for the picks of ``picks_from_cells`` (the cost model's where they keep it)."""
    out = []
    for (n, k, m), modes in cells.items():
        if m > cuda_wgmma.LARGE_M:
            continue
        label = picks[(n, k)][m] or model_pick(env, n, k, m)
        out.extend(us[label] / min(us.values()) for us in modes.values())
    return out


def sweep(shapes: list[tuple[int, int]], ms: tuple[int, ...] = M_GRID, modes: tuple[str, ...] = MODES,
          rounds: int = ROUNDS, device: torch.device | str = "cuda", progress: bool = True) -> Iterator[dict[str, Any]]:
    """``sweep_shape`` of each shape on ``device`` in turn, with a progress bar over all the cells: yields
    ``{"env": sweep_env, "cells": [...]}`` after each shape, so that a caller keeps what an interrupted
    sweep measured."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    index = nvcc.device_index(device)
    with torch.cuda.device(index), tqdm(total=len(shapes) * len(ms) * len(modes), unit="cell", disable=not progress,
                                        desc="timing wgmma launch configurations") as bar:
        env = sweep_env(index)
        for n, k in shapes:
            cells = []
            for cell in sweep_shape(n, k, ms, modes, rounds, torch.device("cuda", index)):
                cells.append(cell)
                bar.set_postfix_str(f"{n}x{k} M={cell['m']} {cell['mode']}")
                bar.update()
            yield {"env": env, "cells": cells}
