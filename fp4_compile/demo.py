"""The demo behind ``fp4c demo`` / ``make demo``.

A small Llama-style transformers model with seeded random weights (or any local model
directory), quantized to NVFP4 with calibrated activation scales, compiled with
``torch.compile(backend="fp4")``, and compared with the bf16 model: which GEMM backend
runs and why, how many linears the compiler fused into ``fp4.linear``, weight memory,
agreement of the logits, eager and compiled time.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The demo model: Llama-style, tiny enough that `make demo` on 2 CPU cores is quick.
DEMO_CONFIG = dict(
    hidden_size=256,
    intermediate_size=768,  # Llama's 8/3 ratio rounded to a multiple of 256
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in Llama 3
    vocab_size=1024,
    max_position_embeddings=512,
    tie_word_embeddings=True,  # as in Llama 3.2 1B/3B
    rms_norm_eps=1e-5,
)


def build_demo_model(
    *,
    hidden_size: int = DEMO_CONFIG["hidden_size"],
    num_layers: int = DEMO_CONFIG["num_hidden_layers"],
    vocab_size: int = DEMO_CONFIG["vocab_size"],
    intermediate_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A ``LlamaForCausalLM`` with seeded random weights (transformers' own init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(DEMO_CONFIG)
    heads = max(1, hidden_size // 64)
    cfg.update(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
    )
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # _from_config builds in ``dtype`` directly and keeps the rotary tables in float32
        # (``.to(bfloat16)`` would round them too).
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.to(device).eval()


def random_batches(
    vocab_size: int, *, count: int, batch: int, seq_len: int, seed: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, seq_len), generator=g).to(device) for _ in range(count)]


# ---------------------------------------------------------------------------------------
# measurements


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def linear_bytes(model: nn.Module, names: set[str]) -> int:
    """Weight bytes of the linears ``names``: the dense weight, or an NVFP4Linear's packed
    weight, block scales and global scales (biases excluded on both sides)."""
    total = 0
    for n, m in model.named_modules():
        if n not in names:
            continue
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        else:
            total += sum(b.numel() * b.element_size() for bn, b in m.named_buffers() if bn != "bias")
    return total


def agreement(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(mean per-token cosine similarity of the logits, top-1 token agreement)."""
    ref, out = ref.float().flatten(0, -2), out.float().flatten(0, -2)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean().item()
    top1 = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    return cos, top1


