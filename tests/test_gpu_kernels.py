"""The Hopper Triton kernels on a CUDA GPU (sm_80+), against format.py at real sizes.

Odd shapes (N, K not multiples of 32/64), M = 1, 3, 17, 1000; bf16 and fp16 (and fp32 for
the exactness check); outputs poisoned with NaN first to prove every element is written.
"""

import json

import pytest
import torch

from fp4_compile import format as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - collection on CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from fp4_compile.ops import cuda_quant, cuda_small_m, cuda_wgmma, hopper, nvcc, pdl, split_tickets, tuned_wgmma_h100  # noqa: E402
from fp4_compile.ops import triton_gemm as G  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu, quantize_nvfp4_gpu  # noqa: E402

DEV = "cuda"
SHAPES = [(4096, 4096), (1000, 1040), (72, 208), (33, 48), (6144, 4096)]
MS = [1, 3, 17, 1000]
TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 6e-3}  # output rounding dominates


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def poison_allocator(nbytes):
    """Fill freed caching-allocator memory with NaN bytes so that torch.empty returns poison."""
    t = torch.full((nbytes // 4 + 1024,), float("nan"), device=DEV)
    del t


def make_weight(n, k):
    w = torch.randn(n, k, device=DEV)
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    pw, sw = F.quantize_nvfp4(w, gw)
    return pw, sw, gw


@pytest.fixture(params=["cuda", "triton"])
def quant_impl(request, monkeypatch):
    """Run a test through the CUDA quant kernel and again with it turned off (the Triton kernel)."""
    if request.param == "cuda":
        reason = cuda_quant.unavailable_reason(torch.cuda.current_device())
        if reason is not None:
            pytest.skip(reason)
    else:
        monkeypatch.setattr(cuda_quant, "use_cuda_quant", lambda *args: False)
    return request.param


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("swizzle", [False, True])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 208), (1000, 1040), (4096, 4096)])
def test_quant_kernel_bit_exact(seed, dt, swizzle, m, k, quant_impl):
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-4, 4, k, device=DEV)).to(dt)
    x[0, :16] = 0
    if m > 2:
        x[1, 7] = float("inf")
        x[2, -3] = float("nan")
    gs = F.global_scale_from_amax(x.float().abs().nan_to_num(0, 0, 0).amax()).reshape(1)
    poison_allocator(m * k * 4)
    q, s = quantize_nvfp4_gpu(x, gs, swizzle)
    qr, sr = F.quantize_nvfp4(x, gs, swizzle=swizzle)
    assert s.shape == sr.shape and s.dtype == torch.float8_e4m3fn
    assert torch.equal(s.view(torch.uint8), sr.view(torch.uint8))  # padding included
    finite = torch.isfinite(x.float().reshape(m, k // 16, 16)).all(-1).repeat_interleave(16, 1)
    c, cr = F.unpack_e2m1(q).long(), F.unpack_e2m1(qr).long()
    bad = (c != cr) & finite
    # a code may differ only at an exact rounding tie, by one step
    assert int(bad.sum()) <= max(1, m * k // 100000), f"{int(bad.sum())} codes differ"
    assert int(((c & 7) - (cr & 7)).abs()[bad].max().item() if bad.any() else 0) <= 1


def test_fake_quant_values_exact(seed, quant_impl):
    m, k = 333, 1040
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    gs = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    v = fake_quantize_nvfp4_gpu(x, gs, torch.bfloat16)
    ref = F.block_values(*F.quantize_nvfp4(x, gs))
    assert torch.equal(v.float(), ref)


def _refs(x, pw, sw, gx, gw):
    px, sx = F.quantize_nvfp4(x, gx)
    wv = F.block_values(pw, sw).double()
    ref44 = F.block_values(px, sx).double() @ wv.t() / (gx.double() * gw.double())
    return ref44, wv


@pytest.fixture(params=["cuda", "triton"])
def small_m_path(request, monkeypatch):
    """M <= 16 runs through the CUDA small-M kernel where it is built (sm_89/90), else Triton: test both."""
    if request.param == "triton":
        monkeypatch.setattr(hopper, "use_small_m", lambda *args: False)
        monkeypatch.setattr(hopper, "use_codes", lambda *args: False)
    return request.param


def _skip_duplicate(path, m, n, k):
    if path == "triton" and not (cuda_small_m.dispatches(m, n) or cuda_small_m.dispatches_codes(m, n)):
        pytest.skip("this call never takes the small-M kernel: covered by the 'cuda' case")


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
def test_w4a4_and_w4a16_linear(seed, n, k, m, dt, small_m_path):
    _skip_duplicate(small_m_path, m, n, k)
    pw, sw, gw = make_weight(n, k)
    x = torch.randn(m, k, device=DEV).to(dt)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    alpha = (1 / (gx * gw)).float()
    bias = torch.randn(n, device=DEV).to(dt)
    ref44, wv = _refs(x, pw, sw, gx, gw)
    for kern in (TRITON_W4A4, MARLIN):
        wt, wst = kern.prepare_weight(pw, sw)
        poison_allocator(m * n * 8 + (1 << 22))
        if kern is TRITON_W4A4:
            out = kern.linear(x, wt, wst, gx, alpha, bias, n)
            ref = ref44 + bias.double()
        else:
            out = kern.linear(x, wt, wst, None, (1 / gw).float(), bias, n)
            xa = x if dt != torch.float32 else x.to(torch.bfloat16)
            ref = xa.double() @ wv.t() / gw.double() + bias.double()
        assert out.shape == (m, n) and out.dtype == dt
        assert torch.isfinite(out).all(), f"{kern.name}: unwritten or non-finite outputs"
        assert rel(out, ref) <= TOL[dt], (kern.name, rel(out, ref))


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 1040), (33, 48), (28672, 256)])
@pytest.mark.parametrize("m", [8, 16])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
def test_w4a4_linear_at_m_8_to_16(seed, n, k, m, dt):
    """The W4A4 linear where it quantizes the activations to codes for the small-M kernel (M = 8, and
    M = 16 up to N = 8192; else Triton): against the float64 reference, bias included, on a
    [2, M/2, K] input (leading dimensions kept)."""
    pw, sw, gw = make_weight(n, k)
    x = torch.randn(2, m // 2, k, device=DEV).to(dt)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    bias = torch.randn(n, device=DEV).to(dt)
    ref44, _ = _refs(x.reshape(m, k), pw, sw, gx, gw)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    assert hopper.use_codes(x.reshape(m, k), m, n) == (cuda_small_m.dispatches_codes(m, n) and all(
        mod.unavailable_reason(torch.cuda.current_device()) is None for mod in (cuda_small_m, cuda_quant)))
    poison_allocator(m * n * 8 + (1 << 22))
    out = TRITON_W4A4.linear(x, wt, wst, gx, (1 / (gx * gw)).float(), bias, n)
    assert out.shape == (2, m // 2, n) and out.dtype == dt and torch.isfinite(out).all()
    assert rel(out.reshape(m, n), ref44 + bias.double()) <= TOL[dt]


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 1040), (72, 208)])
@pytest.mark.parametrize("m", MS)
def test_mm_on_quantized_operands(seed, n, k, m, small_m_path):
    _skip_duplicate(small_m_path, m, n, k)
    pw, sw, gw = make_weight(n, k)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    ref44, _ = _refs(x, pw, sw, gx, gw)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    q, s = quantize_nvfp4_gpu(x, gx)
    kp = wt.shape[1] * 2
    q = F.pad_activation_for_alignment(q, kp)
    s = torch.nn.functional.pad(s.view(torch.uint8), (0, kp // 16 - s.shape[1])).view(torch.float8_e4m3fn)
    out = TRITON_W4A4.mm(q, s, wt, wst, (1 / (gx * gw)).float(), torch.float32)
    assert out.shape == (m, wt.shape[0])
    assert rel(out[:, :n], ref44) <= 1e-5
    assert (out[:, n:] == 0).all()


def test_small_m_kernel_is_built_on_hopper():
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0) or nvcc.nvcc_path() is None:
        pytest.skip(f"the CUDA small-M kernel is built for sm_90 with nvcc (sm_{cap[0]}{cap[1]})")
    assert cuda_small_m.unavailable_reason(torch.cuda.current_device()) is None


def _cuda_gemm_case(n, k, m, dt):
    """Operands of a CUDA GEMM kernel test: activations [m, k] in dt (scaled so that fp16 outputs
    cannot overflow), the weight in the Hopper layout, alpha, a bias, and the float64 product."""
    pw, sw, gw = make_weight(n, k)
    wt, wst = MARLIN.prepare_weight(pw, sw)
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 1, k, device=DEV)).to(dt)
    bias = torch.randn(n, device=DEV).to(dt)
    ref = x.double() @ F.block_values(pw, sw).double().t() / gw.double()
    return x, wt, wst, (1 / gw).float(), bias, ref


