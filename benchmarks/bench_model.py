"""A stack of Llama-3-8B-shaped decoder layers (random weights): bf16 + Inductor vs NVFP4 + backend="fp4".

Per layer: RMSNorm, q/k/v/o projections, SDPA (GQA 32/8 heads) over a 1024-token KV cache
(decode) or causal over the prompt (prefill), RMSNorm, gate/up, SiLU*mul, down. Decode steps of
1 and 16 sequences (one token each) run inside CUDA graphs (captured around the compiled model);
a 2048-token prefill runs eagerly through the compiled model (under torch.no_grad, and under
torch.inference_mode as vLLM runs models; the models in turns, so that the host's drift, which bounds
eager prefill, is the same for all), and also inside a CUDA graph (the GPU time alone).
Medians of CUDA-event timings. A decode step is timed two ways: one replay on an idle GPU (``decode1_us``:
the graph launch's host time is partly on the clock) and replays queued back to back (``decode1_queued_us``:
each launch hidden behind the step before, as in a decode loop whose host runs ahead).

With ``--merged`` the layers hold q/k/v as one projection and gate/up as one, as vLLM's model
definitions do (``QKVParallelLinear``, ``MergedColumnParallelLinear``): fewer, larger GEMMs for both
models (results in ``bench_model_merged.json``).

python benchmarks/bench_model.py [--layers 4] [--backends triton-w4a4,marlin] [--merged] [--no-prefill]
    [--steps decode1,decode16,prefill] [--prefill-reps 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as Fn
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_info, print_table, write_json  # noqa: E402

import fp4_compile  # noqa: E402
from fp4_compile.format import block_values  # noqa: E402

D, H, KVH, HD, FF, CACHE = 4096, 32, 8, 128, 14336, 1024


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight


class Layer(nn.Module):
    def __init__(self, merged: bool = False):
        super().__init__()
        self.merged = merged
        self.ln1, self.ln2 = RMSNorm(D), RMSNorm(D)
        if merged:
            self.qkv_proj = nn.Linear(D, (H + 2 * KVH) * HD, bias=False)
            self.gate_up_proj = nn.Linear(D, 2 * FF, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * HD, bias=False)
            self.k_proj = nn.Linear(D, KVH * HD, bias=False)
            self.v_proj = nn.Linear(D, KVH * HD, bias=False)
            self.gate_proj = nn.Linear(D, FF, bias=False)
            self.up_proj = nn.Linear(D, FF, bias=False)
        self.o_proj = nn.Linear(H * HD, D, bias=False)
        self.down_proj = nn.Linear(FF, D, bias=False)

    def forward(self, x, k_cache=None, v_cache=None):
        b, t, _ = x.shape
        h = self.ln1(x)
        if self.merged:
            q, k, v = self.qkv_proj(h).split([H * HD, KVH * HD, KVH * HD], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.reshape(b, t, H, HD).transpose(1, 2)
        k = k.reshape(b, t, KVH, HD).transpose(1, 2)
        v = v.reshape(b, t, KVH, HD).transpose(1, 2)
        if k_cache is not None:
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
            a = Fn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            a = Fn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, H * HD))
        h = self.ln2(x)
        if self.merged:
            gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(h), self.up_proj(h)
        return x + self.down_proj(Fn.silu(gate) * up)


class Stack(nn.Module):
    def __init__(self, n, merged: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(Layer(merged) for _ in range(n))

    def forward(self, x, caches=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, *(caches[i] if caches is not None else (None, None)))
        return x


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def random_stack(layers: int, merged: bool = False) -> Stack:
    """The bf16 layers on the GPU with seeded random weights (std 0.02)."""
    torch.manual_seed(0)
    model = Stack(layers, merged).to("cuda", torch.bfloat16).eval()
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model


def decode_inputs(tokens: int, layers: int) -> tuple[torch.Tensor, list]:
    """A decode step's input (``tokens`` sequences, one token each) and the layers' KV caches."""
    x = torch.randn(tokens, 1, D, device="cuda", dtype=torch.bfloat16)
    caches = [(torch.randn(tokens, KVH, CACHE, HD, device="cuda", dtype=torch.bfloat16),) * 2 for _ in range(layers)]
    return x, caches


def capture_graph(fn, args) -> torch.cuda.CUDAGraph:
    """``fn(*args)`` captured in a CUDA graph, after three warm-up calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    return g


class GraphTimes(NamedTuple):
    isolated_us: float  # one replay on an idle GPU: the host's graph launch is partly on the clock
    queued_us: float  # replays queued back to back: each launch hidden behind the step before (a decode loop)


