"""``fp4c``: the fp4_compile command line (also ``python -m fp4_compile``).

Commands: ``demo``, ``quantize``, ``inspect``, ``bench``, ``tune``, ``backends``. Bad input (a
directory that is not a model, a broken checkpoint, an unavailable backend) prints one
line on stderr and exits with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

EXIT_USAGE = 2

_DESCRIPTION = """\
NVFP4 (e2m1 weights and activations, e4m3 block scales) linear layers under torch.compile.

  fp4c demo                      quantize + compile a small Llama-style model, print a report
  fp4c quantize SRC OUT          bf16 Hugging Face model dir -> NVFP4 compressed-tensors checkpoint
  fp4c inspect                   show what torch.compile(backend="fp4") did to the model
  fp4c bench                     GPU benchmarks (benchmarks/run_gpu.sh)
  fp4c tune --model DIR          time the Hopper GEMM's launch configurations for a model's layer shapes
  fp4c backends                  NVFP4 GEMM backends and whether they run here

Run `fp4c COMMAND --help` for a command's options."""


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# shared options


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the demo's random Llama-style model)")
    g.add_argument("--model", metavar="DIR",
                   help="a local Hugging Face model directory (bf16) or an NVFP4 checkpoint "
                        "(compressed-tensors nvfp4-pack-quantized or ModelOpt NVFP4)")
    g.add_argument("--hidden-size", type=int, default=256, help="demo model hidden size (default 256)")
    g.add_argument("--layers", type=int, default=2, help="demo model decoder layers (default 2)")
    g.add_argument("--vocab-size", type=int, default=1024, help="demo model vocabulary (default 1024)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--backend", help="NVFP4 GEMM backend (default: the best available; see `fp4c backends`)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--calib-batches", type=int, default=4,
                   help="random-token batches for activation calibration (default 4)")
    p.add_argument("--dynamic", action="store_true", help="dynamic activation scales instead of calibrated ones")


def _check_device(args: argparse.Namespace) -> None:
    import torch

    from .backends import check_runnable_device

    if not args.device:
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device (use cpu or cuda[:N])") from None
    try:
        check_runnable_device(device)
    except ValueError as e:
        raise UsageError(f"--device {args.device}: {e}") from None


def _device(args: argparse.Namespace):
    """The device of a command: --device (checked by _check_device), else the default one."""
    import torch

    from .backends import default_device

    return torch.device(args.device) if args.device else default_device()


def _check_model_args(args: argparse.Namespace) -> None:
    _check_positive(args, "hidden_size", "layers", "vocab_size", "batch", "seq_len", "calib_batches", "iters")
    if args.model is None and args.hidden_size % 64:
        raise UsageError(f"--hidden-size must be a multiple of 64 (head size 64), got {args.hidden_size}")
    _check_device(args)


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


# ---------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_model_args(args)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[fp4c] {msg}", file=sys.stderr, flush=True))
    result = run_demo(
        model_dir=args.model, backend=args.backend, compile_with=args.compile, device=args.device,
        hidden_size=args.hidden_size, num_layers=args.layers, vocab_size=args.vocab_size, batch=args.batch,
        seq_len=args.seq_len, calib_batches=args.calib_batches, dynamic=args.dynamic, iters=args.iters,
        seed=args.seed, progress=not args.quiet, log=log,
    )
    print("fp4_compile demo: NVFP4 linears under torch.compile")
    print(result.table())
    return 0