@pytest.mark.parametrize("ns,k", [((4096, 1024, 1024), 4096), ((14336, 14336), 4096), ((72, 33, 1000, 40), 208)])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_small_m_kernel_group_exact(seed, ns, k, m, dt):
    """One grouped launch of several weights on the same activations: each member equal to the float64
    product up to fp32 summation order (fp32 out) and bit-equal to its own launch at the same warps;
    with biases and 16-bit outputs within output rounding. Outputs poisoned first."""
    if cuda_small_m.unavailable_reason(torch.cuda.current_device()) is not None:
        pytest.skip(cuda_small_m.unavailable_reason(torch.cuda.current_device()))
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 1, k, device=DEV)).to(dt)
    members, refs = [], []
    for n in ns:
        pw, sw, gw = make_weight(n, k)
        wt, wst = MARLIN.prepare_weight(pw, sw)
        members.append((wt, wst, (1 / gw).float(), n, torch.randn(n, device=DEV).to(dt)))
        refs.append(x.double() @ F.block_values(pw, sw).double().t() / gw.double())
    warps = cuda_small_m.group_warps(m, list(ns), k, torch.cuda.current_device(), codes=False)
    poison_allocator(m * sum(ns) * 8 + (1 << 22))
    outs = cuda_small_m.small_m_gemm_group([x] * len(ns), [(*mb[:4], None) for mb in members],
                                           out_dtype=torch.float32)
    biased = cuda_small_m.small_m_gemm_group([x] * len(ns), members, out_dtype=dt)
    for out, out_b, (wt, wst, alpha, n, bias), ref in zip(outs, biased, members, refs):
        assert out.shape == (m, n) and torch.isfinite(out).all()
        assert rel(out, ref) <= 1e-5
        assert torch.equal(out, cuda_small_m.small_m_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, warps=warps))
        assert out_b.dtype == dt and torch.isfinite(out_b).all() and rel(out_b, ref + bias.double()) <= TOL[dt]


@pytest.mark.parametrize("ns,k", [((14336, 14336), 4096), ((72, 33, 1000, 40), 208)])
@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("warps", [1, 2, 4, 8])
def test_small_m_kernel_group_at_any_warps(seed, ns, k, m, warps):
    """The grouped launch at a warps override (bench_group's variants): each member within fp32 summation order
    of the float64 product and bit-equal to its own launch at the same warps; two members of one N also gated,
    within 1e-5 of silu(gate) * up. Outputs poisoned first."""
    if cuda_small_m.unavailable_reason(torch.cuda.current_device()) is not None:
        pytest.skip(cuda_small_m.unavailable_reason(torch.cuda.current_device()))
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 1, k, device=DEV) / 16).to(torch.bfloat16)
    members, refs = [], []
    for n in ns:
        pw, sw, gw = make_weight(n, k)
        wt, wst = MARLIN.prepare_weight(pw, sw)
        members.append((wt, wst, (1 / gw).float(), n, None))
        refs.append(x.double() @ F.block_values(pw, sw).double().t() / gw.double())
    poison_allocator(m * sum(ns) * 8 + (1 << 22))
    outs = cuda_small_m.small_m_gemm_group([x] * len(ns), members, out_dtype=torch.float32, warps=warps)
    for out, (wt, wst, alpha, n, _), ref in zip(outs, members, refs):
        assert out.shape == (m, n) and torch.isfinite(out).all() and rel(out, ref) <= 1e-5
        assert torch.equal(out, cuda_small_m.small_m_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, warps=warps))
    if len(ns) == 2 and ns[0] == ns[1]:
        (gated,) = cuda_small_m.small_m_gemm_group([x] * 2, members, out_dtype=torch.float32, gated=True, warps=warps)
        assert rel(gated, torch.nn.functional.silu(refs[0]) * refs[1]) <= 1e-5


