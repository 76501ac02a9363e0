#!/usr/bin/env python3
"""User-level GPU review probe of fp4_compile (session v49): hunts bugs a user hits on a Hopper GPU that the
``gpu``-marked tests do not cover (they test the ops on contiguous inputs, one stream, one device at a time).

Run from the checkout root (the package on PYTHONPATH; 1 or 2 H200, torch 2.11, triton 3.6, no network):

    python3 .probe/v49/user_gpu/user_gpu_review.py            # everything (about 3-4 min with warm kernel caches)
    python3 .probe/v49/user_gpu/user_gpu_review.py --list     # the check names
    python3 .probe/v49/user_gpu/user_gpu_review.py --only NAME[,NAME] / --skip NAME[,NAME]

One line per check: ``PASS|FAIL|ERROR|SKIP <name>: <detail>``, a summary at the end, and JSON results in
``$OUT/user_gpu_review.json`` where $OUT is set. Without CUDA every GPU check prints SKIP (the CPU self-test of
the reference helpers still runs; ``PROBE_CPU_SELFTEST=1`` also runs the device-generic checks on the CPU with
the ``emulation`` backend, compile checks included, to exercise this script itself).

Checks named ``iso_*`` run in a fresh child process of this script, with a timeout: they need a process in
which nothing ran before (first-use races), or may hang the GPU (split-K counters that never reach their target)
or need two GPUs.

Expected results are computed from the library's own reference pieces: ``fp4_compile.format`` (quantize_nvfp4,
block_values, dynamic_global_scale) for the operands and ``tests/exact_bounds.py`` for the float64 product and
its element-wise bound (one rounding of the output type plus what fp32 sums in any order can change).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
for _path in (os.path.join(REPO, "tests"), REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from torch import nn  # noqa: E402

import exact_bounds  # noqa: E402  (tests/exact_bounds.py)
import fp4_compile  # noqa: E402,F401  (registers backend="fp4" and torch.ops.fp4)
from fp4_compile import format as F  # noqa: E402
from fp4_compile.layer import NVFP4Linear, quantize_model  # noqa: E402

CUDA = torch.cuda.is_available()
NGPU = torch.cuda.device_count() if CUDA else 0
SELFTEST = os.environ.get("PROBE_CPU_SELFTEST") == "1"
DEV = torch.device("cuda", 0) if CUDA else torch.device("cpu")
BACKENDS = ("triton-w4a4", "marlin") if CUDA else ("emulation",)
COMPILE_MS = (1, 9, 16, 17, 64, 65, 300, 1100)   # across the small-M / codes / wgmma / Triton / large-M edges
ISO_TIMEOUT_S = {"iso_two_gpus": 300}
DEFAULT_ISO_TIMEOUT_S = 150

RESULTS: list[dict] = []
WATCH = {"name": None, "t0": 0.0, "limit": 0.0}
CHECK_LIMIT_S = 420.0   # a check running longer is taken for a GPU hang: reported, the process exits


# ----------------------------------------------------------------------------------------------------------
# result plumbing


class Fail(Exception):
    """A check's failure (as opposed to an unexpected exception, which reads ERROR)."""


class Skip(Exception):
    pass


def emit(status: str, name: str, detail: str, seconds: float = 0.0) -> None:
    detail = " ".join(str(detail).split())  # one line
    print(f"{status} {name}: {detail}", flush=True)
    RESULTS.append({"name": name, "status": status, "detail": detail, "seconds": round(seconds, 2)})


def write_json(t0: float) -> None:
    counts = {s: sum(r["status"] == s for r in RESULTS) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "user_gpu_review.json"), "w") as f:
            json.dump({"torch": torch.__version__, "cuda": CUDA, "gpus": NGPU, "seconds": round(time.time() - t0, 1),
                       "counts": counts, "results": RESULTS}, f, indent=1)


def start_watchdog(t0: float, child: bool) -> None:
    """A check that runs past CHECK_LIMIT_S (a kernel spinning on a split-K counter blocks the next synchronize
    forever): report it, write what we have, and leave (os._exit: the hung CUDA call never returns)."""
    def watch():
        while True:
            time.sleep(5)
            name = WATCH["name"]
            if name is not None and time.time() - WATCH["t0"] > WATCH["limit"]:
                emit("FAIL", name, f"watchdog: still running after {WATCH['limit']:.0f} s (a GPU hang?); exiting")
                if not child:
                    write_json(t0)
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


class Problems:
    """Collects the sub-cases of one check: failures, errors (exceptions in a sub-case) and the worst errors."""

    def __init__(self) -> None:
        self.bad: list[str] = []
        self.notes: list[str] = []
        self.cases = 0
        self.max_abs = 0.0
        self.max_rel = 0.0

    @contextlib.contextmanager
    def case(self, label: str):
        self.cases += 1
        try:
            yield
        except (Fail, AssertionError) as e:
            self.bad.append(f"[{label}] {e}")
        except Exception as e:  # noqa: BLE001 - a sub-case's exception is a finding, the others still run
            self.bad.append(f"[{label}] {type(e).__name__}: {_short(e)}")

    def within(self, label: str, out: torch.Tensor, ref: torch.Tensor, size: torch.Tensor,
               extra_ulps: float = 0.0) -> bool:
        """``out`` against the float64 ``ref`` (exact_bounds' element-wise bound, plus ``extra_ulps`` output units of
        ``size``: a second rounding, e.g. a bias added after the GEMM's output was rounded)."""
        msg = bound_message(out, ref, size, extra_ulps)
        err = (out.reshape(ref.shape).double() - ref)
        finite = torch.isfinite(err)
        if bool(finite.any()):
            self.max_abs = max(self.max_abs, float(err[finite].abs().max()))
        self.max_rel = max(self.max_rel, rel(out, ref))
        if msg:
            self.bad.append(f"[{label}] {msg}")
            return False
        return True

    def equal(self, label: str, a: torch.Tensor, b: torch.Tensor, what: str = "bit-identical") -> bool:
        if a.shape != b.shape or a.dtype != b.dtype:
            self.bad.append(f"[{label}] {what}: shapes/dtypes differ {tuple(a.shape)} {a.dtype} vs "
                            f"{tuple(b.shape)} {b.dtype}")
            return False
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs()
            self.bad.append(f"[{label}] not {what}: {int((d > 0).sum())}/{a.numel()} elements differ, "
                            f"max abs diff {float(d.nan_to_num(float('inf')).max()):.4g}")
            return False
        return True

    def note(self, text: str) -> None:
        self.notes.append(text)

    def finish(self, extra: str = "") -> str:
        head = f"{self.cases} cases, max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g}"
        if extra:
            head += f"; {extra}"
        if self.notes:
            head += "; notes: " + "; ".join(self.notes[:6])
        if self.bad:
            shown = " | ".join(self.bad[:8])
            more = f" (+{len(self.bad) - 8} more)" if len(self.bad) > 8 else ""
            raise Fail(f"{len(self.bad)} bad: {shown}{more} -- {head}")
        return head


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).double()
    den = ref.double().norm()
    return float((out - ref.double()).norm() / den.clamp_min(1e-30))


def bound_message(out: torch.Tensor, ref: torch.Tensor, size: torch.Tensor, extra_ulps: float = 0.0) -> str:
    """'' where every element of ``out`` is within the bound of tests/exact_bounds.py (+ extra_ulps * u * size)."""
    if tuple(out.shape[-1:]) != tuple(ref.shape[-1:]) or out.numel() != ref.numel():
        return f"shape {tuple(out.shape)} against reference {tuple(ref.shape)}"
    out2 = out.reshape(ref.shape)
    if out2.dtype not in exact_bounds.UNIT_ROUNDOFF:
        return f"unexpected output dtype {out2.dtype}"
    if extra_ulps:
        u = exact_bounds.UNIT_ROUNDOFF[out2.dtype]
        bound = (u * ref.abs() + (1 + u) * exact_bounds.SUM_ORDER * size + exact_bounds.TINY[out2.dtype]
                 + extra_ulps * u * size)
        bad = ~((out2.double() - ref).abs() <= bound)
    else:
        bad = exact_bounds.outside(out2, ref, size)
    if bool(bad.any()):
        return (f"{int(bad.sum())}/{out2.numel()} elements outside the exact bound "
                f"(rel err {rel(out2, ref):.3g}); {exact_bounds.describe(out2, ref, bad)}")
    return ""


# ----------------------------------------------------------------------------------------------------------
# reference and construction helpers