# ---------------------------------------------------------------------------------------
# quantize

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _calibration_batches(args: argparse.Namespace, src: Path, vocab_size: int) -> list[dict] | None:
    import torch

    if args.dynamic:
        return None
    if args.calib_file:
        calib = Path(args.calib_file)
        if not calib.is_file():
            raise UsageError(f"--calib-file {calib}: no such file")
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(f"--calib-file needs a tokenizer in {src}: {str(e).strip().splitlines()[0]}") from None
        text = calib.read_text(errors="replace")
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        need = args.seq_len
        if ids.numel() < need:
            raise UsageError(f"--calib-file {calib}: {ids.numel()} tokens, need at least --seq-len={need}")
        chunks = [ids[i:i + need] for i in range(0, ids.numel() - need + 1, need)][: args.num_samples]
        return [{"input_ids": torch.stack(chunks[i:i + args.batch]), "use_cache": False}
                for i in range(0, len(chunks), args.batch)]
    g = torch.Generator().manual_seed(args.seed)
    n_batches = max(1, -(-args.num_samples // args.batch))
    return [{"input_ids": torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=g), "use_cache": False}
            for _ in range(n_batches)]


def _check_quantize_options(args: argparse.Namespace, device) -> None:
    """What `fp4c quantize` can refuse before it loads SRC and calibrates (minutes on a large model)."""
    from .backends import resolve_backend
    from .checkpoint.save import parse_size

    if args.dynamic and args.format == "modelopt":
        raise UsageError("--format modelopt needs calibrated (static) activation scales: drop --dynamic")
    try:
        parse_size(args.max_shard_size)
    except ValueError:
        raise UsageError(f"--max-shard-size {args.max_shard_size!r}: use e.g. 5GB, 500MB or a byte count") from None
    for pattern in args.ignore or ():
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise UsageError(f"--ignore {pattern!r}: not a regular expression ({e})") from None
    resolve_backend(args.backend, device)  # an unknown or unavailable backend: BackendError, now


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from .checkpoint import (CheckpointError, check_model_dir, index_checkpoint, quantize_transformers_model,
                             read_quant_scheme, save_nvfp4)

    _check_positive(args, "num_samples", "batch", "seq_len")
    _check_device(args)
    device = _device(args)
    _check_quantize_options(args, device)
    src = check_model_dir(args.src)
    out = Path(args.out).expanduser().absolute()
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists (use --overwrite to replace it)")
    if out == src.absolute():
        raise UsageError("OUT must differ from SRC")
    if read_quant_scheme(src) is not None:
        raise UsageError(f"{src} is already quantized (quantization_config in config.json)")
    index_checkpoint(src)  # a clear error before loading when the weights are missing or broken
    dtype = getattr(torch, args.dtype)
    print(f"[fp4c] loading {src}", file=sys.stderr)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}: transformers cannot load it: {str(e).strip().splitlines()[0]}") from None
    model = model.to(device).eval()
    calib = _calibration_batches(args, src, model.config.vocab_size)
    if calib is not None:
        calib = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in calib]
        what = f"{sum(b['input_ids'].shape[0] for b in calib)} sequences of {args.seq_len} tokens from " + \
               (str(args.calib_file) if args.calib_file else "random tokens")
        print(f"[fp4c] calibrating activation scales on {what}", file=sys.stderr)
    ignore = list(args.ignore) if args.ignore is not None else None
    kwargs = {} if ignore is None else {"ignore": ignore}
    quantize_transformers_model(model, calibration_data=calib, backend=args.backend, progress=not args.quiet, **kwargs)
    extra = [src / name for name in _TOKENIZER_FILES if (src / name).is_file()]
    path = save_nvfp4(model, out, format=args.format, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      extra_files=extra)
    n = sum(1 for m in model.modules() if type(m).__name__ == "NVFP4Linear")
    print(f"wrote {path} ({args.format}, {n} NVFP4 linears, "
          f"{'dynamic' if calib is None else 'static'} activation scales)")
    return 0