@pytest.mark.parametrize("ns,k", [((4096, 1024, 1024), 4096), ((14336, 14336), 4096), ((72, 33, 1000, 40), 208)])
@pytest.mark.parametrize("m", [8, 9, 16])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_small_m_kernel_group_on_codes_exact(seed, ns, k, m, dt):
    """W4A4 group on activation codes (one quantization for all members): each member bit-equal to its
    own launch on the codes at the same warps and within fp32 summation order of the float64 W4A4
    product; with biases and 16-bit outputs within output rounding. Outputs poisoned first."""
    for module in (cuda_small_m, cuda_quant):
        if module.unavailable_reason(torch.cuda.current_device()) is not None:
            pytest.skip(module.unavailable_reason(torch.cuda.current_device()))
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 1, k, device=DEV)).to(dt)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    codes, scales = cuda_quant.quantize(x, gx, cuda_quant.MODE_KERNEL_CODES)
    xq = F.block_values(*F.quantize_nvfp4(x, gx)).double()
    members, refs = [], []
    for n in ns:
        pw, sw, gw = make_weight(n, k)
        wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
        alpha = (1 / (gx * gw)).float()
        members.append((wt, wst, alpha, n, torch.randn(n, device=DEV).to(dt)))
        refs.append(xq @ F.block_values(pw, sw).double().t() * alpha.double())
    warps = cuda_small_m.group_warps(m, list(ns), k, torch.cuda.current_device(), codes=True)
    poison_allocator(m * sum(ns) * 8 + (1 << 22))
    group = dict(x_scales=[scales] * len(ns), k=k)
    outs = cuda_small_m.small_m_gemm_group([codes] * len(ns), [(*mb[:4], None) for mb in members],
                                           out_dtype=torch.float32, **group)
    biased = cuda_small_m.small_m_gemm_group([codes] * len(ns), members, out_dtype=dt, **group)
    for out, out_b, (wt, wst, alpha, n, bias), ref in zip(outs, biased, members, refs):
        assert out.shape == (m, n) and torch.isfinite(out).all()
        assert rel(out, ref) <= 1e-5
        own = cuda_small_m.small_m_gemm(codes, wt, wst, alpha, n=n, out_dtype=torch.float32, x_scale=scales, k=k,
                                        warps=warps)
        assert torch.equal(out, own)
        assert out_b.dtype == dt and torch.isfinite(out_b).all() and rel(out_b, ref + bias.double()) <= TOL[dt]


@pytest.mark.parametrize("n,k", [(14336, 4096), (1000, 208), (40, 64)])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codes", [False, True])
def test_small_m_kernel_gated_exact(seed, n, k, m, dt, codes):
    """silu(x Wg^T) * (x Wu^T) in one launch (``gated``), on activations (W4A16) or W4A4 codes: fp32 output
    within fp32 summation order of the float64 product; 16-bit outputs (with biases) equal to
    ``F.silu(gate) * up`` of the same group's ungated outputs but for the SiLU's last bit. Poisoned first."""
    for module in (cuda_small_m, cuda_quant):
        if module.unavailable_reason(torch.cuda.current_device()) is not None:
            pytest.skip(module.unavailable_reason(torch.cuda.current_device()))
    # (scaled so that silu(gate) * up stays inside fp16's range at K = 4096)
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 1, k, device=DEV) / 16).to(dt)
    if codes:
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        xk, xs = cuda_quant.quantize(x, gx, cuda_quant.MODE_KERNEL_CODES)
        xq, group = F.block_values(*F.quantize_nvfp4(x, gx)).double(), dict(x_scales=[xs] * 2, k=k)
    else:
        gx, xk, xq, group = torch.ones(1, device=DEV), x, x.double(), {}
    members, refs = [], []
    for _ in range(2):
        pw, sw, gw = make_weight(n, k)
        wt, wst = (TRITON_W4A4 if codes else MARLIN).prepare_weight(pw, sw)
        alpha = (1 / (gx * gw)).float()
        members.append((wt, wst, alpha, n, torch.randn(n, device=DEV).to(dt)))
        refs.append(xq @ F.block_values(pw, sw).double().t() * alpha.double())
    poison_allocator(m * n * 16 + (1 << 22))
    (out,) = cuda_small_m.small_m_gemm_group([xk] * 2, [(*mb[:4], None) for mb in members], out_dtype=torch.float32,
                                             gated=True, **group)
    assert out.shape == (m, n) and torch.isfinite(out).all()
    assert rel(out, torch.nn.functional.silu(refs[0]) * refs[1]) <= 1e-5
    (out_b,) = cuda_small_m.small_m_gemm_group([xk] * 2, members, out_dtype=dt, gated=True, **group)
    gate, up = cuda_small_m.small_m_gemm_group([xk] * 2, members, out_dtype=dt, **group)
    expected = torch.nn.functional.silu(gate) * up
    assert torch.isfinite(expected).all() and out_b.dtype == dt and torch.isfinite(out_b).all()
    assert rel(out_b, expected) <= TOL[dt] and (out_b != expected).float().mean() <= 1e-3


