"""``fp4::linear_group`` (one launch for the linears of one activation) against its members' own calls.

The groups of a Llama-3-8B layer: q/k/v (4096, 1024, 1024 rows) and gate/up (14336, 14336 rows), K = 4096,
at decode M. Each way runs inside one CUDA graph over rotating weight sets (> 200 MB, nothing stays in
L2), the graphs replayed in turns; us per group, W4A4 (quantization included) and W4A16, and the
grouped small-M launch of W4A16 also where the backend leaves the members apart. W4A4's members
share one activation global scale, as ``quantize_model`` gives the linears of one input. For gate/up also
``fp4::linear_silu_mul``: the gated launch (SiLU*mul in its epilogue) against the group and one silu_mul
kernel after it (what the graph ran before ``passes/fuse_silu_mul.py``). ``--warps``: the grouped (and for
gate/up the gated) launch of W4A16 also at these warps per CTA, timed in turns with the launch rule's pick
(``cuda_small_m.device_launch_config``: the H100's rule, and 2 warps at M <= 4 on an H200, NOTES.md v45).

python benchmarks/bench_group.py [--ms 1,8,12,16] [--warps 1,2,4,8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (copies_for, env_info, fp4_weight_bytes, make_fp4_weights, print_table,  # noqa: E402
                     time_graphs_us, write_json)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import cuda_small_m  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402
from fp4_compile.ops.silu_mul import silu_mul  # noqa: E402

K = 4096
GROUPS = {"qkv": (4096, 1024, 1024), "gate_up": (14336, 14336)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,8,12,16")
    ap.add_argument("--warps", default="", help="warps per CTA to time the W4A16 kernel group at (default: none)")
    args = ap.parse_args()
    warps_variants = [int(v) for v in args.warps.split(",") if v]
    info = env_info()
    print(info, flush=True)
    rows = []
    for name, ns in GROUPS.items():
        copies = copies_for(sum(fp4_weight_bytes(n, K) for n in ns))
        sets = list(zip(*(make_fp4_weights(n, K, copies, TRITON_W4A4) for n in ns)))  # copies x members
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
            r = {"group": name, "m": m}
            for label, backend in (("w4a4", TRITON_W4A4), ("w4a16", MARLIN)):
                member_sets = [[(wt, wst, gx, (1 / (gx * gw) if backend is TRITON_W4A4 else 1 / gw).float(), None, n)
                                for (wt, wst, gw), n in zip(ws, ns)] for ws in sets]
                r[f"{label}_grouped"] = backend.linear_group(x, member_sets[0]) is not None

                def group(ms, backend=backend):  # what fp4::linear_group runs under capture
                    return backend.linear_group(x, ms) or [backend.linear(x, *mb) for mb in ms]
                ways = {"group": [lambda ms=ms: group(ms) for ms in member_sets],
                        "members": [lambda ms=ms: [backend.linear(x, *mb) for mb in ms] for ms in member_sets]}
                if name == "gate_up":  # fp4::linear_silu_mul: the gated launch, else the group and silu_mul
                    r[f"{label}_gated"] = backend.linear_silu_mul(x, member_sets[0]) is not None
                    ways["group_silu"] = [lambda ms=ms: silu_mul(*group(ms)) for ms in member_sets]
                    ways["gated"] = [lambda ms=ms, backend=backend: backend.linear_silu_mul(x, ms)
                                     if r[f"{label}_gated"] else silu_mul(*group(ms)) for ms in member_sets]
                times = time_graphs_us(ways)
                r[f"{label}_group_us"] = round(times["group"], 2)
                r[f"{label}_members_us"] = round(times["members"], 2)
                r[f"{label}_x"] = round(times["members"] / times["group"], 3)
                if "gated" in times:
                    r[f"{label}_group_silu_us"] = round(times["group_silu"], 2)
                    r[f"{label}_gated_us"] = round(times["gated"], 2)
            # the grouped launch of W4A16 where the backend does not group (M = 9..16 above N = 1024)
            if m <= cuda_small_m.MAX_M:
                gemm_sets = [[(wt, wst, (1 / gw).float(), n, None) for (wt, wst, gw), n in zip(ws, ns)] for ws in sets]
                kinds = [("group", False)] + ([("gated", True)] if name == "gate_up" else [])
                ways = {f"w4a16_kernel_{kind}{f'_w{w}' if w else ''}_us": [
                    lambda gs=gs, gated=gated, w=w: cuda_small_m.small_m_gemm_group(
                        [x] * len(ns), gs, out_dtype=x.dtype, gated=gated, warps=w) for gs in gemm_sets]
                    for kind, gated in kinds for w in [None] + warps_variants}
                r.update({key: round(t, 2) for key, t in time_graphs_us(ways).items()})
            print(r, flush=True)
            rows.append(r)
    path = write_json("bench_group.json", {"env": info, "k": K, "rows": rows})
    print(f"wrote {path}")
    print_table(rows, ["group", "m", "w4a4_grouped", "w4a4_members_us", "w4a4_group_us", "w4a4_x", "w4a16_grouped",
                       "w4a16_members_us", "w4a16_group_us", "w4a16_x", "w4a16_kernel_group_us"],
                f"linear_group against its members' own calls, K={K}, {info['gpu']} (CUDA graphs, us per group)")
    if warps_variants:
        print_table(rows, ["group", "m", "w4a16_kernel_group_us",
                           *[f"w4a16_kernel_group_w{w}_us" for w in warps_variants], "w4a16_kernel_gated_us",
                           *[f"w4a16_kernel_gated_w{w}_us" for w in warps_variants]],
                    "the W4A16 kernel group (and gated launch) at the launch rule's warps and at each --warps (us)")
    print_table([r for r in rows if "w4a4_gated_us" in r],
                ["group", "m", "w4a4_gated", "w4a4_group_silu_us", "w4a4_gated_us", "w4a16_gated", "w4a16_group_silu_us",
                 "w4a16_gated_us"],
                "linear_silu_mul: the gate/up group + a silu_mul kernel against the gated launch (us)")


if __name__ == "__main__":
    main()
