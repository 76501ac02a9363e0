"""The eager fast path of fp4::linear (ops/fast_linear.py, csrc/hopper/fast_linear.cpp).

On the GPU: every plan kind (block values or codes into the small-M kernel, block values into the
wgmma kernel with a K split through memory or a split tail, W4A16 on both kernels; with and without
bias; bf16 and fp16) gives bit for bit what the Python implementation gives, on fresh random data,
and within the exact W4A4 / W4A16 tolerance of the float64 reference; calls it must not replay
(strided rows, CUDA-graph capture, fp32 activations, bad operands) take the Python path, with its
errors. On the CPU: the C++ source compiles against this torch's headers, and the plan layout is
the same on both sides.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

import background_jobs
from fp4_compile import format as F
from fp4_compile.ops import fast_linear

DEV = "cuda"
TOL = {torch.float16: 1.5e-3, torch.bfloat16: 6e-3}  # output rounding dominates


def test_plan_fields_match_the_cpp_struct():
    text = fast_linear.SOURCE.read_text()
    body = re.search(r"struct Plan \{(.*?)\};", text, re.S).group(1)
    fields = [name for line in body.splitlines() if line.strip().startswith("int64_t")
              for name in re.findall(r"(\w+)\s*[,;]", line.split("//")[0])]
    assert tuple(fields) == fast_linear.Plan._fields
    constants = dict(re.findall(r"(k\w+) = (\d+)", text))
    assert int(constants["kQuantValues"]) == fast_linear.cuda_quant.MODE_VALUES
    assert int(constants["kQuantCodes"]) == fast_linear.cuda_quant.MODE_KERNEL_CODES
    assert int(constants["kGemmSmallM"]) == fast_linear.GEMM_SMALL_M
    assert int(constants["kGemmWgmma"]) == fast_linear.GEMM_WGMMA


@pytest.mark.background_job("fast_linear_gxx")
def test_cpp_source_compiles_against_this_torch():
    """A syntax-and-types check of the extension with g++ (tests/background_jobs.py)."""
    done = background_jobs.result("fast_linear_gxx")
    assert done.returncode == 0, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if "fast_linear.cpp:" in line and "warning" in line]
    assert not ours, ours


# ---------------------------------------------------------------------------------------------
# GPU

def _need_fast_path():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = fast_linear.unavailable_reason(torch.cuda.current_device())
    if reason is not None:
        pytest.skip(reason)


def _layer(backend: str, n: int, k: int, dt: torch.dtype, with_bias: bool):
    """A prepared weight of ``backend``, its operands and a bias, from fresh random data."""
    from fp4_compile.backends import kernels_for

    w = torch.randn(n, k, device=DEV)
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    pw, sw = F.quantize_nvfp4(w, gw)
    wt, wst = kernels_for(backend).prepare_weight(pw, sw)
    bias = torch.randn(n, device=DEV).to(dt) if with_bias else None
    return pw, sw, gw, wt, wst, bias


def _operands(backend, x, gw, gx):
    """(input global scale, alpha) of the op for ``backend``."""
    if backend == "marlin":
        return gw, (1 / gw).float()
    return gx, (1 / (gx * gw)).float()


class Problem(NamedTuple):
    x: torch.Tensor
    gx: torch.Tensor
    pw: torch.Tensor
    sw: torch.Tensor
    gw: torch.Tensor
    args: tuple  # fp4::linear's arguments after x


def _problem(backend: str, m: int, n: int, k: int, dt: torch.dtype = torch.bfloat16,
             with_bias: bool = False) -> Problem:
    """A prepared layer of ``backend`` and fresh activations, with the op's arguments."""
    _need_fast_path()
    pw, sw, gw, wt, wst, bias = _layer(backend, n, k, dt, with_bias)
    x = torch.randn(m, k, device=DEV).to(dt)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    return Problem(x, gx, pw, sw, gw, (wt, wst, *_operands(backend, x, gw, gx), bias, n, backend))