@pytest.mark.parametrize("backend", [MARLIN, TRITON_W4A4])
@pytest.mark.parametrize("m", [1, 5, 8, 12, 16])
def test_linear_group_equals_linears(seed, backend, m):
    """The backends' linear_group (one launch where the backend groups: on activation values, or for W4A4
    on codes from CODES_MIN_M rows; else None) against each member's own linear: within the exact
    product's tolerance."""
    k, ns = 4096, (4096, 1024, 1024)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    members = []
    for i, n in enumerate(ns):
        pw, sw, gw = make_weight(n, k)
        wt, wst = backend.prepare_weight(pw, sw)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1) * (1 + i)
        members.append((wt, wst, gx, (1 / (gx * gw)).float() if backend is TRITON_W4A4 else (1 / gw).float(),
                        torch.randn(n, device=DEV, dtype=torch.bfloat16) if i != 1 else None, n))
    outs = backend.linear_group(x, members)
    # q/k/v-sized: one launch at every M up to 16 (on codes for W4A4 from CODES_MIN_M)
    grouped = m <= cuda_small_m.MAX_M and sum(ns) <= cuda_small_m.VALUES_GROUP_MAX_ROWS
    runs = [module.unavailable_reason(torch.cuda.current_device()) is None for module in (cuda_small_m, cuda_quant)]
    assert (outs is not None) == (grouped and all(runs))
    if outs is None:
        return
    for out, member in zip(outs, members):
        own = backend.linear(x, *member)
        assert out.shape == own.shape and rel(out, own) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 1040), (72, 208), (33, 48), (1024, 14336)])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_small_m_kernel_exact(seed, n, k, m, dt):
    """fp32 output: equal to the float64 product up to fp32 summation order, every launch variant;
    16-bit output with bias: within output rounding. Outputs poisoned first."""
    if cuda_small_m.unavailable_reason(torch.cuda.current_device()) is not None:
        pytest.skip(cuda_small_m.unavailable_reason(torch.cuda.current_device()))
    x, wt, wst, alpha, bias, ref = _cuda_gemm_case(n, k, m, dt)
    deep = 4 if m <= 8 else 2  # (4 stages exist for one n-tile only)
    for rows_per_warp, stages, warps, prefetch in [(16, 2, 8, 0), (32, deep, 8, 0), (16, deep, 3, 0),
                                                   (32, 2, 1, 0), (16, 2, 4, 256)]:
        poison_allocator(m * n * 8 + (1 << 22))
        out = cuda_small_m.small_m_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32,
                                        rows_per_warp=rows_per_warp, stages=stages, warps=warps, prefetch=prefetch)
        assert out.shape == (m, n) and torch.isfinite(out).all()
        assert rel(out, ref) <= 1e-5, (rows_per_warp, stages, warps, prefetch, rel(out, ref))
    out = cuda_small_m.small_m_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias)
    assert out.dtype == dt and torch.isfinite(out).all()
    assert rel(out, ref + bias.double()) <= TOL[dt]


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 1040), (72, 208), (33, 48), (1024, 14336)])
@pytest.mark.parametrize("m", [1, 2, 8, 9, 16])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
def test_small_m_kernel_on_activation_codes(seed, n, k, m, dt):
    """W4A4 with the activations as codes (cuda_quant MODE_KERNEL_CODES, K = 48 and 1040: a half chunk
    of padding): equal to the kernel on the activations' block values (the same products scaled by
    2^-8; bit-equal with two n-tiles, where both sum in the same order; with one, the block-value
    kernel sums two accumulator chains, so within fp32 summation order), fp32 output within summation
    order of the float64 W4A4 product, 16-bit output with bias within its rounding. Outputs poisoned first."""
    for module in (cuda_small_m, cuda_quant):
        if module.unavailable_reason(torch.cuda.current_device()) is not None:
            pytest.skip(module.unavailable_reason(torch.cuda.current_device()))
    pw, sw, gw = make_weight(n, k)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 1, k, device=DEV)).to(dt)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    alpha = (1 / (gx * gw)).float()
    ref = F.block_values(*F.quantize_nvfp4(x, gx)).double() @ F.block_values(pw, sw).double().t() * alpha.double()
    out_dtype = torch.bfloat16 if dt == torch.float32 else dt
    codes, scales = cuda_quant.quantize(x, gx, cuda_quant.MODE_KERNEL_CODES)
    values = fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16)  # the operand type of a float32 output
    for warps in (8, 3):
        poison_allocator(m * n * 8 + (1 << 22))
        out = cuda_small_m.small_m_gemm(codes, wt, wst, alpha, n=n, out_dtype=torch.float32, x_scale=scales, k=k,
                                        warps=warps)
        assert out.shape == (m, n) and torch.isfinite(out).all()
        assert rel(out, ref) <= 1e-5, (warps, rel(out, ref))
        on_values = cuda_small_m.small_m_gemm(values, wt, wst, alpha, n=n, out_dtype=torch.float32, warps=warps)
        if m > 8:
            assert torch.equal(out, on_values)
        else:
            assert rel(out, on_values) <= 1e-6, (warps, rel(out, on_values))
    bias = torch.randn(n, device=DEV).to(out_dtype)
    out = cuda_small_m.small_m_gemm(codes, wt, wst, alpha, n=n, out_dtype=out_dtype, bias=bias, x_scale=scales, k=k)
    assert out.dtype == out_dtype and torch.isfinite(out).all()
    assert rel(out, ref + bias.double()) <= TOL[out_dtype]


@pytest.mark.parametrize("n,k,m", [(4096, 4096, 1), (1000, 1040, 7), (6144, 4096, 16), (4096, 4096, 64),
                                   (2048, 4096, 200)])
def test_programmatic_dependent_launch(seed, n, k, m, monkeypatch):
    """Both linears with PDL (ops/pdl.py) on each GEMM they dispatch to (small-M, Triton, wgmma):
    W4A4's quantization kernel lets the GEMM launch at once, and every PDL kernel waits for the
    kernel before it. Fresh activations on every replay of a graph in which each call follows a
    GEMM that reads the previous activations: reading anything early would show as a wrong result."""
    pw, sw, gw = make_weight(n, k)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    x = torch.randn(m, k, device=DEV)
    x16 = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    gx = torch.ones(1, device=DEV)
    alpha = (1 / gw).float()

    def calls():
        return [TRITON_W4A4.linear(x, wt, wst, gx, alpha, None, n), MARLIN.linear(x16, wt, wst, None, alpha, None, n)]

    def capture():
        calls()  # compile outside capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = [calls() for _ in range(3)]
        return g, outs

    monkeypatch.setenv("FP4C_PDL", "0")
    plain = capture()
    monkeypatch.setenv("FP4C_PDL", "1")
    assert pdl.use_pdl(x.device) == (torch.cuda.get_device_capability() >= (9, 0))
    with_pdl = capture()
    wv = F.block_values(pw, sw).double()
    for _ in range(5):
        x.copy_(torch.randn_like(x) * 10)
        x16.copy_(torch.randn_like(x16))
        gx.copy_(F.global_scale_from_amax(x.abs().amax()).reshape(1))
        for g, _ in (plain, with_pdl):
            g.replay()
        torch.cuda.synchronize()
        ref44 = fake_quantize_nvfp4_gpu(x, gx, torch.float32).double() @ wv.t() / gw.double()
        ref16 = x16.double() @ wv.t() / gw.double()
        for out44, out16 in plain[1] + with_pdl[1]:
            assert rel(out44, ref44) <= 1e-5
            assert rel(out16, ref16) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("n,k,m,trials", [(28672, 4096, 1, 6), (4096, 14336, 1, 4), (4096, 4096, 16, 3),
                                          (6144, 4096, 8, 3), (4096, 14336, 64, 3)])