def layer_reference(layer: NVFP4Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 (product, size) [rows, N] of what ``layer(x)`` computes, from the layer's own weight, scales and
    bias, on x's device: W4A4 quantizes x with the layer's (or the dynamic) global scale, W4A16 multiplies x itself
    (fp32 activations as bf16, as the marlin kernels take them)."""
    k = layer.in_features
    x2 = x.reshape(-1, k)
    packed, scales = layer.linear_weight()
    wv = F.block_values(packed.to(x.device), scales.to(x.device)).double()
    bias = None if layer.bias is None else layer.bias.detach().to(x.device, x.dtype)
    wgs = layer.weight_global_scale.to(x.device)
    if layer.semantics == "W4A16":
        xv = (x2.bfloat16() if x2.dtype == torch.float32 else x2).double()
        alpha = torch.reciprocal(wgs)
    else:
        if layer.input_global_scale is not None:
            gs = layer.input_global_scale.to(x.device).reshape(1).float()
        else:
            gs = F.dynamic_global_scale(x2)
        xv = F.block_values(*F.quantize_nvfp4(x2.contiguous(), gs)).double()
        alpha = torch.reciprocal(gs * wgs)
    return exact_bounds.product_and_size(xv, wv, alpha, bias)


def silu_mul_message(out: torch.Tensor, gate: NVFP4Linear, up: NVFP4Linear, x: torch.Tensor) -> str:
    """'' where ``out`` is within the rounding of ``silu(gate(x)) * up(x)`` computed as the eager layers do: each
    projection within its exact bound and rounded, the SiLU and the product each rounded once (times 1.5)."""
    rg, sg = layer_reference(gate, x)
    ru, su = layer_reference(up, x)
    u = exact_bounds.UNIT_ROUNDOFF[out.dtype]
    tiny = exact_bounds.TINY[out.dtype]
    eg = u * rg.abs() + (1 + u) * exact_bounds.SUM_ORDER * sg + tiny
    eu = u * ru.abs() + (1 + u) * exact_bounds.SUM_ORDER * su + tiny
    sil = rg * torch.sigmoid(rg)
    ref = sil * ru
    bound = 1.5 * ((sil.abs() + 1.1 * eg) * (ru.abs() + eu) * 2.2 * u + 1.1 * eg * (ru.abs() + eu)
                   + sil.abs() * eu) + tiny
    out2 = out.reshape(ref.shape)
    bad = ~((out2.double() - ref).abs() <= bound)
    if bool(bad.any()):
        return (f"silu*mul: {int(bad.sum())}/{out2.numel()} elements outside the bound (rel err {rel(out2, ref):.3g}); "
                f"{exact_bounds.describe(out2, ref, bad)}")
    return ""


def gen(seed: int, device: torch.device | None = None) -> torch.Generator:
    g = torch.Generator(device=device or DEV)
    g.manual_seed(seed)
    return g


def rand_x(shape, dtype=torch.bfloat16, seed=0, device=None, scale=1.0) -> torch.Tensor:
    device = torch.device(device) if device is not None else DEV
    return (torch.randn(*shape, device=device, generator=gen(seed, device)) * scale).to(dtype)


def make_layer(n: int, k: int, backend: str | None, *, dtype=torch.bfloat16, bias=True, static=True, seed=0,
               device=None, amax=4.5) -> NVFP4Linear:
    """A random NVFP4 layer quantized from a random ``nn.Linear`` (weights of ``dtype``); ``static``: an activation
    global scale for inputs of amax ``amax`` (random inputs may exceed it: their block scales then saturate, as the
    reference's do)."""
    device = torch.device(device) if device is not None else DEV
    g = gen(seed, device)
    lin = nn.Linear(k, n, bias=bias, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, device=device, generator=g).to(dtype))
        if bias:
            lin.bias.copy_(torch.randn(n, device=device, generator=g).to(dtype))
    igs = F.global_scale_from_amax(torch.tensor(float(amax), device=device)).reshape(1).float() if static else None
    return NVFP4Linear.from_linear(lin, backend=backend, input_global_scale=igs)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def fast_path():
    """The fast-path module where it runs on this machine, else None."""
    if not CUDA:
        return None
    from fp4_compile.ops import fast_linear

    return fast_linear if fast_linear.unavailable_reason(torch.cuda.current_device()) is None else None


def replayed() -> int:
    fl = fast_path()
    return fl.replayed_calls() if fl is not None else 0


def eager_path_label(layer: NVFP4Linear, m: int, dtype=torch.bfloat16) -> str:
    """Which kernel an eager host-bound call of ``layer`` at M takes (hopper.py's dispatch), for the details."""
    if layer.weight.device.type != "cuda":
        return layer.backend.value
    try:
        from fp4_compile.ops import cuda_wgmma, hopper

        x2 = torch.empty(m, layer.in_features, device=layer.weight.device, dtype=dtype)
        n, w4a4 = layer.out_features, layer.semantics == "W4A4"
        if w4a4 and hopper.use_codes(x2, m, n, True):
            return "small_m(codes)"
        g = hopper._cuda_gemm(x2, layer.weight, m, n, w4a4, True)
        if g is hopper.wgmma_gemm:
            p = cuda_wgmma.launch_params(m, n, layer.in_features, layer.weight.device.index or 0, dtype)
            return f"wgmma(t{p.bn}x{p.wm}s{p.splits}{'w' if p.workspace else ''} tail{p.tail}x{p.tail_splits})"
        return "small_m" if g is hopper.small_m_gemm else "triton/dequant"
    except Exception as e:  # noqa: BLE001 - a label only
        return f"?({type(e).__name__})"


@contextlib.contextmanager
def count_calls(module, name: str, log: list):
    """Wrap ``module.name`` so that each call appends (args, kwargs, result) to ``log`` (observation only)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        log.append((args, kwargs, result))
        return result

    setattr(module, name, wrapper)
    try:
        yield log
    finally:
        setattr(module, name, original)


def run_gated(fn_a, fn_b, sleep_cycles: int = 20_000_000):
    """Queue ``fn_a`` on a stream A and ``fn_b`` on a stream B behind one gate (an event recorded on A after a GPU
    sleep), so that their kernels become ready at the same time and run concurrently. Returns their results after
    the current stream has waited for both."""
    cur = torch.cuda.current_stream()
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    sa.wait_stream(cur)
    sb.wait_stream(cur)
    gate = torch.cuda.Event()
    with torch.cuda.stream(sa):
        torch.cuda._sleep(sleep_cycles)
        gate.record(sa)
        ra = fn_a()
    with torch.cuda.stream(sb):
        sb.wait_event(gate)
        rb = fn_b()
    cur.wait_stream(sa)
    cur.wait_stream(sb)
    torch.cuda.synchronize()
    return ra, rb


def dynamo_reset() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------------------------------------
# models for the compile checks


class Direct(nn.Module):
    """Linears that all read the input: q/k/v/odd (fp4.linear_group at decode sizes) and gate/up with SiLU*mul
    (fp4.linear_silu_mul), so that every NVFP4 output can be checked element by element against the reference."""

    def __init__(self, hidden: int, q: int, kv: int, inter: int, odd: int, device, dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.q = nn.Linear(hidden, q, bias=True, **kw)
        self.k = nn.Linear(hidden, kv, bias=False, **kw)
        self.v = nn.Linear(hidden, kv, bias=True, **kw)
        self.odd = nn.Linear(hidden, odd, bias=True, **kw)
        self.gate = nn.Linear(hidden, inter, bias=False, **kw)
        self.up = nn.Linear(hidden, inter, bias=False, **kw)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x), self.odd(x), TF.silu(self.gate(x)) * self.up(x)


DIRECT_LINEARS = ("q", "k", "v", "odd")


def make_direct(backend: str | None, dtype=torch.bfloat16, seed=0, hidden=2048, calib_scale=1.5,
                device=None) -> Direct:
    device = torch.device(device) if device is not None else DEV
    torch.manual_seed(seed)
    model = Direct(hidden, hidden, 512, 4096, 200, device, dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, device=device, generator=gen(seed + p.numel() % 97, device)).to(dtype)
                    * (0.05 if p.dim() == 2 else 1.0))
    calib = [rand_x((64, hidden), dtype, seed + 1000, device, calib_scale)]
    quantize_model(model, backend=backend, calibration_data=calib, progress=False)
    return model


def validate_direct(p: Problems, label: str, model: Direct, x: torch.Tensor, outs, extra_ulps: float = 0.0) -> None:
    for name, out in zip(DIRECT_LINEARS, outs[:4]):
        with p.case(f"{label} {name}"):
            ref, size = layer_reference(getattr(model, name), x)
            p.within(f"{label} {name}", out, ref, size, extra_ulps)
    with p.case(f"{label} silu_mul"):
        msg = silu_mul_message(outs[4], model.gate, model.up, x)
        if msg:
            raise Fail(msg)


class NormBlock(nn.Module):
    """A Llama-style block (RMSNorm in Hugging Face's form, q/k/v, o, gate/up/down, residuals): the norm fusion."""

    def __init__(self, hidden: int, inter: int, device, dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.rand(hidden, **kw) * 0.5 + 0.75, requires_grad=False)
        self.w2 = nn.Parameter(torch.rand(hidden, **kw) * 0.5 + 0.75, requires_grad=False)
        self.q = nn.Linear(hidden, hidden, bias=False, **kw)
        self.k = nn.Linear(hidden, 256, bias=False, **kw)
        self.v = nn.Linear(hidden, 256, bias=False, **kw)
        self.o = nn.Linear(hidden, hidden, bias=False, **kw)
        self.gate = nn.Linear(hidden, inter, bias=False, **kw)
        self.up = nn.Linear(hidden, inter, bias=False, **kw)
        self.down = nn.Linear(inter, hidden, bias=False, **kw)

    @staticmethod
    def rms(s, w):
        c = s.float()
        return (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)).to(s.dtype) * w

    def forward(self, x, res):
        s = x + res
        h = self.rms(s, self.w1)
        q, k, v = self.q(h), self.k(h), self.v(h)
        s2 = s + self.o(q)
        h2 = self.rms(s2, self.w2)
        return s2 + self.down(TF.silu(self.gate(h2)) * self.up(h2)), k, v


# ----------------------------------------------------------------------------------------------------------
# checks

CHECKS: list[tuple[str, object, dict]] = []


def check(name: str, *, cuda: bool = True, gpus: int = 1, iso: bool = False, cpu_selftest: bool = False):
    """Register a check. ``cuda``: needs a GPU (unless ``cpu_selftest`` and PROBE_CPU_SELFTEST=1); ``gpus``: GPUs
    needed; ``iso``: run in a fresh child process of this script with a timeout."""
    def register(fn):
        CHECKS.append((name, fn, {"cuda": cuda, "gpus": gpus, "iso": iso, "cpu_selftest": cpu_selftest}))
        return fn
    return register


@check("selftest_reference_cpu", cuda=False)
def selftest_reference_cpu():
    """This script's reference helpers against the exact emulation backend on the CPU (the repo's own function):
    if this fails, the other checks' verdicts are not to be trusted."""
    p = Problems()
    for static in (True, False):
        for dt in (torch.bfloat16, torch.float32):
            with p.case(f"emulation static={static} {dt}"):
                layer = make_layer(200, 352, "emulation", dtype=dt, static=static, seed=3, device="cpu")
                x = rand_x((7, 352), dt, seed=4, device="cpu")
                with torch.no_grad():
                    out = layer(x)
                ref, size = layer_reference(layer, x)
                # the emulation adds the bias to the rounded GEMM output: one rounding more
                p.within(f"static={static} {dt}", out, ref, size, extra_ulps=1.0)
    with p.case("silu bound on emulation"):
        model = make_direct("emulation", torch.bfloat16, seed=5, hidden=256, device="cpu")
        x = rand_x((5, 256), torch.bfloat16, seed=6, device="cpu")
        with torch.no_grad():
            outs = model(x)
        validate_direct(p, "eager emulation", model, x, outs, extra_ulps=1.0)
    return p.finish()


@check("kernel_parts_available")
def kernel_parts_available():
    """Builds (first use) and reports the CUDA parts; every later check assumes they are on (an H200 with nvcc)."""
    from fp4_compile.ops import cublaslt, cuda_quant, cuda_small_m, cuda_wgmma, fast_linear, silu_mul

    idx = torch.cuda.current_device()
    parts = {"fast_linear": fast_linear, "small_m": cuda_small_m, "wgmma": cuda_wgmma, "quant": cuda_quant,
             "cublaslt": cublaslt, "silu_mul": silu_mul}
    off = {name: mod.unavailable_reason(idx) for name, mod in parts.items()}
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(NGPU))
    info = (f"torch {torch.__version__}, cuda {torch.version.cuda}, {NGPU} GPU(s): {names}; "
            f"selected backend {fp4_compile.select_backend(DEV).value}")
    bad = {k: v for k, v in off.items() if v is not None}
    if bad:
        raise Fail(f"parts off: {bad} ({info})")
    return "all CUDA parts on; " + info