def _reference(backend, x, pw, sw, gx, gw, bias):
    wv = F.block_values(pw, sw).double()
    if backend == "marlin":
        ref = x.double() @ wv.t() / gw.double()
    else:
        px, sx = F.quantize_nvfp4(x, gx)
        ref = F.block_values(px, sx).double() @ wv.t() / (gx.double() * gw.double())
    return ref + bias.double() if bias is not None else ref


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# (backend, M, N, K): W4A4 block values + small-M (M=1, 5), codes + small-M (M=8, 12), block values +
# wgmma with a K split through memory (4096x4096 at M=64) and unsplit (M=40, odd N and K), W4A16 on
# both kernels; the plan kinds are checked by test_plans_cover_every_kernel_path.
CASES = [
    ("triton-w4a4", 1, 1000, 1040),
    ("triton-w4a4", 5, 256, 4096),
    ("triton-w4a4", 8, 4096, 4096),
    ("triton-w4a4", 12, 1000, 1040),
    ("triton-w4a4", 64, 4096, 4096),
    ("triton-w4a4", 40, 1000, 1088),
    ("marlin", 1, 4096, 4096),
    ("marlin", 3, 1000, 1040),
    ("marlin", 64, 4096, 4096),
    ("marlin", 24, 6144, 4096),
    # eager calls take the CUDA kernels where graphs take Triton or cuBLASLt
    ("triton-w4a4", 16, 9216, 256),
    ("marlin", 16, 4096, 4096),
    ("marlin", 12, 4096, 14336),  # W4A16 at M = 9..16 on a large weight: the wgmma kernel (use_wgmma)
    ("marlin", 48, 6144, 4096),
    ("triton-w4a4", 1024, 1024, 4096),
    ("marlin", 1024, 1024, 4096),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,m,n,k", CASES)
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fast_path_replays_the_python_path_bit_for_bit(seed, backend, m, n, k, dt, with_bias):
    p = _problem(backend, m, n, k, dt, with_bias)
    python = torch.ops.fp4._linear_python(p.x, *p.args)  # (records the key's plan)
    before = fast_linear.replayed_calls()
    outs = [torch.ops.fp4.linear(torch.randn(m, k, device=DEV).to(dt), *p.args) for _ in range(2)]
    out = torch.ops.fp4.linear(p.x, *p.args)
    assert fast_linear.replayed_calls() == before + 3, "the calls did not take the fast path"
    assert out.shape == (m, n) and out.dtype == dt and out.is_contiguous()
    assert torch.equal(out, python)
    assert all(torch.isfinite(o).all() for o in outs)
    assert rel(out, _reference(backend, p.x, p.pw, p.sw, p.gx, p.gw, p.args[4])) <= TOL[dt]


@pytest.mark.gpu
def test_plans_cover_every_kernel_path():
    """The cases above reach each plan kind, by the backends' own choices (hopper.py)."""
    _need_fast_path()
    from fp4_compile.ops import hopper

    kinds = set()
    for backend, m, n, k in CASES:
        _, _, _, wt, _, _ = _layer(backend, n, k, torch.bfloat16, False)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w4a4 = backend != "marlin"
        if w4a4 and hopper.use_codes(x, m, n, True):
            quant, gemm = fast_linear.cuda_quant.MODE_KERNEL_CODES, fast_linear.GEMM_SMALL_M
        else:
            quant = fast_linear.cuda_quant.MODE_VALUES if w4a4 else 0
            gemm = hopper._GEMM_KINDS[hopper._cuda_gemm(x, wt, m, n, w4a4, True)]
        kinds.add((quant, gemm, fast_linear.plan(x, wt, n, quant, gemm).fixup_floats > 0))
    assert {(q, g) for q, g, _ in kinds} == {(2, 0), (3, 0), (2, 1), (0, 0), (0, 1)}, kinds
    assert any(split for _, _, split in kinds), kinds


@pytest.mark.gpu
def test_eager_w4a16_at_m_9_to_16_takes_the_wgmma_kernel_on_large_weights():
    """The small-M kernel's time grows as N x K x M on bf16 activations: eager calls on weights of more than
    cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS take the wgmma kernel where its launch fills its waves; captured
    ones (not host-bound) take Triton as before."""
    _need_fast_path()
    from fp4_compile.ops import cuda_wgmma, hopper

    assert 6144 * 8192 == cuda_wgmma.EAGER_SMALL_M_MIN_ELEMENTS
    # 4096x14336: 16 tiles of 256 rows split 8 ways fill their waves; 17408x5120: 68 tiles, 3 ways 204 CTAs
    for n, k, eager_kernel in ((4096, 14336, hopper.wgmma_gemm), (6144, 8192, hopper.small_m_gemm),
                               (17408, 5120, hopper.small_m_gemm)):
        _, _, _, wt, _, _ = _layer("marlin", n, k, torch.bfloat16, False)
        for m in (9, 16):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            assert hopper._cuda_gemm(x, wt, m, n, False, True) is eager_kernel, (n, m)
            assert hopper._cuda_gemm(x, wt, m, n, False, False) is None, (n, m)


@pytest.mark.gpu
def test_calls_it_cannot_replay_take_the_python_path(seed):
    p = _problem("triton-w4a4", 3, 1000, 1040, with_bias=True)
    x, (wt, wst, gs, alpha, bias, n, backend) = p.x, p.args
    ref = torch.ops.fp4.linear(x, *p.args)  # records the plan
    before = fast_linear.replayed_calls()
    # rows 8 bytes apart: not 16-byte vectors
    wide = torch.zeros(x.shape[0], x.shape[1] + 4, device=DEV, dtype=torch.bfloat16)
    wide[:, :x.shape[1]] = x
    assert torch.equal(torch.ops.fp4.linear(wide[:, :x.shape[1]], *p.args), ref)
    # a bias in another dtype: refused by the Python path (the output, and so the bias, is in x's dtype)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        torch.ops.fp4.linear(x, wt, wst, gs, alpha, bias.float(), n, backend)
    # fp32 activations (their own key, never recorded)
    torch.ops.fp4.linear(x.float(), wt, wst, gs, alpha, bias.float(), n, backend)
    assert fast_linear.replayed_calls() == before
    # an input that needs a gradient: the Python path, whose output's backward raises
    out = torch.ops.fp4.linear(x.clone().requires_grad_(), *p.args)
    assert torch.equal(out.detach(), ref)
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()
    # bad operands of a recorded key: the Python path's errors
    with pytest.raises(TypeError, match="weight_scale"):
        torch.ops.fp4.linear(x, wt, wst.float(), gs, alpha, bias, n, backend)
    with pytest.raises(TypeError, match="alpha"):
        torch.ops.fp4.linear(x, wt, wst, gs, alpha.double(), bias, n, backend)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.fp4.linear(x, wt, wst, gs, alpha, bias[:-1], n, backend)
    assert fast_linear.replayed_calls() == before


@pytest.mark.gpu
def test_captured_calls_take_the_python_path(seed):
    """Inside a CUDA-graph capture the Python path runs (its graph-time kernel choices); replays match
    the eager result."""
    p = _problem("triton-w4a4", 64, 4096, 4096)
    eager = torch.ops.fp4.linear(p.x, *p.args)
    torch.ops.fp4.linear(p.x, *p.args)
    before = fast_linear.replayed_calls()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fp4.linear(p.x, *p.args)
    assert fast_linear.replayed_calls() == before
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# A fresh process (the fast path allocates its split-K tickets at its first replay that splits K): stream A's
# first replay, queued behind a GPU sleep, allocates them in memory left full of non-zero words; stream B's replay
# runs at once. Before their zeroing was waited for, B counted in the junk (relative error 0.49 on an H200, v49).
FIRST_USE_ON_TWO_STREAMS = r"""
import torch
from fp4_compile import format as F
from fp4_compile.ops import cuda_wgmma, fast_linear, hopper

n, k, m = 4096, 4096, 64
assert cuda_wgmma.launch_params(m, n, k, 0, torch.bfloat16).fixup_floats > 0, "not a split through memory"
w = torch.randn(n, k, device="cuda")
gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
pw, sw = F.quantize_nvfp4(w, gw)
wt, wst = hopper.MARLIN.prepare_weight(pw, sw)
alpha = (1 / gw).float()
xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
torch.ops.fp4.linear(xs[0], wt, wst, gw, alpha, None, n, "marlin")  # the Python path records the plan
torch.cuda.synchronize()
a, b = torch.cuda.Stream(), torch.cuda.Stream()
with torch.cuda.stream(a):
    junk = [torch.full((1 << 16,), 0x3F3F3F3F, dtype=torch.int32, device="cuda") for _ in range(24)]
torch.cuda.synchronize()
del junk
before = fast_linear.replayed_calls()
with torch.cuda.stream(a):
    torch.cuda._sleep(200_000_000)
    out_a = torch.ops.fp4.linear(xs[1], wt, wst, gw, alpha, None, n, "marlin")
with torch.cuda.stream(b):
    out_b = torch.ops.fp4.linear(xs[2], wt, wst, gw, alpha, None, n, "marlin")
torch.cuda.synchronize()
assert fast_linear.replayed_calls() == before + 2
wv = F.block_values(pw, sw).double()
for x, out in ((xs[1], out_a), (xs[2], out_b)):
    ref = x.double() @ wv.t() / gw.double()
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 6e-3, err
print("first use ok")
"""


@pytest.mark.gpu
def test_first_replays_on_two_streams_count_in_zeroed_tickets():
    _need_fast_path()
    done = subprocess.run([sys.executable, "-c", FIRST_USE_ON_TWO_STREAMS], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "first use ok" in done.stdout


@pytest.mark.gpu
def test_layers_run_on_the_fast_path_eager_and_compiled(seed):
    """A W4A4 layer run eagerly on a GPU calls the fused fp4::linear, and compiled with backend="fp4"
    Inductor's wrapper calls it eagerly: after the first call of the key the fast path runs both,
    with the same result, within the exact product's tolerance."""
    _need_fast_path()
    import fp4_compile
    from fp4_compile.layer import NVFP4Linear

    lin = torch.nn.Linear(1040, 1000, bias=True, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(5, 1040, device=DEV, dtype=torch.bfloat16)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    layer = NVFP4Linear.from_linear(lin, backend="triton-w4a4", input_global_scale=gx)
    compiled = torch.compile(layer, backend=fp4_compile.fp4_backend)
    with torch.no_grad():
        first = layer(x)
        before = fast_linear.replayed_calls()
        eager = layer(x)
        assert fast_linear.replayed_calls() == before + 1
        compiled(x)
        before = fast_linear.replayed_calls()
        again = compiled(x)
        assert fast_linear.replayed_calls() == before + 1
    assert torch.equal(first, eager) and torch.equal(eager, again)
    pw, sw = layer.linear_weight()
    ref = _reference("triton-w4a4", x, pw, sw, gx, layer.weight_global_scale, layer.bias)
    assert rel(eager, ref) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton-w4a4", "marlin"])
def test_eager_and_captured_large_m_calls_agree(seed, backend):
    """At M > 512 with few output tiles an eager call takes the wgmma kernel (replayed by the fast
    path) where a captured one takes dequantization + cuBLASLt: both within the exact product's
    tolerance, and within fp32 summation order of each other."""
    from fp4_compile.ops import cublaslt

    p = _problem(backend, 1024, 1024, 4096)
    if not cublaslt.available(torch.device(DEV)):
        pytest.skip("no cuBLASLt")
    eager = torch.ops.fp4.linear(p.x, *p.args)
    before = fast_linear.replayed_calls()
    assert torch.equal(torch.ops.fp4.linear(p.x, *p.args), eager)
    assert fast_linear.replayed_calls() == before + 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.fp4.linear(p.x, *p.args)
    graph.replay()
    torch.cuda.synchronize()
    ref = _reference(backend, p.x, p.pw, p.sw, p.gx, p.gw, None)
    assert rel(eager, ref) <= TOL[torch.bfloat16] and rel(captured, ref) <= TOL[torch.bfloat16]
    assert rel(eager, captured) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton-w4a4", "marlin"])
@pytest.mark.parametrize("m", [1, 12])
def test_linear_group_replays_the_grouped_launch_eagerly_and_under_capture(seed, backend, m):
    """fp4::linear_group of decode size: the first eager call (the Python path) launches the group once and
    records that; the second replays the launch from the extension (W4A4 on block values at M=1, codes at
    M=12), bit-equal to the first; captured in a CUDA graph, the Python path's grouped launch; all within the
    exact product's tolerance of the members' own linears and of the reference."""
    k = 4096
    problems = [_problem(backend, m, n, k) for n in (4096, 1024, 1024)]
    x = problems[0].x
    if backend == "triton-w4a4":  # one activation global scale for the group (as calibration gives)
        problems = [p._replace(args=(*p.args[:2], problems[0].gx, (1 / (problems[0].gx * p.gw)).float(), *p.args[4:]))
                    for p in problems]
    lists = [list(t) for t in zip(*(p.args[:-1] for p in problems))]
    args = (x, *lists, backend)
    first = torch.ops.fp4.linear_group(*args)  # records the group's plan
    before = fast_linear.replayed_calls()
    eager = torch.ops.fp4.linear_group(*args)
    assert fast_linear.replayed_calls() == before + 1, "the second call did not replay one grouped launch"
    for out, again, p in zip(eager, first, problems):
        assert torch.equal(out, again)
        assert rel(out, torch.ops.fp4.linear(x, *p.args)) <= 6e-3
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.fp4.linear_group(*args)
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.fp4.linear_group(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    for out, ref, p in zip(captured, eager, problems):
        assert out.shape == ref.shape and rel(out, ref) <= 6e-3
        assert rel(out, _reference(backend, x, p.pw, p.sw, p.args[2], p.gw, None)) <= 6e-3
    with pytest.raises(RuntimeError, match="linear_group has no backward"):
        torch.ops.fp4.linear_group(x.clone().requires_grad_(), *lists, backend)


@pytest.mark.gpu
def test_model_ops_have_the_cpp_autograd_kernel(seed):
    """The ops of a compiled layer (linear, linear_group, linear_silu_mul, rms_norm_quantize) take the
    extension's C++ Autograd kernel on CUDA tensors: the same results as below autograd; where an input
    needs a gradient, the list-taking ops raise at once and the others' outputs get a raising backward."""
    p = _problem("triton-w4a4", 64, 1000, 1040)
    x, (wt, wst, gs, alpha, _, n, backend) = p.x, p.args
    for name in ("linear", "linear_group", "linear_silu_mul", "rms_norm_quantize"):
        dump = torch._C._dispatch_dump(f"fp4::{name}")
        assert re.search(r"AutogradCUDA: registered at .*fast_linear\.cpp", dump), dump
    lists = ([wt] * 2, [wst] * 2, [gs] * 2, [alpha] * 2, [None] * 2)
    norm_w = torch.randn(x.shape[1], device=DEV).to(x.dtype)
    calls = {
        "linear": lambda a: torch.ops.fp4.linear(a, *p.args),
        "linear_group": lambda a: torch.ops.fp4.linear_group(a, *lists, [n] * 2, backend),
        "linear_silu_mul": lambda a: torch.ops.fp4.linear_silu_mul(a, *lists, n, backend),
        "rms_norm_quantize": lambda a: torch.ops.fp4.rms_norm_quantize(a, a, norm_w, 1e-5, gs),
    }
    for name, call in calls.items():
        with torch.no_grad():
            below = call(x)
        out = call(x)  # grad mode on, no input needs a gradient
        for a, b in zip(below if isinstance(below, (list, tuple)) else [below],
                        out if isinstance(out, (list, tuple)) else [out]):
            assert torch.equal(a, b) and not b.requires_grad, name
        if name in ("linear_group", "linear_silu_mul"):
            with pytest.raises(RuntimeError, match=f"{name} has no backward"):
                call(x.clone().requires_grad_())
        else:
            out = call(x.clone().requires_grad_())
            first = out[0] if isinstance(out, (list, tuple)) else out
            assert first.requires_grad and torch.equal(first.detach(), below[0] if name != "linear" else below)
            with pytest.raises(RuntimeError, match=f"{name} has no backward"):
                first.float().sum().backward()