# ---------------------------------------------------------------------------------------
# inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    import copy

    from .checkpoint import check_model_dir, is_nvfp4_checkpoint, load_nvfp4, quantize_transformers_model
    from .demo import _load_dense, build_demo_model, random_batches

    _check_model_args(args)
    device = _device(args)
    if args.model:
        path = check_model_dir(args.model)
        if is_nvfp4_checkpoint(path):
            model = load_nvfp4(path, backend=args.backend, device=device)
        else:
            model = _load_dense(path, device)
    else:
        model = build_demo_model(hidden_size=args.hidden_size, num_layers=args.layers, vocab_size=args.vocab_size,
                                 seed=args.seed, device=device)
    vocab = model.config.vocab_size
    if not any(type(m).__name__ == "NVFP4Linear" for m in model.modules()):
        calib = None if args.dynamic else [{"input_ids": c, "use_cache": False} for c in random_batches(
            vocab, count=args.calib_batches, batch=args.batch, seq_len=args.seq_len, seed=args.seed + 1, device=device)]
        model = quantize_transformers_model(copy.deepcopy(model), calibration_data=calib, backend=args.backend,
                                            progress=False)
    ids = random_batches(vocab, count=1, batch=args.batch, seq_len=args.seq_len, seed=args.seed + 2, device=device)[0]
    dump_dir = Path(args.dump_dir)
    from .inspection import inspect_compiled

    print(inspect_compiled(model, {"input_ids": ids, "use_cache": False}, dump_dir=dump_dir))
    return 0


# ---------------------------------------------------------------------------------------
# bench


# run_gpu.sh's benchmark stages (RUN_GPU_SKIP), in the order it runs them.
TEST_STAGES = ("tests", "cpu")  # run_gpu.sh's GPU-marked tests, and the others on the GPU machine's torch
BENCH_STAGES = ("quant", "linear", "floor", "small_m", "wgmma", "timeline", "group", "pdl", "model")


def _bench_script() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "run_gpu.sh"
    return script if script.is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("fp4c bench: the benchmarks need a CUDA GPU, and torch sees none "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); nothing was run.",
              file=sys.stderr)
        return EXIT_USAGE
    script = _bench_script()
    if script is None:
        raise UsageError("benchmarks/run_gpu.sh is not there: run `fp4c bench` from a source checkout of fp4_compile")
    bash = shutil.which("bash")
    if bash is None:
        raise UsageError("bash is needed to run benchmarks/run_gpu.sh")
    # run_gpu.sh calls `python3`: make that this interpreter
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    skip = set(args.skip or [])
    if not args.with_tests:
        skip.update(TEST_STAGES)
    env["RUN_GPU_SKIP"] = " ".join(sorted(skip))
    env.pop("RUN_GPU_ONLY", None)  # (it would override the skips)
    if args.out:
        env["OUT"] = str(Path(args.out).absolute())
    return subprocess.call([bash, str(script)], cwd=script.parent.parent, env=env)


# ---------------------------------------------------------------------------------------
# tune


def _parse_shapes(specs: list[str]) -> list[tuple[int, int]]:
    shapes = set()
    for spec in specs:
        for item in filter(None, spec.split(",")):
            try:
                n, k = (int(v) for v in item.lower().split("x"))
            except ValueError:
                raise UsageError(f"--shapes: {item!r} is not NxK (out_features x in_features, "
                                 "e.g. 4096x14336)") from None
            if n < 1 or k < 16 or k % 16:
                raise UsageError(f"--shapes: {item}: N must be at least 1 and K a multiple of 16 (NVFP4 blocks)")
            shapes.add((n, k))
    return sorted(shapes)


def _parse_ms(spec: str) -> tuple[int, ...]:
    from .ops import cuda_wgmma

    try:
        ms = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"--ms: {spec!r} is not a comma-separated list of integers") from None
    low, high = cuda_wgmma.DISPATCH_MIN_M, cuda_wgmma.LARGE_M
    if not ms or ms[0] < low or ms[-1] > high:
        raise UsageError(f"--ms: each M must be {low}..{high} (the range a launch table covers: below it the decode "
                         f"kernel runs, above it the cost model decides), got {spec}")
    return tuple(ms)


def _tune_summary(env: dict, cells: dict, picks: dict) -> str:
    from .ops import wgmma_tuning
    from .ops.gpu_timing import geomean

    model = wgmma_tuning.model_slowdowns(env, cells)
    tuned = wgmma_tuning.table_slowdowns(env, cells, picks)
    return (f"the cost model's picks {geomean(model):.3f}x the best (worst {max(model):.2f}x), "
            f"the table's {geomean(tuned):.3f}x on the same timings")