@check("strided_and_shaped_inputs", cpu_selftest=True)
def strided_and_shaped_inputs():
    """Activations as users hand them over: row-padded views (rows 16 B apart: the fast path replays them with
    their stride; 8 B apart: not), a misaligned base, transposed, expanded (stride 0: beam search), 3-D/4-D.
    Hazards: fast_linear.cpp unit_stride_rows() accepts any stride when size(0)==1 and stride(0)==0 for every M
    (passes ldx=0 on to the quant kernel and, for marlin, to the wgmma kernel's TMA map: nvfp4_wgmma.cu launch()
    encodes globalStrides = ldx*2 = 0); nvcc.gemm_operands() keeps stride(0)==0 too (0 % 8 == 0)."""
    p = Problems()
    shapes = ((1000, 1040), (4096, 4096)) if CUDA else ((200, 352),)
    ms = (1, 12, 64, 300) if CUDA else (1, 5)
    for backend in BACKENDS:
        for n, k in shapes:
            layer = make_layer(n, k, backend, seed=11 + n)
            for m in ms:
                seed = 100 * m + n
                variants = {
                    "contiguous": lambda: rand_x((m, k), seed=seed),
                    "rows_16B_apart": lambda: rand_x((m, k + 8), seed=seed)[:, :k],
                    "rows_128B_apart": lambda: rand_x((m, k + 64), seed=seed)[:, :k],
                    "rows_8B_apart": lambda: rand_x((m, k + 4), seed=seed)[:, :k],
                    "base_8B_misaligned": lambda: rand_x((m, k + 8), seed=seed)[:, 4:4 + k],
                    "transposed": lambda: rand_x((k, m), seed=seed).t(),
                    "expand_rows": lambda: rand_x((1, k), seed=seed).expand(m, k),
                    "expand_3d_beams": lambda: rand_x((1, 1, k), seed=seed).expand(m, 1, k),
                    "lead_3d": lambda: rand_x((2, m, k), seed=seed),
                    "permuted_4d": lambda: rand_x((m, 2, 3, k), seed=seed).permute(1, 0, 2, 3),
                    "fp16_rows_16B_apart": lambda: rand_x((m, k + 8), torch.float16, seed=seed)[:, :k],
                    "fp16_expand_rows": lambda: rand_x((1, k), torch.float16, seed=seed).expand(m, k),
                }
                for vname, make in variants.items():
                    label = f"{backend} {n}x{k} M={m} {vname} [{eager_path_label(layer, m)}]"
                    with p.case(label):
                        x = make()
                        with torch.no_grad():
                            first = layer(x)
                            before = replayed()
                            second = layer(x)
                            replays = replayed() - before
                        sync()
                        lead = tuple(x.shape[:-1])
                        assert tuple(first.shape) == lead + (n,), f"output shape {tuple(first.shape)}"
                        ref, size = layer_reference(layer, x.contiguous())
                        extra = 1.0 if backend == "emulation" else 0.0
                        if p.within(label + " 1st", first, ref, size, extra):
                            p.within(label + " 2nd", second, ref, size, extra)
                        p.equal(label + " 1st vs 2nd call", first, second)
                        if vname in ("rows_16B_apart", "expand_rows") and m == 64 and n == 4096:
                            p.note(f"{backend} M=64 {vname}: fast-path replays {replays}")
    return p.finish()


@check("empty_batch", cpu_selftest=True)
def empty_batch():
    """M = 0 (an empty batch, 2-D and 3-D) through the layer and through the public ops directly (torch.ops.fp4.linear /
    linear_group are documented ops; the layer guards M=0 itself, layer.py forward)."""
    p = Problems()
    for backend in BACKENDS:
        layer = make_layer(1000, 1040, backend, seed=21)
        for shape in ((0, 1040), (0, 5, 1040), (3, 0, 1040)):
            with p.case(f"{backend} layer {shape}"):
                with torch.no_grad():
                    out = layer(rand_x(shape, seed=1))
                assert tuple(out.shape) == shape[:-1] + (1000,) and out.dtype == torch.bfloat16, tuple(out.shape)
        x0 = rand_x((0, 1040), seed=2)
        gs = layer.weight_global_scale if layer.semantics == "W4A16" else layer.input_global_scale
        args = (layer.weight, layer.weight_scale, gs, layer.alpha, layer.bias.to(torch.bfloat16), 1000,
                layer.backend.value)
        with p.case(f"{backend} torch.ops.fp4.linear M=0"):
            with torch.no_grad():
                out = torch.ops.fp4.linear(x0, *args)
            assert tuple(out.shape) == (0, 1000), tuple(out.shape)
        with p.case(f"{backend} torch.ops.fp4.linear_group M=0"):
            with torch.no_grad():
                outs = torch.ops.fp4.linear_group(x0, [args[0]] * 2, [args[1]] * 2, [args[2]] * 2, [args[3]] * 2,
                                                  [args[4]] * 2, [1000, 1000], args[6])
            assert [tuple(o.shape) for o in outs] == [(0, 1000)] * 2
        sync()
    return p.finish()