def time_call(fn: Callable[[], Any], iters: int) -> float:
    """Best (minimum) seconds of ``fn()`` over ``iters`` runs, after one warm-up: the
    least disturbed by other work on the machine."""
    fn()
    times = []
    for _ in range(max(1, iters)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def compile_backend(name: str) -> tuple[Any, str]:
    """The torch.compile backend for ``name`` ("fp4", "inductor", "aot_eager", "eager") and a note."""
    if name == "fp4":
        from .compile import fp4_backend  # lazy: imports Inductor

        return fp4_backend, "fp4 (Inductor + fp4_compile passes)"
    return name, name


def count_fp4_nodes(codes: list[str]) -> dict[str, int]:
    """fp4 op calls in Inductor's generated code; ``linear``: the linears the fused calls compute (members of
    ``fp4.linear_group`` and ``fp4.linear_silu_mul`` included), ``linear_calls``: the ``fp4.linear`` calls."""
    from .inspection import count_linear_calls

    counts = {op if op != "linear" else "linear_calls": sum(
        len(re.findall(rf"= torch\.ops\.fp4\.{op}\.default\(", code)) for code in codes)
        for op in ("mm", "quantize", "pad_k", "linear_group", "linear_silu_mul", "linear")}
    counts["linear"] = sum(count_linear_calls(code, prefix="= ") for code in codes)
    return counts


def dequantized_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of ``model`` with every NVFP4Linear replaced by an nn.Linear of its dequantized weight."""
    from .layer import NVFP4Linear

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, NVFP4Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight(torch.float32).to(dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, lin)
    return ref


# ---------------------------------------------------------------------------------------
# the demo


@dataclass
class DemoResult:
    rows: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    fused: int = 0
    quantized: int = 0

    def add(self, key: str, value: str) -> None:
        self.rows.append((key, value))

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows)
        lines = [f"{'':-<{width}}  {'':-<60}"]
        for k, v in self.rows:
            first, *rest = str(v).splitlines() or [""]
            lines.append(f"{k:<{width}}  {first}")
            lines.extend(f"{'':<{width}}  {r}" for r in rest)
        lines.append(lines[0])
        return "\n".join(lines)


def backend_reason(backend: str, device: torch.device, requested: str | None) -> str:
    """Why ``backend`` runs: chosen explicitly, by FP4_GEMM_BACKEND, or the best available."""
    from .backends import ENV_OVERRIDE, describe_backends

    if requested:
        return "requested with --backend"
    if os.environ.get(ENV_OVERRIDE):
        return f"{ENV_OVERRIDE}={os.environ[ENV_OVERRIDE]}"
    by_reason: dict[str, list[str]] = {}
    for row in describe_backends(device):
        if row["available"] != "yes":
            first_clause = row["reason"].split(";")[0].strip()  # `fp4c backends` has the whole reason
            by_reason.setdefault(first_clause, []).append(row["backend"])
    lines = [f"best available on {device}"]
    lines += [f"  {', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run_demo(
    *,
    model_dir: str | None = None,
    backend: str | None = None,
    compile_with: str = "fp4",
    device: str | None = None,
    hidden_size: int = DEMO_CONFIG["hidden_size"],
    num_layers: int = DEMO_CONFIG["num_hidden_layers"],
    vocab_size: int = DEMO_CONFIG["vocab_size"],
    batch: int = 4,
    seq_len: int = 64,
    calib_batches: int = 4,
    dynamic: bool = False,
    iters: int = 5,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    from .backends import default_device
    from .checkpoint import check_model_dir, is_nvfp4_checkpoint, load_nvfp4, quantize_transformers_model
    from .layer import nvfp4_layers

    start = time.perf_counter()
    dev = torch.device(device) if device else default_device()
    result = DemoResult()

    # 1. models: the bf16 reference and its NVFP4 version
    if model_dir is None:
        log(f"building a Llama-style model (hidden {hidden_size}, {num_layers} layers, vocab {vocab_size}, seed {seed})")
        ref = build_demo_model(hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, seed=seed, device=dev)
        source = f"random Llama-style (hidden {hidden_size}, {num_layers} layers, vocab {vocab_size}, seed {seed})"
        quant = None
    else:
        path = check_model_dir(model_dir)
        if is_nvfp4_checkpoint(path):
            log(f"loading the NVFP4 checkpoint {path}")
            quant = load_nvfp4(path, backend=backend, device=dev, progress=progress)
            ref = dequantized_copy(quant)
            source = f"{path} (NVFP4 {quant.fp4_checkpoint['format']}); reference: its weights dequantized to bf16"
        else:
            log(f"loading the model {path}")
            ref = _load_dense(path, dev)
            source = str(path)
            quant = None
    vocab = ref.config.vocab_size
    calib = random_batches(vocab, count=calib_batches, batch=batch, seq_len=seq_len, seed=seed + 1, device=dev)
    inputs = random_batches(vocab, count=1, batch=batch, seq_len=seq_len, seed=seed + 2, device=dev)[0]
    if quant is None:
        log(f"quantizing to NVFP4 ({'dynamic activation scales' if dynamic else f'calibrating on {calib_batches} batches'})")
        quant = quantize_transformers_model(
            copy.deepcopy(ref), calibration_data=None if dynamic else [{"input_ids": c, "use_cache": False} for c in calib],
            backend=backend, progress=progress,
        )
    layers = nvfp4_layers(quant)
    result.quantized = len(layers)
    if not layers:
        raise ValueError("the model has no linear layers that NVFP4 can quantize (in_features multiple of 16)")
    first = next(iter(layers.values()))
    static = sum(m.input_global_scale is not None for m in layers.values())

    def forward(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=inputs, use_cache=False).logits

        return run

    # 2. eager
    log("running eager")
    ref_logits = forward(ref)()
    eager_logits = forward(quant)()

    # 3. compiled
    compiled = None
    compile_note = "not compiled (--compile none)"
    counts = {"linear": 0, "mm": 0}
    compiled_logits = None
    compile_s = 0.0
    if compile_with != "none":
        from torch._inductor.utils import run_and_get_code

        torch_backend, compile_note = compile_backend(compile_with)
        log(f"compiling with torch.compile(backend={compile_with!r}) (the first compile on a machine takes a while)")
        compiled = torch.compile(quant, backend=torch_backend)
        t = time.perf_counter()
        if compile_with in ("inductor", "fp4") or not isinstance(torch_backend, str):
            with torch.no_grad():
                out, codes = run_and_get_code(lambda: compiled(input_ids=inputs, use_cache=False).logits)
            counts = count_fp4_nodes(codes)
        else:
            out = forward(compiled)()
        compile_s = time.perf_counter() - t
        compiled_logits = out

    # 4. table
    semantics = first.semantics
    result.add("model", source)
    result.add("NVFP4 GEMM backend", f"{first.backend.value} ({semantics}"
               + (", exact Blackwell numerics" if semantics == "W4A4" else ", bf16 activations") + ")")
    result.add("  why", backend_reason(first.backend.value, first.weight.device, backend))
    result.add("activation scales", f"{static} static (calibrated), {len(layers) - static} dynamic")
    result.add("torch.compile backend", compile_note)
    if compiled is not None:
        if counts["linear"] or counts["mm"] or compile_with in ("fp4", "inductor"):
            nodes = ", ".join([f"{counts['linear_calls']} fp4.linear"] + [
                f"{counts[op]} fp4.{op} ({what})" for op, what in (("linear_silu_mul", "gate/up + SiLU*mul"),
                                                                 ("linear_group", "linears of one input"))
                if counts[op]])
            result.add("linears fused", f"{counts['linear']} of {len(layers)} NVFP4 linears -> {nodes}"
                       + (f"; {counts['mm']} unfused fp4.mm" if counts["mm"] else ""))
        result.fused = counts["linear"]
    dense_names = set(layers)
    before, after = linear_bytes(ref, dense_names), linear_bytes(quant, dense_names)
    total_before, total_after = model_bytes(ref), model_bytes(quant)
    result.add("weight memory", f"{len(layers)} linears: {_human(before)} bf16 -> {_human(after)} NVFP4 "
               f"({before / max(after, 1):.2f}x smaller)")
    result.add("  whole model", f"{_human(total_before)} -> {_human(total_after)} (embeddings, norms, lm_head stay bf16)")
    cos, top1 = agreement(ref_logits, eager_logits)
    result.add("agreement vs bf16 (eager)", f"logits cosine {cos:.4f}, top-1 token agreement {top1 * 100:.1f}% "
               f"({inputs.numel()} tokens)")
    if compiled_logits is not None:
        cos_c, top1_c = agreement(ref_logits, compiled_logits)
        diff = (compiled_logits.float() - eager_logits.float()).abs().max().item()
        result.add("agreement vs bf16 (compiled)", f"logits cosine {cos_c:.4f}, top-1 token agreement {top1_c * 100:.1f}%")
        result.add("compiled vs eager NVFP4", f"max |logit difference| {diff:.3g}\n(Inductor rounds the bf16 norms "
                   f"differently; FP4 activation rounding amplifies it)")
    log(f"timing (best of {iters} runs each)")
    t_ref = time_call(forward(ref), iters)
    t_eager = time_call(forward(quant), iters)
    timing = f"batch {batch}x{seq_len}, best of {iters}: bf16 eager {t_ref * 1e3:.1f} ms, NVFP4 eager {t_eager * 1e3:.1f} ms"
    if compiled is not None:
        t_comp = time_call(forward(compiled), iters)
        timing += f",\nNVFP4 compiled {t_comp * 1e3:.1f} ms ({t_eager / t_comp:.2f}x vs NVFP4 eager)"
        result.add("compile time", f"{compile_s:.1f} s (first call)")
    result.add("forward time", timing)
    if dev.type == "cpu":
        result.add("  note", "CPU: the emulation backend computes in float32; NVFP4 speed-ups need a GPU")
    result.seconds = time.perf_counter() - start
    result.add("demo wall time", f"{result.seconds:.1f} s on {torch.get_num_threads()} CPU threads"
               + (f" + {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""))
    return result


def _load_dense(path: Path, device: torch.device) -> nn.Module:
    import transformers

    from .checkpoint import CheckpointError, index_checkpoint

    index_checkpoint(path)  # a clear error when there are no safetensors weights
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: transformers cannot load it: {str(e).strip().splitlines()[0]}") from None
    return model.to(device).eval()