def graph_time_us(fn, args, replays=20) -> GraphTimes:
    """Medians of a replay of ``fn(*args)`` captured in a CUDA graph, timed two ways (see GraphTimes)."""
    return replay_time_us(capture_graph(fn, args), replays)


def replay_time_us(g: torch.cuda.CUDAGraph, replays=20) -> GraphTimes:
    """Medians of a replay of the captured graph ``g``, timed two ways (see GraphTimes)."""
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    isolated = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        isolated.append(a.elapsed_time(b) * 1000)
    queued = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        b.synchronize()
        queued.append(a.elapsed_time(b) * 1000 / replays)
    return GraphTimes(statistics.median(isolated), statistics.median(queued))


def compile_fp4(model):
    return torch.compile(model, backend=fp4_compile.fp4_backend), "fp4"


class W4A16Reference(nn.Module):
    """A W4A16 linear by other means: the weight's block values (e2m1 x e4m3, exact in bf16) times the
    activations in float64, then alpha and the bias, rounded once to the activations' dtype."""

    def __init__(self, layer: "fp4_compile.NVFP4Linear"):
        super().__init__()
        self.register_buffer("values", block_values(*layer.linear_weight()).to(torch.bfloat16))
        self.register_buffer("alpha", torch.reciprocal(layer.weight_global_scale.float()).double())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x.double() @ self.values.double().t()) * self.alpha
        return (out if self.bias is None else out + self.bias).to(x.dtype)


def reference_model(quantized: nn.Module) -> nn.Module:
    """An eager copy of a quantized model that computes what its backend promises, by other means: W4A4
    layers on the exact emulation backend, W4A16 layers as W4A16Reference."""
    ref = copy.deepcopy(quantized)
    for name, module in list(ref.named_modules()):
        if not isinstance(module, fp4_compile.NVFP4Linear):
            continue
        if module.semantics == "W4A4":
            module.set_backend("emulation")
            continue
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, W4A16Reference(module))
    return ref


def bench_decode(model, inputs: dict, r: dict, name: str):
    """The decode steps of ``inputs`` (CUDA graphs) into row ``r``; returns the decode16 output (or None)."""
    ref = None
    with torch.no_grad():
        for key, (x, caches) in inputs.items():
            try:
                times = graph_time_us(model, (x, caches))
                r[f"{key}_us"] = round(times.isolated_us, 1)
                r[f"{key}_queued_us"] = round(times.queued_us, 1)
                if key == "decode16":
                    ref = model(x, caches).float()
            except Exception as e:  # noqa: BLE001
                r[f"{key}_us"] = f"error: {repr(e)[:200]}"
                print(f"{name} {key}: {e!r}", flush=True)
    return ref