@check("activation_dtypes_and_grad_modes", cpu_selftest=True)
def activation_dtypes_and_grad_modes():
    """fp16 / bf16 / fp32 activations, static and dynamic scales, under no_grad, inference_mode and plain grad mode
    (x without grad), across the M edges (fp32 calls never take the fast path: they take the Python path each time,
    at M >= 1024 dequantization + cuBLASLt)."""
    p = Problems()
    ms = (1, 12, 17, 64, 1100) if CUDA else (1, 5)
    modes = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad_mode": contextlib.nullcontext}
    for backend in BACKENDS:
        for static in ((True, False) if backend != "marlin" else (True,)):
            layer = make_layer(4096 if CUDA else 256, 4096 if CUDA else 352, backend, static=static, seed=31)
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                for m in ms:
                    for mode_name, mode in modes.items():
                        if mode_name != "no_grad" and m not in (12, 64):
                            continue
                        label = f"{backend} static={static} {dt} M={m} {mode_name}"
                        with p.case(label):
                            x = rand_x((m, layer.in_features), dt, seed=m + 7)
                            with mode():
                                out = layer(x)
                                out2 = layer(x)
                            sync()
                            assert out.dtype == dt, f"output dtype {out.dtype}"
                            assert not out.requires_grad, "output requires grad"
                            ref, size = layer_reference(layer, x)
                            extra = 1.0 if backend == "emulation" else 0.0
                            p.within(label, out, ref, size, extra)
                            if not torch.equal(out, out2):
                                p.note(f"{label}: two calls not bit-identical")
    return p.finish()


@check("autocast_fp32_model", cpu_selftest=True)
def autocast_fp32_model():
    """An fp32 model (NVFP4 -> dense nn.Linear -> GELU -> NVFP4) under torch.autocast(bfloat16): the dense layer
    hands a bf16 activation to an NVFP4 layer whose bias is fp32 (layer.py casts the bias to x's dtype); every
    NVFP4 layer's input/output pair (forward hooks) is checked against the reference."""
    p = Problems()
    device_type = "cuda" if CUDA else "cpu"
    for backend in BACKENDS:
        with p.case(backend):
            torch.manual_seed(41)
            model = nn.Sequential(nn.Linear(1040, 1000), nn.Linear(1000, 1024), nn.GELU(),
                                  nn.Linear(1024, 512)).to(DEV).eval()
            quantize_model(model, backend=backend, progress=False,
                           filter_fn=lambda name, lin: name in ("0", "3"),
                           calibration_data=[rand_x((32, 1040), torch.float32, seed=42)])
            seen = []
            hooks = [model[i].register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
                     for i in (0, 3)]
            try:
                for m in ((1, 12, 64, 300) if CUDA else (3,)):
                    seen.clear()
                    x = rand_x((m, 1040), torch.float32, seed=43 + m)
                    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16):
                        y = model(x)
                    sync()
                    assert y.dtype == torch.bfloat16, f"autocast output dtype {y.dtype}"
                    for mod, xin, out in seen:
                        ref, size = layer_reference(mod, xin)
                        p.within(f"{backend} M={m} layer in {xin.dtype}", out, ref, size,
                                 1.0 if backend == "emulation" else 0.0)
            finally:
                for h in hooks:
                    h.remove()
    return p.finish()


@check("stale_state_after_user_changes")
def stale_state_after_user_changes():
    """After plans are recorded (first call: Python path; later: fast path), the user changes the layer:
    load_state_dict (copy and assign=True), a new bias Parameter, in-place bias / weight edits (+ refresh_alpha), a
    cuda->cpu->cuda round trip (named and selected backend), set_backend to marlin and back, deepcopy, static->dynamic
    scale, a model-wide .half(). Each next call must compute the layer as it now is (fast_linear.cpp keys plans by
    shapes only; layer.py caches alpha)."""
    p = Problems()
    n = k = 4096
    ms = (1, 12, 64, 300)
    layer = make_layer(n, k, "triton-w4a4", seed=51)
    donor = make_layer(n, k, "triton-w4a4", seed=52, amax=3.0)
    donor2 = make_layer(n, k, "triton-w4a4", seed=53, amax=6.0)
    xs = {m: rand_x((m, k), seed=500 + m) for m in ms}

    def run(tag: str, against: NVFP4Linear | None = None, dtype=torch.bfloat16):
        for m in ms:
            with p.case(f"{tag} M={m}"):
                x = xs[m].to(dtype)
                with torch.no_grad():
                    a = layer(x)
                    b = layer(x)
                    c = against(x) if against is not None else None
                sync()
                ref, size = layer_reference(layer, x)
                p.within(f"{tag} M={m}", a, ref, size)
                p.equal(f"{tag} M={m} repeat", a, b)
                if c is not None:
                    p.equal(f"{tag} M={m} vs a fresh layer of that state", a, c)

    run("initial")
    layer.load_state_dict(donor.state_dict())
    run("after load_state_dict", donor)
    layer.load_state_dict(donor2.state_dict(), assign=True)
    run("after load_state_dict(assign=True)", donor2)
    layer.bias = nn.Parameter(torch.randn(n, device=DEV, generator=gen(54)).to(torch.bfloat16), requires_grad=False)
    run("after a new bias Parameter")
    with torch.no_grad():
        layer.bias.mul_(-3.0)
    run("after an in-place bias edit")
    with torch.no_grad():
        layer.weight.copy_(donor.weight)
        layer.weight_scale.copy_(donor.weight_scale)
        layer.weight_global_scale.copy_(donor.weight_global_scale)
        layer.input_global_scale = donor.input_global_scale.clone()
        layer.bias.copy_(donor.bias)
        layer.refresh_alpha()
    run("after in-place weight edits + refresh_alpha", donor)
    layer.cpu()
    layer.cuda()
    run("after .cpu().cuda() (named backend)", donor)
    layer.set_backend("marlin")
    run("after set_backend('marlin')")
    layer.set_backend("triton-w4a4")
    run("after set_backend back to triton-w4a4", donor)
    with p.case("deepcopy"):
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            p.equal("deepcopy M=64", twin(xs[64]), layer(xs[64]))
    layer.input_global_scale = None
    layer.refresh_alpha()
    run("after switching to a dynamic activation scale")
    holder = nn.Sequential(layer).half()
    run("after model.half() (fp16 bias, fp16 activations)", dtype=torch.float16)
    holder.bfloat16()
    # a layer whose backend was selected (follows its device): emulation on the CPU, Hopper's again on the GPU
    selected = make_layer(n, k, None, seed=55)
    with p.case("selected backend cuda->cpu->cuda"):
        x = xs[12]
        with torch.no_grad():
            before = selected(x)
            selected.cpu()
            on_cpu = selected(x.cpu())
            selected.cuda()
            after = selected(x)
        ref, size = layer_reference(selected, x)
        p.within("selected before", before, ref, size)
        p.within("selected on cpu (emulation)", on_cpu.to(DEV), ref, size, extra_ulps=1.0)
        p.equal("selected before/after the round trip", before, after)
    return p.finish()


@check("scale_setattr_without_refresh_alpha")
def scale_setattr_without_refresh_alpha():
    """A user sets a calibrated activation scale the nn.Module way (``layer.input_global_scale = t`` or an in-place
    ``fill_``) without calling refresh_alpha(): forward (layer.py: alpha = self.alpha for static scales) keeps the old
    alpha while quantizing with the new scale. The docstring of refresh_alpha asks for the call; this records whether
    the footgun is live (FAIL = stale alpha used)."""
    p = Problems()
    x = rand_x((12, 1040), seed=62)
    for how in ("setattr", "fill_"):
        with p.case(how):
            layer = make_layer(1000, 1040, "triton-w4a4", seed=61, amax=4.5)
            with torch.no_grad():
                layer(x)
            new = F.global_scale_from_amax(torch.tensor(9.0, device=DEV)).reshape(1).float()
            if how == "setattr":
                layer.input_global_scale = new
            else:
                with torch.no_grad():
                    layer.input_global_scale.fill_(float(new))
            with torch.no_grad():
                out = layer(x)
            sync()
            ref, size = layer_reference(layer, x)
            p.within(f"{how} (no refresh_alpha)", out, ref, size)
    return p.finish()


