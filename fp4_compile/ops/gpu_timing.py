"""Timing GPU calls the way decode runs them: each list of calls captured in one CUDA graph (no launch
overhead), over NVFP4 weight copies that together exceed L2 (every weight read comes from DRAM), the
graphs replayed in turns. Used by ``fp4c tune`` (``wgmma_tuning``) and the benchmarks."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch

from .. import format as fmt

ROTATE_BYTES = 200 * 2**20  # > 200 MB of weights per timed sweep: nothing stays in an H100's 50 MB L2


def copies_for(bytes_per_copy: int) -> int:
    """How many copies of ``bytes_per_copy`` bytes rotate through more than ROTATE_BYTES (at least 2)."""
    return max(2, math.ceil(ROTATE_BYTES / max(bytes_per_copy, 1)))


def fp4_weight_bytes(n: int, k: int) -> int:
    """Bytes of an NVFP4 weight [n, k]: e2m1 codes and e4m3 block scales."""
    return n * k // 2 + n * k // fmt.BLOCK_SIZE


def make_fp4_weights(n: int, k: int, copies: int, kernels: Any, device: torch.device | str = "cuda") -> list:
    """``copies`` independent random NVFP4 weights [n, k] prepared for ``kernels`` (a backend's
    ``prepare_weight``), each as ``(weight, weight_scale, global_scale)``."""
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        gw = fmt.global_scale_from_amax(w.float().abs().amax()).reshape(1)
        pw, sw = fmt.quantize_nvfp4(w, gw)
        wt, wst = kernels.prepare_weight(pw, sw)
        out.append((wt, wst, gw))
        del w, pw, sw
    return out


def rotating_fp4_weights(n: int, k: int, kernels: Any, device: torch.device | str = "cuda") -> list:
    """``make_fp4_weights`` with enough copies to rotate through more than L2 in a timed sweep."""
    return make_fp4_weights(n, k, copies_for(fp4_weight_bytes(n, k)), kernels, device)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b`` (in float64)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def geomean(values: list[float]) -> float:
    """Geometric mean of positive ratios (1.0 for none)."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


def cuda_events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def capture_graph(calls: list[Callable[[], Any]]) -> torch.cuda.CUDAGraph:
    """``calls`` run once on a side stream (compiling and allocating), then captured in one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def time_graphs_us(named_calls: dict[str, list[Callable[[], Any]]], rounds: int = 4, replays: int = 5,
                   warmup: int = 3) -> dict[str, float]:
    """Median time per call (us) of each list of 0-arg callables, each captured in its own CUDA graph.

    The graphs are replayed in turns (``rounds`` times ``replays`` each), so that the clock drift of
    a GPU under sustained load (up to 12% at M >= 1024 within a run) hits every entry alike instead
    of whichever was timed last. A graph's replays of a turn are queued back to back behind one untimed
    replay, as a decode loop issues them, with no wait between them (timing each replay on an idle GPU
    instead measured 0-3% longer on the H100, NOTES.md v32a). A graph must keep the GPU busier than the
    host's launch of it, or this times the host: a few empty kernels a graph did (v32a)."""
    graphs = {name: (capture_graph(calls), len(calls)) for name, calls in named_calls.items()}
    for g, _ in graphs.values():
        for _ in range(warmup):
            g.replay()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, (g, n) in graphs.items():
            g.replay()  # keeps the GPU busy while the host launches the timed replays
            events = [cuda_events() for _ in range(replays)]
            for a, b in events:
                a.record()
                g.replay()
                b.record()
            events[-1][1].synchronize()
            samples[name] += [a.elapsed_time(b) * 1000.0 / n for a, b in events]
    del graphs
    return {name: statistics.median(ts) for name, ts in samples.items()}