def test_first_call_on_fresh_weights(seed, n, k, m, trials):
    """The first linear on weights just written (into memory freed by the previous weights) equals
    the same call after a sync. Guards the rule that a PDL kernel touches no global memory before
    griddepcontrol.wait, not even by an L2 prefetch of its weights (a build that prefetched the small-M
    kernel's weight rows into L2 first read stale bytes at 28672x4096, M=1: W4A4, in 11 of 12 trials on
    an H100; benchmarks/NOTES.md v17a), unless the kernel before is our quantization kernel, which lets
    it launch only once the kernels before it (here the ones that wrote the weights) have completed:
    the W4A4 small-M GEMM's first weight loads (cuda_small_m.dependent_launch_mode)."""
    for _ in range(trials):
        pw, sw, gw = make_weight(n, k)
        wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
        del pw, sw
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        alpha4, alpha16 = (1 / (gx * gw)).float(), (1 / gw).float()
        runs = []
        for _ in range(2):  # the first call, then the same after a sync
            runs.append((TRITON_W4A4.linear(x, wt, wst, gx, alpha4, None, n),
                         MARLIN.linear(x, wt, wst, None, alpha16, None, n)))
            torch.cuda.synchronize()
        for a, b in zip(*runs):
            assert torch.equal(a, b), f"first call differs: rel {rel(a, b):.3g}"
        del wt, wst  # the next weights take this memory


def test_wgmma_kernel_is_built_on_hopper():
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0) or nvcc.nvcc_path() is None:
        pytest.skip(f"the CUDA wgmma kernel is built for sm_90a with nvcc (sm_{cap[0]}{cap[1]})")
    assert cuda_wgmma.unavailable_reason(torch.cuda.current_device()) is None


def _tickets_are_zero() -> bool:
    """The split-K tickets of the device are all back at zero (after a synchronize)."""
    torch.cuda.synchronize()
    return all(int(t.ring.abs().sum()) == 0 and int(t.captured.abs().sum()) == 0
               for t in split_tickets._buffers.values())


def _need_wgmma():
    reason = cuda_wgmma.unavailable_reason(torch.cuda.current_device())
    if reason is not None:
        pytest.skip(reason)


# N not a multiple of 32, K below the padded K (zero-filled tail), K over many stages
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 1008), (72, 192), (33, 64), (1024, 14336)])
@pytest.mark.parametrize("m", [17, 64, 100, 1000])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_wgmma_kernel_exact(seed, n, k, m, dt):
    """fp32 output: equal to the float64 product up to fp32 summation order, for every tile, with
    and without split K; 16-bit output with bias: within output rounding. Outputs poisoned first."""
    _need_wgmma()
    x, wt, wst, alpha, bias, ref = _cuda_gemm_case(n, k, m, dt)
    # splits in a cluster and through global memory; the largest leaves some splits empty where K is short
    variants = [(1, False), (3, False), (cuda_wgmma.MAX_SPLITS, False), (3, True), (5, True), (6, True),
                (7, True)]
    for tile in cuda_wgmma.TILES:
        for splits, workspace in variants:
            poison_allocator(m * n * 8 + (1 << 22))
            out = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, tile=tile, splits=splits,
                                        workspace=workspace)
            assert out.shape == (m, n) and torch.isfinite(out).all(), (tile, splits, workspace)
            assert rel(out, ref) <= 1e-5, (tile, splits, workspace, rel(out, ref))
    for splits, workspace in [(1, False), (2, False), (2, True)]:
        poison_allocator(m * n * 8 + (1 << 22))
        out = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias, splits=splits,
                                    workspace=workspace)
        assert out.dtype == dt and torch.isfinite(out).all()
        assert rel(out, ref + bias.double()) <= TOL[dt]
    assert _tickets_are_zero()


def test_wgmma_scales_not_16_byte_aligned(seed):
    """Scales whose base is not 16-byte aligned (4 is enough for its 4-byte copies) cannot be read by TMA: the
    producer copies each row's 4 scale bytes of a stage from the tiled layout instead. Bit-equal to the TMA
    path (the same bytes land in shared memory), for splits in a cluster, through memory and persistent."""
    _need_wgmma()
    n, k, m = 1000, 1040, 96
    x, wt, wst, alpha, _, ref = _cuda_gemm_case(n, k, m, torch.bfloat16)
    buffer = torch.zeros(wst.numel() + 16, dtype=torch.uint8, device=DEV)
    shifted = buffer[4:4 + wst.numel()].view(wst.shape)
    shifted.copy_(wst.view(torch.uint8))
    assert shifted.data_ptr() % 16 == 4
    for tile, splits, workspace in [((64, 1), 1, False), ((32, 2), 3, False), ((128, 1), 2, True)]:
        out = cuda_wgmma.wgmma_gemm(x, wt, shifted, alpha, n=n, out_dtype=torch.float32, tile=tile, splits=splits,
                                    workspace=workspace)
        aligned = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, tile=tile, splits=splits,
                                        workspace=workspace)
        assert torch.equal(out, aligned), (tile, splits, workspace)
        assert rel(out, ref) <= 1e-5
    big = torch.randn(1000, k, device=DEV, dtype=torch.bfloat16)  # 16-bit output, more tiles than SMs: persistent
    persistent = dict(n=n, out_dtype=torch.bfloat16, tile=(32, 1), splits=1)
    assert torch.equal(cuda_wgmma.wgmma_gemm(big, wt, shifted, alpha, **persistent),
                       cuda_wgmma.wgmma_gemm(big, wt, wst, alpha, **persistent))
    assert _tickets_are_zero()


def test_wgmma_refuses_weight_views_it_would_misread(seed):
    """A wrong scale view (sliced, transposed, misaligned by 2 bytes) or a misaligned weight raises a ValueError
    naming the problem before a launch, and the context stays usable."""
    _need_wgmma()
    n, k, m = 1000, 1040, 96
    x, wt, wst, alpha, _, ref = _cuda_gemm_case(n, k, m, torch.bfloat16)
    scales = wst.view(torch.uint8)
    shifted = torch.zeros(scales.numel() + 16, dtype=torch.uint8, device=DEV)[2:2 + scales.numel()].view(scales.shape)
    misaligned = torch.zeros(wt.numel() + 16, dtype=torch.uint8, device=DEV)[8:8 + wt.numel()].view(wt.shape)
    for weight, weight_scale, match in [(wt, scales[:, :-16], "weight_scale must be contiguous"),
                                        (wt, scales.t().contiguous().t(), "weight_scale must be contiguous"),
                                        (wt, shifted, "4-byte aligned"), (misaligned, scales, "16-byte aligned")]:
        with pytest.raises(ValueError, match=match):
            cuda_wgmma.wgmma_gemm(x, weight, weight_scale, alpha, n=n, out_dtype=torch.float32)
    assert rel(cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32), ref) <= 1e-5