@check("determinism_repeat_and_graph")
def determinism_repeat_and_graph():
    """The same call repeated gives bit-identical outputs (README: K splits reduced "in a fixed order"; Triton's
    split-K sums its partials in order too), eagerly (Python path, then fast path) and in a CUDA graph replayed twice,
    on the shapes whose launches split K through memory (wgmma fixup, persistent split tail) or in clusters."""
    p = Problems()
    cases = (("triton-w4a4", 4096, 4096, 64), ("triton-w4a4", 14336, 4096, 17), ("marlin", 4096, 14336, 33),
             ("marlin", 6144, 4096, 1100), ("triton-w4a4", 1000, 1040, 300), ("marlin", 28672, 4096, 16),
             ("triton-w4a4", 6144, 4096, 12))
    for backend, n, k, m in cases:
        layer = make_layer(n, k, backend, seed=71 + m)
        label = f"{backend} {n}x{k} M={m} [{eager_path_label(layer, m)}]"
        with p.case(label):
            x = rand_x((m, k), seed=72 + m)
            with torch.no_grad():
                outs = [layer(x) for _ in range(4)]
            sync()
            ref, size = layer_reference(layer, x)
            p.within(label, outs[0], ref, size)
            for i, o in enumerate(outs[1:], 1):
                p.equal(f"{label} call {i}", o, outs[0])
            static = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.stream(s):
                layer(static)
                with torch.cuda.graph(graph, stream=s):
                    g_out = layer(static)
            torch.cuda.current_stream().wait_stream(s)
            graph.replay()
            sync()
            first = g_out.clone()
            graph.replay()
            sync()
            p.within(label + " graph", first, ref, size)
            p.equal(label + " graph replay twice", g_out, first)
    return p.finish()


@check("two_streams_same_layer")
def two_streams_same_layer():
    """One layer called from two CUDA streams at once (fast path on both; split-K tickets are regions of one buffer
    per device, fast_linear.cpp take_tickets): each stream's outputs equal the single-stream ones bit for bit."""
    p = Problems()
    fl = fast_path()
    if fl is None:
        raise Skip("fast path off")
    cases = (("triton-w4a4", 4096, 4096, 64), ("marlin", 4096, 14336, 17), ("triton-w4a4", 6144, 4096, 12),
             ("marlin", 6144, 4096, 1100), ("triton-w4a4", 4096, 4096, 1))
    for backend, n, k, m in cases:
        layer = make_layer(n, k, backend, seed=81 + m)
        label = f"{backend} {n}x{k} M={m} [{eager_path_label(layer, m)}]"
        with p.case(label):
            xa = [rand_x((m, k), seed=82 + i) for i in range(6)]
            xb = [rand_x((m, k), seed=182 + i) for i in range(6)]
            with torch.no_grad():
                for x in xa[:1]:
                    layer(x)  # records the plan
                ref_a = [layer(x) for x in xa]
                ref_b = [layer(x) for x in xb]
                before = replayed()
                out_a, out_b = run_gated(lambda: [layer(x) for x in xa], lambda: [layer(x) for x in xb])
            if replayed() - before != 2 * len(xa):
                p.note(f"{label}: {replayed() - before} of {2 * len(xa)} calls replayed")
            for i in range(len(xa)):
                p.equal(f"{label} stream A call {i}", out_a[i], ref_a[i])
                p.equal(f"{label} stream B call {i}", out_b[i], ref_b[i])
            ref, size = layer_reference(layer, xa[0])
            p.within(label, ref_a[0], ref, size)
    return p.finish()


@check("user_graph_and_eager_other_stream")
def user_graph_and_eager_other_stream():
    """A CUDA graph captured by the user (torch.cuda.graph) replayed on one stream while eager calls of the same layer
    run on another (bf16: the fast path; and fp32 activations: the Python path, whose split-K tickets come from the
    same Python buffer, split_tickets.py, as the graph's)."""
    p = Problems()
    for backend, n, k, m in (("triton-w4a4", 4096, 4096, 64), ("marlin", 4096, 14336, 33)):
        layer = make_layer(n, k, backend, seed=91 + m)
        for eager_dtype in (torch.bfloat16, torch.float32):
            label = f"{backend} {n}x{k} M={m} eager {eager_dtype}"
            with p.case(label):
                static = rand_x((m, k), seed=92)
                with torch.no_grad():
                    layer(static)
                    layer(rand_x((m, k), eager_dtype, seed=93))
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.stream(s):
                    with torch.cuda.graph(graph, stream=s):
                        g_out = layer(static)
                torch.cuda.current_stream().wait_stream(s)
                sync()
                for i in range(8):
                    xg = rand_x((m, k), seed=1000 + i)
                    xe = rand_x((m, k), eager_dtype, seed=2000 + i)
                    static.copy_(xg)
                    with torch.no_grad():
                        _, e_out = run_gated(lambda: graph.replay(), lambda: layer(xe), sleep_cycles=4_000_000)
                    ref, size = layer_reference(layer, xg)
                    p.within(f"{label} iter {i} graph", g_out, ref, size)
                    ref, size = layer_reference(layer, xe)
                    p.within(f"{label} iter {i} eager", e_out, ref, size)
    return p.finish()


@check("cublaslt_workspace_two_streams")
def cublaslt_workspace_two_streams():
    """fp32 activations at M >= 1024 on weights the wgmma kernel would split (few output tiles) take
    dequantization + cuBLASLt (hopper.py use_dequant) eagerly, on every call. ops/cublaslt.py gives every call on a
    device ONE workspace (_DeviceState.workspace, 32 MB), whatever the stream, while the shim's contract
    (cublaslt_gemm.cu: 'workspace ... not used by anything else on another stream concurrently') forbids sharing it
    across concurrent streams: two streams running such calls at once may corrupt each other's split-K partials."""
    from fp4_compile.ops import cublaslt

    p = Problems()
    used = 0
    for backend, n, k, m in (("triton-w4a4", 1024, 4096, 1024), ("marlin", 1024, 14336, 1024),
                             ("triton-w4a4", 512, 14336, 2048), ("marlin", 1024, 8192, 1024)):
        layer = make_layer(n, k, backend, seed=101 + n + k)
        label = f"{backend} {n}x{k} M={m} fp32"
        with p.case(label):
            xa = [rand_x((m, k), torch.float32, seed=102 + i) for i in range(4)]
            xb = [rand_x((m, k), torch.float32, seed=202 + i) for i in range(4)]
            log: list = []
            with count_calls(cublaslt, "gemm_alpha", log), torch.no_grad():
                ref_a = [layer(x) for x in xa]
                ref_b = [layer(x) for x in xb]
            if not log:
                p.note(f"{label}: did not take cuBLASLt")
                continue
            used += 1
            for it in range(3):
                with torch.no_grad():
                    out_a, out_b = run_gated(lambda: [layer(x) for x in xa], lambda: [layer(x) for x in xb])
                for i in range(len(xa)):
                    if not torch.equal(out_a[i], ref_a[i]) or not torch.equal(out_b[i], ref_b[i]):
                        for x, o, tag in ((xa[i], out_a[i], "A"), (xb[i], out_b[i], "B")):
                            ref, size = layer_reference(layer, x)
                            p.within(f"{label} round {it} stream {tag} call {i}", o, ref, size)
                        p.note(f"{label}: concurrent outputs differ from the single-stream ones")
            ref, size = layer_reference(layer, xa[0])
            p.within(label + " single stream", ref_a[0], ref, size)
    return p.finish(f"{used} shapes took cuBLASLt")


# ----- compile checks ------------------------------------------------------------------------------------


def sweep_compiled(p: Problems, label: str, model: Direct, compiled, ms, dtype, *, mode=torch.no_grad,
                   calls: int = 1, extra_ulps: float = 0.0, x3d: bool = False) -> None:
    for m in ms:
        for call in range(calls):
            with p.case(f"{label} M={m} call {call}"):
                x = rand_x((m, model.q.in_features), dtype, seed=3000 + 7 * m + call)
                with mode():
                    outs = [o.clone() for o in compiled(x)]
                    eager = model(x)
                sync()
                validate_direct(p, f"{label} M={m} call {call}", model, x, outs, extra_ulps)
                for name, o, e in zip(DIRECT_LINEARS + ("silu_mul",), outs, eager):
                    d = rel(o, e.double())
                    if d > 1e-2:
                        p.bad.append(f"[{label} M={m}] {name}: compiled vs eager rel diff {d:.3g}")
    if x3d:
        with p.case(f"{label} 3-D input"):
            x = rand_x((2, 5, model.q.in_features), dtype, seed=4000)
            with mode():
                outs = compiled(x)
            sync()
            assert tuple(outs[0].shape) == (2, 5, model.q.out_features), tuple(outs[0].shape)
            validate_direct(p, f"{label} 3-D", model, x.reshape(10, -1), [o.reshape(10, -1) for o in outs],
                            extra_ulps)