def cmd_tune(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .ops import cuda_wgmma, nvcc, wgmma_tables, wgmma_tuning

    _check_positive(args, "rounds")
    if args.margin < 0:
        raise UsageError(f"--margin must be at least 0, got {args.margin}")
    modes = tuple(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    if not modes or set(modes) - set(wgmma_tuning.MODES):
        raise UsageError(f"--modes: choose from {', '.join(wgmma_tuning.MODES)}, got {args.modes!r}")
    ms = _parse_ms(args.ms)
    if args.model:
        from .checkpoint import nvfp4_linear_shapes

        shapes = nvfp4_linear_shapes(args.model)
        if not shapes:
            raise UsageError(f"{args.model}: no linear of this model would be NVFP4")
    else:
        shapes = _parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        raise UsageError("it times the Hopper wgmma kernel on a CUDA GPU, and torch sees none "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    _check_device(args)
    device = torch.device(args.device or "cuda")
    if device.type != "cuda":
        raise UsageError(f"--device {args.device}: tuning needs a CUDA device")
    index = nvcc.device_index(device)
    reason = cuda_wgmma.unavailable_reason(index)
    if reason is not None:
        raise UsageError(f"the wgmma kernel does not run on {torch.cuda.get_device_name(index)}: {reason}")
    identity = wgmma_tables.table_identity(index)
    path = Path(args.out) if args.out else wgmma_tables.table_path(identity["gpu"], identity["sms"])
    print(f"timing {len(shapes)} layer shape(s) x {len(ms)} M x {len(modes)} mode(s) on {identity['gpu']} "
          f"({identity['sms']} SMs): about {20 * len(modes) * len(ms) // 10} s a shape")
    meta = {**identity, "torch": torch.__version__, "margin": args.margin, "modes": list(modes), "rounds": args.rounds}
    swept: dict = {"env": {}, "cells": []}
    # each shape's picks go to the table as soon as it is timed: an interrupted tune keeps them
    for part in wgmma_tuning.sweep(shapes, ms, modes, args.rounds, device, progress=not args.quiet):
        swept = {"env": part["env"], "cells": swept["cells"] + part["cells"]}
        if args.sweep_json:
            Path(args.sweep_json).write_text(json.dumps(swept, indent=1) + "\n")
        env, cells = wgmma_tuning.merge_cells([part])
        picks, lines = wgmma_tuning.picks_from_cells(env, cells, args.margin)
        splits = wgmma_tuning.timed_splits(env)
        table = wgmma_tables.write_table(path, meta,
                                         {nk: wgmma_tuning.shape_picks(v, splits) for nk, v in picks.items()})
        cuda_wgmma.forget_measured_tables()
        (n, k), by_m = next(iter(picks.items()))
        overrides = sum(label is not None for label in by_m.values())
        for line in (lines if args.verbose else []) + [
                f"  {n}x{k}: {_tune_summary(env, cells, picks)}; {overrides} of {len(ms)} M overridden"]:
            tqdm.write(line)
    env, cells = wgmma_tuning.merge_cells([swept])
    picks, _ = wgmma_tuning.picks_from_cells(env, cells, args.margin)
    print(f"all {len(shapes)} shape(s): {_tune_summary(env, cells, picks)}")
    by_name = (path == wgmma_tables.table_path(identity["gpu"], identity["sms"])
               and not os.environ.get("FP4C_WGMMA_TABLE"))
    print(f"wrote {path} ({len(table)} layer shapes): "
          + (f"read by every later process on a {identity['gpu']}" if by_name
             else f"read by processes run with FP4C_WGMMA_TABLE={path}"))
    return 0


# ---------------------------------------------------------------------------------------
# backends


def cmd_backends(args: argparse.Namespace) -> int:
    import torch

    from .backends import default_device, describe_backends, select_backend

    _check_device(args)
    device = torch.device(args.device) if args.device else None
    rows = describe_backends(device)
    cols = ("backend", "semantics", "requires", "available", "reason")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(f"{c:<{widths[c]}}" for c in cols).rstrip())
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:<{widths[c]}}" for c in cols).rstrip())
    chosen = select_backend(device)
    where = device or default_device()
    print(f"\nselected on {where}: {chosen.value} (override with FP4_GEMM_BACKEND=name or --backend)")
    if where.type == "cuda":
        from .ops import cublaslt, cuda_quant, cuda_small_m, cuda_wgmma, fast_linear, nvcc, silu_mul

        index = nvcc.device_index(where)
        for what, module in (("CUDA decode kernel of triton-w4a4/marlin (small M)", cuda_small_m),
                             ("CUDA wgmma kernel of triton-w4a4/marlin (M >= 17)", cuda_wgmma),
                             ("CUDA activation quantization (codes at M >= 1024, eager block values and "
                              "RMSNorm + block values)", cuda_quant),
                             ("CUDA silu_mul (fp4::linear_silu_mul where its GEMMs do not fuse it)", silu_mul),
                             ("cuBLASLt GEMM of triton-w4a4/marlin (large M)", cublaslt),
                             ("C++ eager fast path of fp4::linear, linear_group, linear_silu_mul, rms_norm_quantize",
                              fast_linear)):
            reason = module.unavailable_reason(index)  # builds it on first use (seconds)
            state = "ready" if reason is None else reason
            if reason is None and module is cublaslt:
                name, version = cublaslt.library_info()  # which libcublasLt the shim loaded: torch's own
                state += f" ({name}, version {version})"
            print(f"{what}: {state}")
        from .ops.pdl import use_pdl

        print("programmatic dependent launch of these kernels: "
              + ("on (FP4C_PDL=0 turns it off)" if use_pdl(torch.device("cuda", index)) else "off (sm_90 and FP4C_PDL != 0)"))
    return 0


# ---------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp4c", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="quantize and compile a small model, print a report",
                       description="Quantize a model to NVFP4 (calibrated activation scales), compile it with "
                                   "torch.compile(backend='fp4') and compare with bf16: backend, fused linears, "
                                   "weight memory, logits agreement, eager and compiled time.")
    _add_model_options(p)
    p.add_argument("--compile", default="fp4", choices=("fp4", "inductor", "aot_eager", "eager", "none"),
                   help="torch.compile backend (default fp4)")
    p.add_argument("--iters", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", help="bf16 model dir -> NVFP4 checkpoint",
                       description="Quantize a bf16/fp16 Hugging Face model directory to NVFP4 and write a "
                                   "compressed-tensors nvfp4-pack-quantized checkpoint (what vLLM reads). "
                                   "The output appears only when complete.")
    p.add_argument("src", metavar="SRC", help="source model directory (config.json + safetensors)")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--calib-file", metavar="TXT",
                   help="text for activation calibration (needs a tokenizer in SRC); default: random tokens")
    p.add_argument("--num-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--batch", type=int, default=4, help="calibration sequences per forward (default 4)")
    p.add_argument("--dynamic", action="store_true",
                   help="no calibration: dynamic activation scales (vLLM needs static ones)")
    p.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors", "modelopt"),
                   help="checkpoint format (default compressed-tensors)")
    p.add_argument("--ignore", nargs="*", metavar="PATTERN",
                   help="modules kept in high precision: names, class names or re:REGEX "
                        "(default: lm_head and MoE routers)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype to load SRC in (default bfloat16)")
    p.add_argument("--backend", help="NVFP4 backend of the quantized layers before they are saved (the checkpoint "
                                      "is the same for every backend; default: the best available)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--max-shard-size", default="5GB", help="shard size of the safetensors files (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--seed", type=int, default=0, help="seed of the random calibration tokens (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="show what torch.compile(backend='fp4') did",
                       description="Build the demo model (or --model), quantize it if needed, compile it with the "
                                   "fp4 backend and print which linears fused and to which backend; the graphs "
                                   "and generated code are dumped to --dump-dir.")
    _add_model_options(p)
    p.add_argument("--dump-dir", default="depyf_out", help="where to dump graphs and code (default ./depyf_out)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="GPU benchmarks (needs CUDA)",
                       description="Run the Python benchmarks of benchmarks/run_gpu.sh (activation quantization, "
                                   "linear layers, the read-only ceiling, the decode and wgmma kernels' variants, "
                                   "grouped launches, PDL, a model; JSON results; about 13 minutes on an H100). "
                                   "Needs a CUDA GPU: without one it says so and exits with status 2.")
    p.add_argument("--with-tests", action="store_true",
                   help="also run the tests first: the GPU-marked ones, then the others on this torch")
    p.add_argument("--skip", nargs="*", choices=BENCH_STAGES, metavar="STAGE",
                   help=f"benchmarks to skip, of: {' '.join(BENCH_STAGES)}")
    p.add_argument("--out", metavar="DIR", help="where the JSON results go (default benchmarks/results)")
    p.set_defaults(func=cmd_bench)

    from .ops import wgmma_tuning  # (its defaults; already imported with the ops, about 40 ms)

    p = sub.add_parser("tune", help="measure the Hopper GEMM's launch configurations for your layer shapes",
                       description="Time every launch configuration (tile, K split, split reduction) of the sm_90 "
                                   "wgmma GEMM at M = 17..512 for each layer shape of a model (or --shapes), in CUDA "
                                   "graphs over rotating weights, W4A16 and W4A4, and write the picks that beat the "
                                   "built-in cost model by --margin to this GPU's launch table, which every later "
                                   "process on a GPU of the same name reads (until an upgrade changes the kernel: "
                                   "then tune again); each shape is written as soon as it is timed. About 30-50 s of "
                                   "GPU time a shape on an H100. "
                                   "Needs an H100/H200-class GPU and nvcc.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="DIR", help="a Hugging Face model directory or NVFP4 checkpoint: its "
                                                      "NVFP4 linears' shapes, from config.json alone")
    what.add_argument("--shapes", nargs="+", metavar="NxK", help="layer shapes, out_features x in_features "
                                                                 "(e.g. 6144x4096 4096x4096 28672x4096 4096x14336)")
    p.add_argument("--ms", default=",".join(map(str, wgmma_tuning.M_GRID)),
                   help="M values of the table, 17..512; each covers the M above the one before it "
                        "(default %(default)s)")
    p.add_argument("--modes", default=",".join(wgmma_tuning.MODES),
                   help="w4a16 (bf16 activations) and/or w4a4 (the activation quantization kernel with it) "
                        "(default %(default)s)")
    p.add_argument("--rounds", type=int, default=wgmma_tuning.ROUNDS,
                   help="turns of replays per configuration (default %(default)s)")
    p.add_argument("--margin", type=float, default=wgmma_tuning.MARGIN,
                   help="take a measured pick where the cost model's ran this much slower or more "
                        "(default %(default)s)")
    p.add_argument("--out", metavar="PATH", help="where to write the table (default: this GPU's table in the "
                                                 "kernel build directory; FP4C_WGMMA_TABLE=PATH makes a process "
                                                 "read another)")
    p.add_argument("--sweep-json", metavar="PATH", help="also write every timing (benchmarks/make_wgmma_table.py "
                                                        "reads it)")
    p.add_argument("--device", help="cuda[:N] (default: the current CUDA device)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("backends", help="list NVFP4 GEMM backends",
                       description="Print every NVFP4 GEMM backend: its semantics (W4A4 or W4A16), what it "
                                   "needs, and whether it is available on the device (and why not).")
    p.add_argument("--device", help="device to check (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .backends import BackendError
    from .checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (UsageError, CheckpointError, BackendError, FileExistsError, FileNotFoundError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fp4c {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        extra = {"transformers": "hf", "flashinfer": "flashinfer", "fbgemm_gpu": "fbgemm"}.get(e.name or "", "test")
        print(f"fp4c {args.command}: error: {e.name} is not installed (pip install 'fp4_compile[{extra}]')",
              file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `fp4c backends | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"fp4c {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