def _tuned_cases() -> list[tuple[int, int, int]]:
    """(N, K, M) of each shape's first override in the H100 table, M just below its grid value, among the M
    where the table decides (the cost model's split count on an H100 is one its sweeps timed)."""
    table, cases = tuned_wgmma_h100, []
    for (n, k), picks in table.PICKS.items():
        ms = [table.M_GRID[i] - (1 if i else 0) for i, label in enumerate(picks) if label is not None]
        m = next((m for m in ms
                  if cuda_wgmma.launch_config(m, n, k, table.SMS, table.CLUSTER_CTAS).splits in table.SPLITS), None)
        if m is not None:
            cases.append((n, k, m))
    return cases


def test_tune_writes_a_table_the_launches_then_follow(seed, monkeypatch, tmp_path, capsys):
    """``fp4c tune`` on the GPU: it times the launch configurations of a small shape, writes this device's
    table, and the kernel's later launches take the table's picks, exact."""
    _need_wgmma()
    from fp4_compile import cli
    from fp4_compile.ops import wgmma_tables

    path = tmp_path / "table.json"
    monkeypatch.setenv("FP4C_WGMMA_TABLE", str(path))
    n, k = 1024, 4096
    try:
        code = cli.main(["tune", "--shapes", f"{n}x{k}", "--ms", "17,64", "--modes", "w4a16", "--rounds", "1",
                         "--sweep-json", str(tmp_path / "sweep.json"), "-q"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"wrote {path} (1 layer shapes)" in out
        meta, picks = wgmma_tables.read_table(path)
        assert meta["gpu"] == torch.cuda.get_device_name(0) and list(picks) == [(n, k)]
        assert picks[(n, k)].m_grid == (17, 64)
        assert len(json.loads((tmp_path / "sweep.json").read_text())["cells"]) == 2
        for m in (17, 40, 64):
            label = picks[(n, k)].at(m)
            cfg = cuda_wgmma.device_launch_config(m, n, k, 0)
            assert label is None or cfg.label == label
            if label is None:  # the table keeps the cost model's pick, over the built-in table's
                assert cfg == cuda_wgmma.launch_config(m, n, k, cuda_wgmma.num_sms(0), cuda_wgmma.cluster_ctas(0))
        pw, sw, gw = make_weight(n, k)
        wt, wst = MARLIN.prepare_weight(pw, sw)
        x = torch.randn(40, k, device=DEV, dtype=torch.bfloat16)
        out = cuda_wgmma.wgmma_gemm(x, wt, wst, (1 / gw).float(), n=n, out_dtype=torch.float32)
        assert rel(out, x.double() @ F.block_values(pw, sw).double().t() / gw.double()) <= 1e-5
    finally:
        cuda_wgmma.forget_measured_tables()  # later tests read no table of this test's


@pytest.mark.parametrize("n,k,m", _tuned_cases())
def test_wgmma_tuned_configurations(seed, n, k, m):
    """The launches the H100 table picks (``tuned_wgmma_h100``), on that device: the kernel within the fp32
    summation order of the float64 product, and W4A4 through the backend (quantization kernel, then the
    kernel on its block values) within that of the product of the exact block values."""
    _need_wgmma()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = cuda_wgmma.tuned_launch_config(m, n, k, sms, torch.cuda.get_device_capability(),
                                           cuda_wgmma.cluster_ctas(0))
    if table is None:
        pytest.skip("the table has no say here: not a device like the H100 it was measured on, or the cost model "
                    "picks a split count its sweeps did not time")
    assert cuda_wgmma.device_launch_config(m, n, k, 0) == table
    pw, sw, gw = make_weight(n, k)
    wt, wst = MARLIN.prepare_weight(pw, sw)
    wv = F.block_values(pw, sw).double()
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 1, k, device=DEV)).to(torch.bfloat16)
    out = cuda_wgmma.wgmma_gemm(x, wt, wst, (1 / gw).float(), n=n, out_dtype=torch.float32)
    assert rel(out, x.double() @ wv.t() / gw.double()) <= 1e-5
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    out44 = TRITON_W4A4.linear(x.float(), wt, wst, gx, (1 / (gx * gw)).float(), None, n)
    ref44 = fake_quantize_nvfp4_gpu(x.float(), gx, torch.float32).double() @ wv.t() / (gx * gw).double()
    assert rel(out44, ref44) <= 1e-5


@pytest.mark.parametrize("n,k,m", [(8192, 256, 1000), (8200, 320, 777)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_wgmma_persistent_kernel(seed, n, k, m, dt):
    """More unsplit tiles than SMs with a 16-bit output: the persistent kernel (one CTA per SM looping
    over the tiles). Every tile size, bias, N with a scalar tail, poisoned outputs, graph replay."""
    _need_wgmma()
    x, wt, wst, alpha, bias, ref = _cuda_gemm_case(n, k, m, dt)
    for tile in cuda_wgmma.TILES:
        tiles = -(-m // tile[0]) * -(-n // (128 * tile[1]))
        assert tiles > torch.cuda.get_device_properties(0).multi_processor_count
        poison_allocator(m * n * 8 + (1 << 22))
        out = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias, tile=tile, splits=1)
        assert out.dtype == dt and torch.isfinite(out).all(), tile
        assert rel(out, ref + bias.double()) <= TOL[dt], (tile, rel(out, ref + bias.double()))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias, tile=(64, 1), splits=1)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    expect = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, tile=(64, 1), splits=2,
                                   workspace=True) + bias.float()
    assert rel(out, expect) <= TOL[dt]