@check("compile_fp4_fullgraph_then_state_changes", cpu_selftest=True)
def compile_fp4_fullgraph_then_state_changes():
    """torch.compile(backend="fp4", fullgraph=True) of q/k/v/odd + gate/up SiLU*mul (W4A4, calibrated scales shared by
    all six, so the pass groups and gates them), M across every dispatch edge; then, on the same compiled function:
    (a) a load_state_dict that gives k and v their own, different activation scales (layer.py
    _take_activation_scale un-shares them: the graph grouped them on ONE scale tensor, so Dynamo must recompile);
    (b) set_backend('marlin') on every layer (the backend string is a constant of the graph)."""
    dynamo_reset()
    p = Problems()
    backend = BACKENDS[0]
    model = make_direct(backend, torch.bfloat16, seed=111, hidden=2048 if CUDA else 256)
    compiled = torch.compile(model, backend="fp4", fullgraph=True)
    extra = 1.0  # a graph the pass leaves unfused adds the bias after rounding
    ms = COMPILE_MS if CUDA else (1, 5)
    g0 = graphs_compiled()
    sweep_compiled(p, "fullgraph", model, compiled, ms, torch.bfloat16, extra_ulps=extra, x3d=True)
    shared = model.q.input_global_scale is model.k.input_global_scale
    # (a) un-share k's and v's activation scales, with new values
    donor = make_direct(backend, torch.bfloat16, seed=112, hidden=model.q.in_features)
    sd = donor.state_dict()
    sd["k.input_global_scale"] = sd["k.input_global_scale"] * 2.0
    sd["v.input_global_scale"] = sd["v.input_global_scale"] * 0.5
    model.load_state_dict(sd)
    sweep_compiled(p, "after load_state_dict un-sharing scales", model, compiled, ms[:5], torch.bfloat16,
                   extra_ulps=extra)
    # (b) another backend of the same layout
    if CUDA:
        for name in DIRECT_LINEARS + ("gate", "up"):
            getattr(model, name).set_backend("marlin")
        sweep_compiled(p, "after set_backend('marlin')", model, compiled, (1, 12, 64, 300), torch.bfloat16,
                       extra_ulps=extra)
    return p.finish(f"{graphs_compiled() - g0} graphs compiled; scales shared at compile: {shared}")


@check("compile_fp4_dynamic_marlin_fp16_grad_mode", cpu_selftest=True)
def compile_fp4_dynamic_marlin_fp16_grad_mode():
    """dynamic=True, W4A16 (marlin; emulation on the CPU self-test), fp16 activations, run in grad mode (no no_grad),
    M across the edges: one symbolic-M graph (plus M=1)."""
    dynamo_reset()
    p = Problems()
    backend = BACKENDS[-1]
    model = make_direct(backend, torch.float16, seed=121, hidden=2048 if CUDA else 256)
    compiled = torch.compile(model, backend="fp4", dynamic=True)
    g0 = graphs_compiled()
    sweep_compiled(p, "dynamic=True fp16", model, compiled, COMPILE_MS if CUDA else (1, 5, 9), torch.float16,
                   mode=contextlib.nullcontext, extra_ulps=1.0)
    return p.finish(f"{graphs_compiled() - g0} graphs compiled")


@check("compile_fp4_reduce_overhead_then_reload")
def compile_fp4_reduce_overhead_then_reload():
    """mode="reduce-overhead" (cudagraph trees; the fp4 ops captured through the Python path), several calls per M
    with new inputs (warm-up, record, replays), then load_state_dict of other weights and scales into the eager
    model (weights copied in place; alpha and input_global_scale become NEW tensors, layer.py refresh_alpha and
    _take_activation_scale: the recorded graphs hold the old addresses) and the replays must follow."""
    dynamo_reset()
    p = Problems()
    model = make_direct("triton-w4a4", torch.bfloat16, seed=131)
    compiled = torch.compile(model, backend="fp4", mode="reduce-overhead")
    g0 = graphs_compiled()
    sweep_compiled(p, "reduce-overhead", model, compiled, (1, 12, 16, 17, 64, 300), torch.bfloat16, calls=3,
                   extra_ulps=1.0)
    donor = make_direct("triton-w4a4", torch.bfloat16, seed=132, calib_scale=3.0)
    model.load_state_dict(donor.state_dict())
    sweep_compiled(p, "reduce-overhead after load_state_dict", model, compiled, (1, 12, 64), torch.bfloat16, calls=3,
                   extra_ulps=1.0)
    return p.finish(f"{graphs_compiled() - g0} graphs compiled")


@check("compile_fp4_max_autotune_norm_block", cpu_selftest=True)
def compile_fp4_max_autotune_norm_block():
    """mode="max-autotune-no-cudagraphs" on a Llama-style block (RMSNorm+quantization fusion into
    fp4.rms_norm_quantize, q/k/v group, SiLU*mul, residuals), W4A4 static scales: compiled vs eager (the whole block:
    a relative error, as the norm's roundings may flip single activation codes: at most 2e-2 as
    tests/test_fuse_rms_norm_quant.py asks; README measured below 5e-5 on its 4-layer model)."""
    dynamo_reset()
    p = Problems()
    hidden = 2048 if CUDA else 256
    torch.manual_seed(141)
    block = NormBlock(hidden, 4096 if CUDA else 512, DEV, torch.bfloat16).eval()
    with torch.no_grad():
        for i, prm in enumerate(block.parameters()):
            if prm.dim() == 2:
                prm.copy_(torch.randn(prm.shape, device=DEV, generator=gen(1000 + i)).to(prm.dtype) * 0.03)
    calib = [(rand_x((64, hidden), seed=142), rand_x((64, hidden), seed=143))]
    quantize_model(block, backend=BACKENDS[0], calibration_data=calib, progress=False)
    mode = "max-autotune-no-cudagraphs" if CUDA else None
    compiled = torch.compile(block, backend="fp4", mode=mode)
    g0 = graphs_compiled()
    worst = 0.0
    for m in ((1, 12, 64, 300) if CUDA else (1, 5)):
        with p.case(f"M={m}"):
            x, r = rand_x((m, hidden), seed=144 + m), rand_x((m, hidden), seed=145 + m)
            with torch.no_grad():
                outs = [o.clone() for o in compiled(x, r)]
                eager = block(x, r)
            sync()
            for name, o, e in zip(("out", "k", "v"), outs, eager):
                d = rel(o, e.double())
                worst = max(worst, d)
                if not bool(torch.isfinite(o).all()) or d > (2e-2 if CUDA else 1e-1):  # (CPU: no norm fusion)
                    p.bad.append(f"[M={m} {name}] compiled vs eager rel diff {d:.3g}")
    return p.finish(f"{graphs_compiled() - g0} graphs compiled, worst compiled-vs-eager rel diff {worst:.3g}")


@check("compile_default_inductor_backend", cpu_selftest=True)
def compile_default_inductor_backend():
    """torch.compile(model) with the default "inductor" backend (a user who forgets backend="fp4"): W4A4 layers trace
    the unfused chain fp4.quantize -> pad_k -> fp4.mm -> slice -> + bias (layer.py forward), which then runs on the
    GPU through TritonW4A4Kernels.mm; it must still compute the layers."""
    dynamo_reset()
    p = Problems()
    model = make_direct(BACKENDS[0], torch.bfloat16, seed=151, hidden=1040 if CUDA else 256)
    compiled = torch.compile(model)
    g0 = graphs_compiled()
    sweep_compiled(p, "inductor", model, compiled, (1, 12, 17, 64, 300) if CUDA else (1, 5), torch.bfloat16,
                   extra_ulps=1.0)
    return p.finish(f"{graphs_compiled() - g0} graphs compiled")