def bench_prefill(models: dict, prefill: tuple, rows: dict, reps: int) -> None:
    """The prefill of every compiled model: in a CUDA graph (the GPU time alone), then eagerly, the models in
    turns for ``reps`` rounds (under no_grad, then under inference_mode as vLLM runs a model: ops skip the
    autograd keys). Eager prefill is bound by host time, which drifted between runs a minute apart by more
    than the differences measured (NOTES.md v25); turns put every model under the same drift."""
    x, caches = prefill
    for name, model in models.items():
        try:  # the GPU time alone (eager adds the host's launch overhead)
            with torch.no_grad():
                rows[name]["prefill_graph_us"] = round(graph_time_us(model, (x, caches), replays=10).isolated_us, 1)
        except Exception as e:  # noqa: BLE001
            rows[name]["prefill_graph_us"] = f"error: {repr(e)[:200]}"
    for key, mode in (("prefill", torch.no_grad), ("prefill_inference_mode", torch.inference_mode)):
        with mode():
            for model in models.values():
                for _ in range(2):
                    model(x, caches)
            torch.cuda.synchronize()
            times = {name: [] for name in models}
            for _ in range(reps):
                for name, model in models.items():
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    model(x, caches)
                    b.record()
                    b.synchronize()
                    times[name].append(a.elapsed_time(b) * 1000)
        for name, ts in times.items():
            rows[name][f"{key}_us"] = round(statistics.median(ts), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--backends", default="triton-w4a4,marlin")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--merged", action="store_true", help="q/k/v and gate/up as one projection each (as vLLM)")
    ap.add_argument("--no-prefill", action="store_true", help="decode steps only")
    ap.add_argument("--steps", default="decode1,decode16,prefill", help="which of decode1, decode16, prefill to time")
    ap.add_argument("--prefill-reps", type=int, default=20, help="rounds of the eager prefill, the models in turns")
    args = ap.parse_args()
    json_name = "bench_model_merged.json" if args.merged else "bench_model.json"
    info = env_info()
    print(info, flush=True)
    base = random_stack(args.layers, args.merged)
    inputs = {
        "decode1": decode_inputs(1, args.layers),
        "decode16": decode_inputs(16, args.layers),
        "prefill": (torch.randn(1, args.prefill, D, device="cuda", dtype=torch.bfloat16), None),
    }
    if args.no_prefill:
        del inputs["prefill"]
    steps = args.steps.split(",")
    if unknown := set(steps) - set(inputs) - {"prefill"}:
        ap.error(f"--steps: unknown {sorted(unknown)}")
    calibration = inputs["decode16"]
    inputs = {key: value for key, value in inputs.items() if key in steps}
    rows = []
    results = {"env": info, "layers": args.layers, "merged": args.merged, "rows": rows}
    models = {"bf16": (base, "inductor")}
    failed = []
    for backend in args.backends.split(","):
        q = copy.deepcopy(base)
        try:
            # static activation scales from one calibration batch (decode16 input)
            fp4_compile.quantize_model(q, backend=backend, calibration_data=[calibration], progress=False)
        except Exception as e:  # noqa: BLE001
            print(f"quantize_model({backend}) failed: {e!r}", flush=True)
            failed.append({"model": f"nvfp4 {backend}", "compile": f"error {e!r}"[:200]})
            continue
        models[f"nvfp4 {backend}"] = (q, "fp4")
    row = {name: {"model": name, "compile": how, "weights_MB": round(weight_bytes(model) / 2**20, 1)}
           for name, (model, how) in models.items()}
    rows.extend([*row.values(), *failed])

    def compiled(name):
        model, how = models[name]
        return torch.compile(model, backend="inductor") if how == "inductor" else compile_fp4(model)[0]

    if "prefill" in inputs:
        bench_prefill({name: compiled(name) for name in models}, inputs.pop("prefill"), row, args.prefill_reps)
        torch._dynamo.reset()
        write_json(json_name, results)
    ref_bf16 = None
    # the decode16 output of each model run eagerly, the quantized ones as reference_model (a check, not a
    # timing): bf16's row shows how far Inductor's own roundings move the compiled stack (its fused norm
    # keeps fp32 where eager rounds to bf16)
    references = {}
    if "decode16" in inputs:
        with torch.no_grad():
            for name, (model, how) in models.items():
                references[name] = (reference_model(model) if how == "fp4" else model)(*inputs["decode16"]).float()
        torch.cuda.empty_cache()
    for name in models:  # the decode steps, one model compiled at a time
        t0 = time.time()
        out = bench_decode(compiled(name), inputs, row[name], name)
        row[name]["decode_compile_and_bench_s"] = round(time.time() - t0, 1)
        if name == "bf16":
            ref_bf16 = out
        elif out is not None and ref_bf16 is not None:
            row[name]["decode16_rel_err_vs_bf16"] = round(float((out - ref_bf16).norm() / ref_bf16.norm()), 4)
        if out is not None and name in references:
            # the format's own error is the bf16 comparison's (0.31 W4A16, 0.44 W4A4 on four random layers,
            # the same on the CPU); against the reference only roundings differ (bf16's own row: Inductor's),
            # a wrong kernel shows at once
            ref = references[name]
            row[name]["decode16_rel_err_vs_reference"] = round(float((out - ref).norm() / ref.norm()), 4)
        print(row[name], flush=True)
        write_json(json_name, results)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    for r in rows[1:]:
        for key in ("decode1", "decode1_queued", "decode16", "decode16_queued", "prefill", "prefill_inference_mode", "prefill_graph"):
            if isinstance(r.get(f"{key}_us"), float) and isinstance(rows[0].get(f"{key}_us"), float):
                r[f"{key}_x"] = round(rows[0][f"{key}_us"] / r[f"{key}_us"], 3)
    path = write_json(json_name, results)
    print(f"wrote {path}")
    print_table(rows, ["model", "compile", "weights_MB", "decode1_us", "decode1_x", "decode1_queued_us", "decode1_queued_x",
                       "decode16_us", "decode16_x", "decode16_queued_us", "decode16_queued_x",
                       "prefill_us", "prefill_x", "prefill_inference_mode_us", "prefill_inference_mode_x",
                       "prefill_graph_us", "prefill_graph_x", "decode16_rel_err_vs_bf16",
                       "decode16_rel_err_vs_reference"],
                f"{args.layers} Llama-3-8B-shaped layers{' (merged projections)' if args.merged else ''}, "
                f"{info['gpu']} (decode in CUDA graphs, us per step)")


if __name__ == "__main__":
    main()