# tail_plan on 132 SMs: 192 tiles -> 60 split 2 ways; 140 -> 8 split 4 ways; 172 -> 40 split 3 ways
@pytest.mark.parametrize("n,k,m,tile", [(6144, 4096, 1024, (256, 1)), (8960 - 37, 2544, 64, (32, 1)),
                                        (11008 - 5, 2048, 50, (32, 1))])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_wgmma_split_tail(seed, n, k, m, tile, dt):
    """A persistent launch whose last wave of tiles is split along K (cuda_wgmma.tail_plan): the
    slices' fp32 sums meet in the tile's last slice. Within output rounding of the float64 product,
    bias, poisoned outputs and fixup buffer, graph replay; the same as the unsplit tail's output but
    for fp32 summation order."""
    _need_wgmma()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tail, splits = cuda_wgmma.tail_plan(cuda_wgmma._tiles(m, n, *tile), sms, k)
    if tail == 0:
        pytest.skip(f"no split tail with {sms} SMs")
    x, wt, wst, alpha, bias, ref = _cuda_gemm_case(n, k, m, dt)
    poison_allocator(m * n * 8 + (1 << 24))
    out = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias, tile=tile, splits=1)
    assert out.dtype == dt and torch.isfinite(out).all()
    assert rel(out, ref + bias.double()) <= TOL[dt], rel(out, ref + bias.double())
    whole = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias, tile=tile, splits=1,
                                  split_tail=False)
    assert rel(out, whole) <= TOL[dt] / 4
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        replayed = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias, tile=tile, splits=1)
    for _ in range(2):  # the tickets are zero again after every replay
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        expect = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, tile=tile, splits=2,
                                       workspace=True) + bias.float()
        assert rel(replayed, expect) <= TOL[dt]
    assert _tickets_are_zero()


def test_wgmma_kernel_graph_replay(seed):
    _need_wgmma()
    n, k, m = 4096, 4096, 64
    pw, sw, gw = make_weight(n, k)
    wt, wst = MARLIN.prepare_weight(pw, sw)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    alpha = (1 / gw).float()
    wv = F.block_values(pw, sw).double()
    for splits, workspace in [(1, False), (4, False), (4, True)]:
        cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, splits=splits,
                              workspace=workspace)  # build first
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, splits=splits,
                                        workspace=workspace)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            g.replay()
            torch.cuda.synchronize()
            assert rel(out, x.double() @ wv.t() / gw.double()) <= 1e-5
            # a fixed summation order: the eager call gives the same bits
            again = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=torch.float32, splits=splits,
                                          workspace=workspace)
            assert torch.equal(out, again), (splits, workspace)
        assert _tickets_are_zero()


@pytest.mark.parametrize("m", [1, 12, 64])
def test_activations_not_16_byte_aligned(seed, m):
    """Activations whose rows start 8 bytes past a 16-byte boundary, as slices of wider tensors do: one row
    (contiguous, which ``contiguous()`` kept as it was: the quantization kernel faulted, NOTES.md v49) and rows
    of a contiguous view at an odd offset. Every path copies them aligned first."""
    n, k = 1000, 1040
    pw, sw, gw = make_weight(n, k)
    flat = torch.randn(m * k + 8, device=DEV, dtype=torch.bfloat16)
    x = flat[4:4 + m * k].view(m, k)
    assert x.is_contiguous() and x.data_ptr() % 16 == 8
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    ref44, wv = _refs(x, pw, sw, gx, gw)
    for kern in (TRITON_W4A4, MARLIN):
        wt, wst = kern.prepare_weight(pw, sw)
        for _ in range(2):  # the first call records the eager fast path's plan, the second may replay it
            if kern is TRITON_W4A4:
                out = torch.ops.fp4.linear(x, wt, wst, gx, (1 / (gx * gw)).float(), None, n, kern.name)
                ref = ref44
            else:
                out = torch.ops.fp4.linear(x, wt, wst, gw, (1 / gw).float(), None, n, kern.name)
                ref = x.double() @ wv.t() / gw.double()
            torch.cuda.synchronize()
            assert rel(out, ref) <= TOL[torch.bfloat16], (kern.name, rel(out, ref))
    q, s = torch.ops.fp4.quantize(x, gx)
    q_ref, s_ref = F.quantize_nvfp4(x.contiguous(), gx)
    assert torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8)) and torch.equal(q, q_ref)