@check("compile_fp4_under_autocast")
def compile_fp4_under_autocast():
    """torch.compile(backend="fp4") of an fp32 model with NVFP4 layers, called under torch.autocast(cuda, bf16):
    compiled vs eager under the same autocast."""
    dynamo_reset()
    p = Problems()
    torch.manual_seed(161)
    model = nn.Sequential(nn.Linear(1040, 1000), nn.Linear(1000, 1024), nn.GELU(), nn.Linear(1024, 512)).to(DEV)
    quantize_model(model.eval(), backend="triton-w4a4", progress=False, filter_fn=lambda name, lin: name in ("0", "3"),
                   calibration_data=[rand_x((32, 1040), torch.float32, seed=162)])
    compiled = torch.compile(model, backend="fp4")
    g0 = graphs_compiled()
    for m in (1, 12, 64, 300):
        with p.case(f"M={m}"):
            x = rand_x((m, 1040), torch.float32, seed=163 + m)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x)
                eager = model(x)
            sync()
            assert out.dtype == eager.dtype, f"compiled {out.dtype} vs eager {eager.dtype}"
            d = rel(out, eager.double())
            p.max_rel = max(p.max_rel, d)
            if d > 1e-2:
                p.bad.append(f"[M={m}] compiled vs eager rel diff {d:.3g}")
    return p.finish(f"{graphs_compiled() - g0} graphs compiled")


# ----- isolated checks (fresh child process) --------------------------------------------------------------


@check("iso_fastpath_ticket_buffer_first_use_race", iso=True)
def iso_fastpath_ticket_buffer_first_use_race():
    """fast_linear.cpp take_tickets() creates the fast path's split-K ticket buffer lazily with at::zeros on the
    CURRENT stream of the first replay that splits K through memory, and hands its regions to every stream at once.
    A second stream's replay issued right after may run its wgmma kernel before that memset has run, counting in
    stale memory (wait_count() in nvfp4_wgmma.cu then sees a count >= target at once: wrong sums; a negative stale
    value would spin forever). Reproduced in a fresh process: stream A's first replay is queued behind a GPU sleep,
    stream B's replay runs at once; the allocator block the buffer gets was filled with 0x3F3F3F3F just before."""
    from fp4_compile.ops import cuda_wgmma

    if fast_path() is None:
        raise Skip("fast path off")
    p = Problems()
    chosen = None
    for backend, n, k, m in (("marlin", 4096, 4096, 64), ("marlin", 4096, 14336, 33), ("marlin", 4096, 4096, 32),
                             ("marlin", 14336, 4096, 17), ("triton-w4a4", 4096, 4096, 64)):
        layer = make_layer(n, k, backend, seed=171, bias=False)
        lp = cuda_wgmma.launch_params(m, n, k, 0, torch.bfloat16)
        if eager_path_label(layer, m).startswith("wgmma") and lp.fixup_floats > 0:
            chosen = (backend, n, k, m, layer, lp)
            break
    if chosen is None:
        raise Skip("no candidate shape splits K through memory on this GPU")
    backend, n, k, m, layer, lp = chosen
    label = f"{backend} {n}x{k} M={m} tickets/launch {lp.tickets}"
    x0 = rand_x((m, k), seed=172)
    with torch.no_grad():
        layer(x0)  # the Python path: records the plan (the fast path's buffer does not exist yet)
    xa, xb = rand_x((m, k), seed=173), rand_x((m, k), seed=174)
    sync()
    cur = torch.cuda.current_stream()
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    sa.wait_stream(cur)
    sb.wait_stream(cur)
    with torch.cuda.stream(sa):  # freed small-pool blocks (< 1 MB requests) full of non-zero bytes, in A's pool
        junk = [torch.full((fast_linear_ticket_entries(),), 0x3F3F3F3F, dtype=torch.int32, device=DEV)
                for _ in range(24)]
    torch.cuda.synchronize()
    del junk
    before = replayed()
    with torch.no_grad():
        with torch.cuda.stream(sa):
            torch.cuda._sleep(200_000_000)  # ~0.1 s
            out_a = layer(xa)
        with torch.cuda.stream(sb):
            out_b = layer(xb)
    cur.wait_stream(sa)
    cur.wait_stream(sb)
    torch.cuda.synchronize()
    p.note(f"replays {replayed() - before}/2")
    for tag, x, out in (("A (created the buffer)", xa, out_a), ("B (concurrent first use)", xb, out_b)):
        with p.case(f"{label} stream {tag}"):
            ref, size = layer_reference(layer, x)
            p.within(f"{label} stream {tag}", out, ref, size)
    with p.case(f"{label} later calls"):
        with torch.no_grad():
            out = layer(xa)
        sync()
        ref, size = layer_reference(layer, xa)
        p.within(f"{label} later call", out, ref, size)
    return p.finish(label)


def fast_linear_ticket_entries() -> int:
    return 1 << 16  # kTicketEntries in fast_linear.cpp


@check("iso_graph_ticket_ring_wrap_collision", iso=True)
def iso_graph_ticket_ring_wrap_collision():
    """split_tickets.py: a captured launch keeps its region of the device's ticket ring forever, while the ring's
    cursor wraps back to 0 after 65536 entries (split_tickets() 'if start + count > ENTRIES: start = 0'), so a later
    eager Python-path call (fp32 activations, strided rows, a new shape...) eventually takes the graph's region. If
    that call runs while the graph replays on another stream, both launches count in the same counters. First the
    ring is advanced by real fp32 calls until the next region overlaps the graph's (reachability), then the overlap is
    re-created (cursor set back, split_tickets._next) for each gated concurrent round."""
    from fp4_compile.ops import cuda_wgmma, split_tickets

    p = Problems()
    chosen = None
    for backend, n, k, m in (("triton-w4a4", 4096, 4096, 64), ("triton-w4a4", 4096, 14336, 33),
                             ("marlin", 4096, 4096, 64), ("marlin", 4096, 14336, 33), ("triton-w4a4", 1024, 4096, 64)):
        lp16 = cuda_wgmma.launch_params(m, n, k, 0, torch.bfloat16)
        lp32 = cuda_wgmma.launch_params(m, n, k, 0, torch.float32)
        if lp16.tickets > 0 and lp32.tickets > 0:
            chosen = (backend, n, k, m)
            break
    if chosen is None:
        raise Skip("no candidate whose captured (bf16) and eager (fp32) launches both split K through memory")
    backend, n, k, m = chosen
    layer = make_layer(n, k, backend, seed=181, bias=False)
    label = f"{backend} {n}x{k} M={m}"
    log: list = []
    key = split_tickets._key(DEV)
    with count_calls(cuda_wgmma, "split_tickets", log):
        static = rand_x((m, k), seed=182)
        with torch.no_grad():
            layer(static)
            layer(rand_x((m, k), torch.float32, seed=183))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        log.clear()
        with torch.no_grad(), torch.cuda.stream(s):
            with torch.cuda.graph(graph, stream=s):
                g_out = layer(static)
        torch.cuda.current_stream().wait_stream(s)
        if not log:
            raise Skip(f"{label}: the captured call took no split tickets")
        g_ptr, g_count = log[0][2].data_ptr(), log[0][2].numel()
        base = split_tickets._buffers[key].data_ptr()
        g_start = (g_ptr - base) // 4
        if not 0 <= g_start < split_tickets.ENTRIES:
            raise Skip(f"{label}: the captured call took a fresh tensor, not a region of the ring")
        # advance the ring with real eager fp32 calls until the next region overlaps the graph's
        x32 = rand_x((m, k), torch.float32, seed=184)
        calls = 0
        log.clear()
        with torch.no_grad():
            for calls in range(1, 200_000):
                layer(x32)
                start = (log[-1][2].data_ptr() - base) // 4
                count = log[-1][2].numel()
                nxt = split_tickets._next[key]
                nxt = 0 if nxt + count > split_tickets.ENTRIES else nxt
                if nxt < g_start + g_count and g_start < nxt + count:
                    break
                log.clear()
        sync()
        p.note(f"graph region [{g_start}, {g_start + g_count}); an eager fp32 call reached it after {calls} calls "
               f"({start}+{count} before)")
        for it in range(6):
            xg = rand_x((m, k), seed=3000 + it)
            xe = rand_x((m, k), torch.float32, seed=4000 + it)
            static.copy_(xg)
            split_tickets._next[key] = g_start  # the overlap the wrap gave above
            with torch.no_grad():
                _, e_out = run_gated(lambda: graph.replay(), lambda: layer(xe), sleep_cycles=4_000_000)
            with p.case(f"{label} round {it}"):
                ref, size = layer_reference(layer, xg)
                p.within(f"{label} round {it} graph replay", g_out, ref, size)
                ref, size = layer_reference(layer, xe)
                p.within(f"{label} round {it} eager fp32 (same tickets)", e_out, ref, size)
        with p.case(f"{label} graph replay alone afterwards"):
            xg = rand_x((m, k), seed=5000)
            static.copy_(xg)
            graph.replay()
            sync()
            ref, size = layer_reference(layer, xg)
            p.within(f"{label} graph replay alone", g_out, ref, size)
    return p.finish(label)


