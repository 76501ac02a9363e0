"""Where a call of the wgmma kernel spends its time: per-CTA event times of one launch.

Builds the kernel with -DFP4C_TIMELINE (one thread per CTA records %globaltimer at the events of
``TimelineEvent`` in csrc/hopper/nvfp4_wgmma.cu; 32 ns resolution on an H100), replays a CUDA
graph of calls over rotating weights (as bench_linear.py times them), reads the last launch's
events and prints, per case, the median over CTAs of each phase in microseconds, next to the
graph time per call of the package's build and of the timeline build:

    python benchmarks/timeline_wgmma.py [--cases 4096x4096x64,4096x4096x128:128x1s2w]

A case is NxKxM, optionally :BNxWMsS[w] (tile, K splits, w: reduced through global memory)
instead of the launch configuration's choice. Phases: ``launch`` (the graph's time per call minus
the launch's span: launch and the gap between kernels), ``set_up`` (CTA start to barriers set and
the kernel before complete), ``to_first_load``, ``first_data`` (first stage's loads to landed),
``main_loop`` (not recorded by the persistent kernel), ``publish`` (a K split's slices but the
last: partial tile stored and counted), ``wait_peers`` and ``sum_peers`` (the last slice: waiting
for the others, adding their tiles; in a cluster, every CTA: its tile staged and the cluster barrier
passed, then its share of the outputs read from the cluster's tiles, summed and stored), ``store``
(the output; in a cluster the last barrier, which waits for the slowest CTA's share), ``span``
(first CTA start to last CTA end).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import capture_graph, measured_env, print_table, rotating_fp4_weights, time_graphs_us, write_json  # noqa: E402

from fp4_compile.ops import cuda_wgmma  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402

CTAS, EVENTS = 4096, 8  # kTimelineCtas, kTimelineEvents
(ENTRY, SET_UP, FIRST_LOAD, FIRST_DATA, LOOP_END, PUBLISHED, SUMMED, END) = range(EVENTS)
DEFAULT_CASES = "4096x4096x64,4096x4096x128,4096x14336x64,6144x4096x64,28672x4096x64,4096x4096x1024"


def parse_case(case: str) -> tuple[int, int, int, dict]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?::(\d+)x(\d+)s(\d+)(w?))?", case)
    if m is None:
        raise SystemExit(f"bad case {case!r}: NxKxM or NxKxM:BNxWMsS[w]")
    n, k, rows = (int(v) for v in m.group(1, 2, 3))
    opts = {}
    if m.group(4):
        opts = dict(tile=(int(m.group(4)), int(m.group(5))), splits=int(m.group(6)), workspace=m.group(7) == "w")
    return n, k, rows, opts


def phases(t: torch.Tensor, graph_us: float) -> dict:
    """Median over the CTAs that recorded both ends of each phase (us); t: [CTAs, EVENTS] ns."""
    t = t[t[:, ENTRY] > 0]
    start = t[:, ENTRY].min()
    span = (t[:, END].max() - start).item() / 1e3

    def med(a: int, b: int, rows=None) -> float | None:
        sel = (t[:, a] > 0) & (t[:, b] > 0)
        if rows is not None:
            sel &= rows
        return round((t[sel, b] - t[sel, a]).double().median().item() / 1e3, 2) if sel.any() else None

    last_slice = t[:, SUMMED] > 0
    other_slice = (t[:, PUBLISHED] > 0) & ~last_slice
    return {
        "ctas": int(t.shape[0]), "launch": round(graph_us - span, 2), "set_up": med(ENTRY, SET_UP),
        "to_first_load": med(SET_UP, FIRST_LOAD), "first_data": med(FIRST_LOAD, FIRST_DATA),
        "main_loop": med(FIRST_DATA, LOOP_END), "publish": med(LOOP_END, PUBLISHED, other_slice),
        "wait_peers": med(LOOP_END, PUBLISHED, last_slice), "sum_peers": med(PUBLISHED, SUMMED, last_slice),
        "store": med(SUMMED, END, last_slice) if last_slice.any() else med(LOOP_END, END), "span": round(span, 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="NxKxM[:BNxWMsS[w]], comma-separated")
    args = ap.parse_args()
    info, _, _ = measured_env(tensor_core=False)
    lib = cuda_wgmma.load_library(cuda_wgmma.SOURCE, "nvfp4_wgmma_timeline", extra_flags=("-DFP4C_TIMELINE",))
    lib.fp4c_nvfp4_wgmma_timeline.argtypes = [ctypes.c_void_p]
    events = torch.zeros(CTAS, EVENTS, dtype=torch.int64)
    rows = []
    for case in args.cases.split(","):
        n, k, m, opts = parse_case(case)
        ws = rotating_fp4_weights(n, k, MARLIN)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        alphas = [(1 / gw).float() for _, _, gw in ws]
        label = cuda_wgmma.LaunchConfig(*opts["tile"], opts["splits"], opts["workspace"]).label if opts else \
            cuda_wgmma.device_launch_config(m, n, k, 0).label

        def calls(library, weights=ws):
            return [lambda w=w, a=a: cuda_wgmma.wgmma_gemm(x, w[0], w[1], a, n=n, out_dtype=torch.bfloat16,
                                                         library=library, **opts) for w, a in zip(weights, alphas)]

        times = time_graphs_us({"package": calls(None), "timeline": calls(lib)})
        graph = capture_graph(calls(lib))
        graph.replay()
        torch.cuda.synchronize()
        if lib.fp4c_nvfp4_wgmma_timeline(events.data_ptr()) != 0:  # (zeroes the events)
            raise RuntimeError("reading the timeline failed")
        graph.replay()  # the last call's CTAs write last
        torch.cuda.synchronize()
        if lib.fp4c_nvfp4_wgmma_timeline(events.data_ptr()) != 0:
            raise RuntimeError("reading the timeline failed")
        row = {"case": f"{n}x{k} M={m}", "config": label, "package_us": round(times["package"], 2),
               "timeline_us": round(times["timeline"], 2), **phases(events, times["timeline"])}
        print(row, flush=True)
        rows.append(row)
        del ws, graph
        torch.cuda.empty_cache()
    path = write_json("timeline_wgmma.json", {"env": info, "rows": rows})
    print_table(rows, list(rows[0]), title=f"wgmma kernel, median phase times over CTAs (us) -> {path}")


if __name__ == "__main__":
    main()