def test_hopper_kernels_on_two_gpus_in_one_process(seed):
    """A model spread over two GPUs: every Hopper path (M = 1 and 16 on the small-M kernel, 64 as a K split
    and 300 unsplit on the wgmma kernel, 2048 on the large-M path), W4A4 and W4A16, on cuda:0 and then
    on cuda:1 in one process while cuda:0 stays current. The wgmma kernel's shared-memory opt-in belongs to
    the device current when it is set: set once per process, cuda:1's launches failed (cudaErrorInvalidValue).
    The same kernels on two like GPUs give the same bits."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    n, k = 4096, 4096
    pw, sw, gw = make_weight(n, k)
    torch.cuda.set_device(0)
    outs = {}
    for index in (0, 1):
        dev = torch.device("cuda", index)
        pw_d, sw_d, g = pw.to(dev), sw.to(dev), gw.to(dev)
        wv = F.block_values(pw_d, sw_d).double()
        for kern in (TRITON_W4A4, MARLIN):
            wt, wst = kern.prepare_weight(pw_d, sw_d)
            for m in (1, 16, 64, 300, 2048):
                torch.manual_seed(seed + m)
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                if kern is TRITON_W4A4:
                    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
                    out = kern.linear(x, wt, wst, gx, (1 / (gx * g)).float(), None, n)
                    ref = _refs(x, pw_d, sw_d, gx, g)[0]
                else:
                    out = kern.linear(x, wt, wst, None, (1 / g).float(), None, n)
                    ref = x.double() @ wv.t() / g.double()
                assert out.device == dev and rel(out, ref) <= TOL[torch.bfloat16], (index, kern.name, m)
                outs[index, kern.name, m] = out.cpu()
        assert torch.cuda.current_device() == 0
    if torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1):
        for (index, name, m), out in outs.items():
            if index == 1:
                assert torch.equal(out, outs[0, name, m]), (name, m)


def test_wgmma_kernel_rejects_bad_input():
    _need_wgmma()
    pw, sw, gw = make_weight(64, 96)
    wt, wst = MARLIN.prepare_weight(pw, sw)
    alpha = (1 / gw).float()
    x = torch.randn(32, 96, device=DEV, dtype=torch.bfloat16)
    assert cuda_wgmma.supports(wt)  # (prepared weights pad K to 256)
    untiled = torch.zeros(64, 48, dtype=torch.uint8, device=DEV)  # K = 96: not whole 256-k tile pieces
    assert not cuda_wgmma.supports(untiled) and not cuda_wgmma.supports(wt[:, :64])
    with pytest.raises(ValueError, match="its K of 256"):
        cuda_wgmma.wgmma_gemm(x, untiled, wst[:, :6], alpha, n=64, out_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        cuda_wgmma.wgmma_gemm(x.float(), wt, wst, alpha, n=64, out_dtype=torch.float32)
    pw, sw, gw = make_weight(64, 128)
    wt, wst = MARLIN.prepare_weight(pw, sw)
    x = torch.randn(32, 128, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tile"):
        cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=64, out_dtype=torch.bfloat16, tile=(48, 1))
    with pytest.raises(ValueError, match="splits must be 1..8"):
        cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=64, out_dtype=torch.bfloat16, splits=9)


def test_small_m_kernel_rejects_bad_input():
    if cuda_small_m.unavailable_reason(torch.cuda.current_device()) is not None:
        pytest.skip(cuda_small_m.unavailable_reason(torch.cuda.current_device()))
    pw, sw, gw = make_weight(64, 64)
    wt, wst = MARLIN.prepare_weight(pw, sw)
    alpha = (1 / gw).float()
    x = torch.randn(17, 64, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="1..16 rows"):
        cuda_small_m.small_m_gemm(x, wt, wst, alpha, n=64, out_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        cuda_small_m.small_m_gemm(x[:2].float(), wt, wst, alpha, n=64, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="bad shapes"):  # K beyond the weight's (padded to 256)
        cuda_small_m.small_m_gemm(torch.randn(2, 320, device=DEV, dtype=torch.bfloat16), wt, wst, alpha, n=64,
                                  out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous prepared .tiled. weight"):  # a tiled weight must stay whole
        cuda_small_m.small_m_gemm(x[:2], wt[:, :64], wst[:, :8], alpha, n=64, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("cfg", [
    G.GemmConfig(BM=16, BN=64, BK=256, SPLIT_K=8, num_stages=4),
    G.GemmConfig(BM=16, BN=128, BK=128, SPLIT_K=3, num_stages=3, SWAP=False),
    G.GemmConfig(BM=1, BN=32, BK=256, SPLIT_K=4, DOT=False, num_stages=3),
    G.GemmConfig(BM=64, BN=128, BK=64, SPLIT_K=2, num_warps=8, num_stages=3),
    G.GemmConfig(BM=128, BN=128, BK=64, SPLIT_K=1, num_warps=8, num_stages=4, SWAP=True),
])
@pytest.mark.parametrize("use_asm", [True, False])
def test_configs_and_decode_paths(seed, cfg, use_asm):
    n, k = 1000, 1040
    m = 1 if not cfg.DOT else 37
    pw, sw, gw = make_weight(n, k)
    x = torch.randn(m, k, device=DEV)
    gx = F.global_scale_from_amax(x.abs().amax()).reshape(1)
    ref44, _ = _refs(x, pw, sw, gx, gw)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    out = torch.full((m, n), float("nan"), device=DEV)
    for _ in range(3):  # repeated: split-K tickets must reset themselves
        out.fill_(float("nan"))
        G.fp4_gemm(x, wt, wst, (1 / (gx * gw)).float(), n=n, k=k, a_mode=1, out_dtype=torch.float32,
                   global_scale=gx, config=cfg, use_asm=use_asm, out=out, mode="w4a4")
        assert torch.isfinite(out).all()
        assert rel(out, ref44) <= 1e-5
    assert _tickets_are_zero()


@pytest.mark.parametrize("gemm", ["cublaslt", "torch.mm"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [17, 1000])
def test_dequant_cublas_path(seed, monkeypatch, m, dt, gemm):
    """The large-M path (weight dequantized once, then cuBLASLt with alpha and bias in its
    epilogue, or torch.mm + passes for bf16 where cuBLASLt is missing) forced at any M."""
    from fp4_compile.ops import cublaslt

    if gemm == "cublaslt" and not cublaslt.available(torch.device(DEV)):
        pytest.skip(str(cublaslt.unavailable_reason(torch.cuda.current_device())))
    if gemm == "torch.mm":
        if dt != torch.bfloat16:
            pytest.skip("without cuBLASLt the dequant path takes bf16 only")
        monkeypatch.setattr(cublaslt, "available", lambda device: False)
    monkeypatch.setattr(G, "DEQUANT_MIN_M", 1)
    n, k = 1000, 1040
    assert G.use_dequant("w4a16", m, n, k, dt, torch.device(DEV))
    pw, sw, gw = make_weight(n, k)
    x = torch.randn(m, k, device=DEV).to(dt)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    bias = torch.randn(n, device=DEV).to(dt)
    ref44, wv = _refs(x, pw, sw, gx, gw)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    poison_allocator(m * n * 8 + (1 << 22))
    o = TRITON_W4A4.linear(x, wt, wst, gx, (1 / (gx * gw)).float(), bias, n)
    assert o.dtype == dt and rel(o, ref44 + bias.double()) <= TOL[dt]
    o16 = MARLIN.linear(x, wt, wst, None, (1 / gw).float(), bias, n)
    x16 = x.to(torch.bfloat16) if dt == torch.float32 else x  # W4A16 rounds fp32 activations to bf16
    assert o16.dtype == dt and rel(o16, x16.double() @ wv.t() / gw.double() + bias.double()) <= TOL[dt]
    wd = G.dequantize_weight(wt, wst, n, k, torch.bfloat16)
    assert torch.equal(wd.float(), F.block_values(pw, sw))


def test_cuda_graph_capture_and_replay(seed):
    n, k, m = 4096, 4096, 4
    pw, sw, gw = make_weight(n, k)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    alpha = (1 / (gx * gw)).float()
    TRITON_W4A4.linear(x, wt, wst, gx, alpha, None, n)  # compile outside capture
    MARLIN.linear(x, wt, wst, None, (1 / gw).float(), None, n)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o1 = TRITON_W4A4.linear(x, wt, wst, gx, alpha, None, n)
        o2 = MARLIN.linear(x, wt, wst, None, (1 / gw).float(), None, n)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        gx.copy_(F.global_scale_from_amax(x.float().abs().amax()).reshape(1))
        alpha.copy_((1 / (gx * gw)).float())
        g.replay()
        torch.cuda.synchronize()
        ref44, wv = _refs(x, pw, sw, gx, gw)
        assert rel(o1, ref44) <= TOL[torch.bfloat16]
        assert rel(o2, x.double() @ wv.t() / gw.double()) <= TOL[torch.bfloat16]


def test_nonfinite_input_gives_nonfinite_row(seed):
    n, k = 256, 512
    pw, sw, gw = make_weight(n, k)
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    for m in (3, 200):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        x[1, 17] = float("nan")
        one = torch.ones(1, device=DEV)
        out = TRITON_W4A4.linear(x, wt, wst, one, one, None, n)
        assert (~torch.isfinite(out[1])).all()
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