@check("iso_two_gpus", iso=True, gpus=2)
def iso_two_gpus():
    """Two GPUs in one process, cuda:0 current: the same layer shape on both devices (W4A4 used on cuda:0 first,
    W4A16 on cuda:1 first), a layer moved cuda:0 -> cuda:1 after calls, and a model split over the two devices, eager
    and compiled. Hazard: nvfp4_wgmma.cu allow_smem() sets cudaFuncAttributeMaxDynamicSharedMemorySize (about 210 KB)
    once per process in a function-local static, i.e. for the device current at the first launch only; the
    attribute is per device, so the same kernel instantiation on the other device launches without it. The same
    static serves fp4c_nvfp4_wgmma_cluster_capacity (cuda_wgmma.cluster_ctas), so the two identical GPUs may also
    report different cluster capacities and take different launch configurations."""
    from fp4_compile.ops import cuda_wgmma

    torch.cuda.set_device(0)
    p = Problems()
    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
    ms = (1, 12, 64, 300, 1100)
    for backend, order in (("triton-w4a4", (d0, d1)), ("marlin", (d1, d0))):
        first = make_layer(4096, 4096, backend, seed=191, device=order[0])
        layers = {order[0]: first, order[1]: copy.deepcopy(first).to(order[1])}  # the same weights on both
        for m in ms:
            x = rand_x((m, 4096), seed=192 + m, device=d0)
            outs = {}
            for d in order:
                for call in ("1st", "2nd"):
                    label = f"{backend} M={m} on {d} ({call} call; {order[0]} used first) [{eager_path_label(layers[d], m)}]"
                    with p.case(label):
                        xd = x.to(d)
                        with torch.no_grad():
                            out = layers[d](xd)
                        torch.cuda.synchronize(d)
                        assert out.device == d, f"output on {out.device}"
                        ref, size = layer_reference(layers[d], xd)
                        p.within(label, out, ref, size)
                        outs[(d, call)] = out.cpu()
            with p.case(f"{backend} M={m} same result on both GPUs"):
                if (d0, "2nd") in outs and (d1, "2nd") in outs:
                    p.equal(f"{backend} M={m} cuda:0 vs cuda:1", outs[(d0, "2nd")], outs[(d1, "2nd")],
                            "bit-identical across two identical GPUs")
        assert torch.cuda.current_device() == 0
    with p.case("cluster capacity per device"):
        caps = {i: cuda_wgmma.cluster_ctas(i) for i in (0, 1)}
        if caps[0] != caps[1] and torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1):
            raise Fail(f"cluster_ctas differ between identical GPUs: {caps}")
        p.note(f"cluster_ctas {caps[0]}")
    with p.case("layer moved cuda:0 -> cuda:1 after calls"):
        layer = make_layer(6144, 4096, "triton-w4a4", seed=193, device=d0)
        for m in (12, 64):
            with torch.no_grad():
                layer(rand_x((m, 4096), seed=194, device=d0))
                layer(rand_x((m, 4096), seed=194, device=d0))
        layer.to(d1)
        for m in (1, 12, 64, 300):
            x = rand_x((m, 4096), seed=195 + m, device=d1)
            with torch.no_grad():
                out = layer(x)
                out2 = layer(x)
            torch.cuda.synchronize(d1)
            ref, size = layer_reference(layer, x)
            p.within(f"moved layer M={m}", out, ref, size)
            p.within(f"moved layer M={m} 2nd", out2, ref, size)

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2048, 4096, device=d0, dtype=torch.bfloat16)
            self.b = nn.Linear(4096, 2048, device=d1, dtype=torch.bfloat16)

        def forward(self, x):
            h = self.a(x)
            return h, self.b(h.to(d1))

    torch.manual_seed(196)
    split = Split().eval()
    quantize_model(split, backend="triton-w4a4", progress=False,
                   calibration_data=[rand_x((32, 2048), seed=197, device=d0)])
    dynamo_reset()
    compiled = torch.compile(split, backend="fp4")
    for how, fn in (("eager", split), ("compiled", compiled), ("compiled again", compiled)):
        for m in (1, 12, 64, 300):
            label = f"split model {how} M={m}"
            with p.case(label):
                x = rand_x((m, 2048), seed=198 + m, device=d0)
                with torch.no_grad():
                    h, y = fn(x)
                torch.cuda.synchronize(d0)
                torch.cuda.synchronize(d1)
                assert h.device == d0 and y.device == d1, (h.device, y.device)
                ref, size = layer_reference(split.a, x)
                p.within(label + " part on cuda:0", h, ref, size, 1.0)
                ref, size = layer_reference(split.b, h.to(d1))
                p.within(label + " part on cuda:1", y, ref, size, 1.0)
                assert torch.cuda.current_device() == 0, "the current device changed"
    return p.finish()


# ----------------------------------------------------------------------------------------------------------
# driver


def run_check(name: str, fn, opts: dict) -> None:
    t0 = time.time()
    WATCH.update(name=name, t0=t0, limit=CHECK_LIMIT_S)
    if opts["gpus"] > 1 and NGPU < opts["gpus"]:
        emit("SKIP", name, f"needs {opts['gpus']} CUDA GPUs, this machine has {NGPU}")
        return
    if opts["cuda"] and not CUDA and not (SELFTEST and opts["cpu_selftest"]):
        emit("SKIP", name, "needs CUDA" + ("" if opts["cpu_selftest"] else " (no CPU self-test variant)"))
        return
    try:
        detail = fn()
        sync()
        emit("PASS", name, detail or "ok", time.time() - t0)
    except Skip as e:
        emit("SKIP", name, str(e), time.time() - t0)
    except Fail as e:
        emit("FAIL", name, str(e), time.time() - t0)
    except Exception as e:  # noqa: BLE001 - reported, the next check runs
        tb = traceback.extract_tb(e.__traceback__)
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in tb[-3:][::-1])
        emit("ERROR", name, f"{type(e).__name__}: {_short(e)} (at {where})", time.time() - t0)
    finally:
        if CUDA:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        WATCH["name"] = None


def run_isolated(name: str, timeout: float) -> None:
    t0 = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--child"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        emit("FAIL", name, f"child process timed out after {timeout:.0f} s (a GPU hang? e.g. a split-K counter that "
                           f"never reaches its target); stdout tail: {_short(tail[-600:])}", time.time() - t0)
        return
    lines = [ln for ln in done.stdout.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "ERROR", "SKIP")]
    mine = [ln for ln in lines if ln.split(" ", 2)[1].rstrip(":") == name]
    if not mine:
        emit("ERROR", name, f"child exited {done.returncode} without a result; stderr tail: "
                            f"{_short(done.stderr[-1500:], 1500)}", time.time() - t0)
        return
    status, rest = mine[-1].split(" ", 1)
    emit(status, name, rest.split(": ", 1)[1] if ": " in rest else rest, time.time() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated check names")
    parser.add_argument("--skip", default="", help="comma-separated check names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for name, fn, opts in CHECKS:
            print(f"{name}  {opts}")
        return 0
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    unknown = (only | skip) - {name for name, _, _ in CHECKS}
    if unknown:
        print(f"unknown checks: {sorted(unknown)}", file=sys.stderr)
        return 2
    t0 = time.time()
    start_watchdog(t0, args.child)
    if not args.child:
        print(f"# user_gpu_review: torch {torch.__version__}, CUDA {CUDA} ({NGPU} GPU(s)), "
              f"self-test {SELFTEST}, repo {REPO}", flush=True)
    for name, fn, opts in CHECKS:
        if (only and name not in only) or name in skip:
            continue
        if opts["iso"] and not args.child:
            if not CUDA or opts["gpus"] > NGPU:
                emit("SKIP", name, f"needs {opts['gpus']} CUDA GPU(s), this machine has {NGPU}")
                continue
            run_isolated(name, ISO_TIMEOUT_S.get(name, DEFAULT_ISO_TIMEOUT_S))
        else:
            run_check(name, fn, opts)
        if not args.child:
            write_json(t0)  # (kept current: an outer timeout still leaves the results so far)
    if args.child:
        return 0
    counts = {s: sum(r["status"] == s for r in RESULTS) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    print(f"# summary: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['ERROR']} ERROR, {counts['SKIP']} SKIP "
          f"in {time.time() - t0:.0f} s", flush=True)
    for r in RESULTS:
        if r["status"] in ("FAIL", "ERROR"):
            print(f"#   {r['status']} {r['name']}", flush=True)
    write_json(t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
