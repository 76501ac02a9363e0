"""Compile time of a small NVFP4 transformer block: backend="fp4" vs backend="inductor".

Each run is a whole new Python process with an empty TORCHINDUCTOR_CACHE_DIR (nothing
cached: Inductor's FX graph cache, AOTAutograd cache and the C++/Triton kernel caches all
start empty). Reported per backend, the median over --runs of

  process   wall time of the whole process (interpreter start, imports, model build,
            compile + first call, exit)
  compile   the first call of the compiled model (Dynamo + AOTAutograd + Inductor with
            its passes + kernel compilation + one run)
  fp4 pass  of that, the time spent in the fp4 post-grad pass (registering the 16
            patterns on first use, matching, replacing)

"inductor" compiles the same model with its unfused chain (quantize -> mm -> add as
extern calls); "fp4" adds the fusion pass. Usage:

    python benchmarks/compile_time.py [--runs 5] [--device cpu|cuda] [--dynamic]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def build_model(device: str):
    import torch
    from torch import nn

    from fp4_compile import quantize_model

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from models import Block  # the compile tests' block, at benchmark size

    class Sized(Block):
        def __init__(self) -> None:
            super().__init__(hidden=256, heads=4, ffn=1024)

    torch.manual_seed(0)
    model = nn.Sequential(Sized(), Sized()).eval().to(device)  # 8 NVFP4Linears
    quantize_model(model, calibration_data=[torch.randn(2, 16, 256, device=device)], progress=False)
    model[1].fc2.input_global_scale = None  # one dynamic activation scale
    model[1].fc2.refresh_alpha()
    return model


def child(backend: str, device: str, dynamic: bool) -> None:
    start = time.perf_counter()
    import torch

    import fp4_compile  # noqa: F401

    model = build_model(device)
    x = torch.randn(2, 16, 256, device=device)
    pass_s = [0.0]
    if backend == "fp4":  # time spent in the fp4 post-grad pass (pattern registration included)
        from fp4_compile.passes.manager import FP4PostGradPass

        original = FP4PostGradPass.__call__

        def timed(self, graph):
            t = time.perf_counter()
            try:
                return original(self, graph)
            finally:
                pass_s[0] += time.perf_counter() - t

        FP4PostGradPass.__call__ = timed
    ready = time.perf_counter()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic or None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(x)
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
    print(json.dumps({"setup_s": ready - start, "compile_s": compile_s, "pass_s": pass_s[0]}))


def measure(backend: str, device: str, dynamic: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="fp4-compile-time-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        cmd = [sys.executable, __file__, "--child", backend, "--device", device] + ["--dynamic"] * dynamic
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        process_s = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{backend} run failed:\n{proc.stderr[-4000:]}")
    return {"process_s": process_s, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dynamic", action="store_true")
    parser.add_argument("--child", metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the raw runs as JSON too")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device, args.dynamic)
        return

    results: dict[str, list[dict]] = {"inductor": [], "fp4": []}
    for _ in range(args.runs):  # interleaved, so that machine load affects both alike
        for backend in results:
            results[backend].append(measure(backend, args.device, args.dynamic))
    import torch

    print(f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPUs, dynamic={args.dynamic}, "
          f"median of {args.runs} runs, fresh cache dir each")
    print(f"{'backend':<10}{'process s':>11}{'compile s':>11}{'fp4 pass s':>12}{'setup s':>9}   (min-max process)")
    for backend, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lo, hi = min(r["process_s"] for r in runs), max(r["process_s"] for r in runs)
        print(f"{backend:<10}{med['process_s']:>11.2f}{med['compile_s']:>11.2f}{med['pass_s']:>12.3f}"
              f"{med['setup_s']:>9.2f}   ({lo:.2f}-{hi:.2f})")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
