"""The CUDA C++ NVFP4 quantization kernel (ops/cuda_quant.py).

On any machine with nvcc: it compiles for sm_90 without spills into a library with its C entry
point, and the argument checks and dispatch behave without a GPU. On a GPU (sm_89/90): bit-exact with
``format.quantize_nvfp4`` (codes, linear and swizzled scales, padding included) and the block
values bit-exact with the Triton kernel's, on fresh random data with tiny and huge rows (subnormal
and clamped scales), zero blocks, +-Inf and NaN; strided rows; every grid size; CUDA-graph capture.
"""

import ctypes
import types

import pytest
import torch

from fp4_compile import format as F
from fp4_compile.ops import cuda_quant
from fp4_compile.ops.cuda_quant import MODE_KERNEL_CODES, MODE_LINEAR, MODE_SWIZZLED, MODE_VALUES
from fp4_compile.ops.weight_layout import to_kernel_layout
from fp4_compile.ops.triton_quant import launch_quant_triton
import background_jobs
from nvcc_helpers import ptxas_report


# ---------------------------------------------------------------------------------------------
# CPU: build and arguments


@pytest.mark.background_job("quant_sm90")
def test_kernel_compiles_for_sm90_without_spills_and_exports_the_launcher():
    build = background_jobs.result("quant_sm90")
    report, lib = ptxas_report(build), build.output
    kernels, spills, regs = report.kernels, report.spills, report.registers
    quant = [i for i, k in enumerate(kernels) if "nvfp4_quant_kernel" in k]
    norm = [i for i, k in enumerate(kernels) if "rms_norm_values_kernel" in k]
    # {fp32, fp16, bf16} x {linear, swizzled, kernel-layout codes, block values in bf16 and in fp16}, and the
    # block values of 16-bit inputs without the out_scale table; the norm: {fp16, bf16} x {1, 2, 4} pairs per thread
    # x {Llama's, Gemma's}
    assert len(quant) == 19 and len(norm) == 12 and len(kernels) == 31, kernels
    assert len(spills) == 31 and all(s == ("0", "0") for s in spills), spills
    # <= 64 registers: 4 CTAs of 256 threads resident per SM at least
    assert len(regs) == 31 and max(regs[i] for i in quant) <= 64, regs
    # the package's own build command (plus -Xptxas -v; its cache: test_cublaslt's build_twice)
    assert hasattr(ctypes.CDLL(str(lib)), "fp4c_nvfp4_quant")


def test_kernel_layout_placement_matches_weight_layout():
    """nvfp4_quant.cu's encoder of the kernel word layout (shifts of the magnitudes, rotations for
    register 3, shifts of the sign bits), modelled bit by bit, places every code bit where
    weight_layout.code_bit_positions says."""
    import re

    from fp4_compile.ops.weight_layout import code_bit_positions
    text = cuda_quant.SOURCE.read_text()
    mag_shift = [int(v) for v in re.search(r"kMagShift\[3\] = \{([\d, ]+)\};", text).group(1).split(",")]
    rot_exp, rot_mant, sign3 = (int(v) for v in re.search(
        r"kRot3Exp = (\d+), kRot3Mant = (\d+), kSign3Shift = (\d+);", text).groups())

    def rotl(v, r):
        return ((v << r) | (v >> (32 - r))) & 0xFFFFFFFF

    def encode(j, h, b):
        """Where bit b (0 mantissa, 1 e0, 2 e1, 3 sign) of the code in lane h of register j lands."""
        if b == 3:  # the sign, at bit 15 (lane 0) or 31 (lane 1) of the pair's sign word
            bit = 1 << (15 + 16 * h)
            placed = bit >> (3 * j if j < 3 else sign3)
        else:  # the magnitude bits, at 0..2 (lane 0) or 16..18 (lane 1) of m
            bit = 1 << (b + 16 * h)
            if j < 3:
                placed = bit << mag_shift[j]
            else:
                placed = (rotl(bit, rot_exp) & 0x0C000C00) | (rotl(bit, rot_mant) & 0x40004000)
        assert placed and placed & (placed - 1) == 0, (j, h, b, hex(placed))
        return placed.bit_length() - 1

    assert tuple(tuple(tuple(encode(j, h, b) for b in range(4)) for h in range(2)) for j in range(4)) == \
        code_bit_positions()


def test_cpu_tensors_are_refused_clearly():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda_quant.quantize(torch.randn(2, 32), torch.ones(1), MODE_LINEAR)
    assert not cuda_quant.use_cuda_quant(torch.randn(128, 32), MODE_LINEAR)


@pytest.mark.parametrize("x,gs,mode,error,match", [
    (torch.zeros(2, 32, dtype=torch.int32), torch.ones(1), MODE_LINEAR, TypeError, "float32, float16 or bfloat16"),
    (torch.zeros(2, 24), torch.ones(1), MODE_LINEAR, ValueError, "multiple of 16"),
    (torch.zeros(2, 2, 32), torch.ones(1), MODE_LINEAR, ValueError, "2-D"),
    (torch.zeros(2, 32), torch.ones(1, dtype=torch.float64), MODE_LINEAR, TypeError, "global_scale must be float32"),
    (torch.zeros(2, 32), torch.ones(2), MODE_LINEAR, ValueError, "one element"),
    (torch.zeros(2, 32), torch.ones(1), 4, ValueError, "mode"),
    (torch.zeros(2, 32), torch.ones(1), MODE_VALUES, TypeError, "bf16 or fp16"),  # fp32 values: Triton
])
def test_bad_arguments_are_refused_clearly(x, gs, mode, error, match):
    with pytest.raises(error, match=match):
        cuda_quant.quantize(x, gs, mode)


def test_bad_grid_size_is_refused():
    with pytest.raises(ValueError, match="ctas_per_sm"):
        cuda_quant.quantize(torch.zeros(2, 32), torch.ones(1), MODE_LINEAR, ctas_per_sm=0)


@pytest.mark.parametrize("capturing", [False, True])
def test_dispatch_leaves_small_m_codes_and_fp32_values_to_triton(monkeypatch, capturing):
    monkeypatch.setattr(cuda_quant, "unavailable_reason", lambda index: None)  # as on a GPU that runs it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)

    def x(m, dtype=torch.float32):  # what use_cuda_quant reads of a CUDA tensor
        return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(m, 32))

    assert not cuda_quant.use_cuda_quant(x(1), MODE_LINEAR)
    assert cuda_quant.use_cuda_quant(x(cuda_quant.MIN_M), MODE_LINEAR)
    # block values at any M in eager calls; in a graph capture, Triton's (faster on the GPU)
    assert cuda_quant.use_cuda_quant(x(1), MODE_VALUES, torch.bfloat16) is not capturing
    assert cuda_quant.use_cuda_quant(x(4096), MODE_VALUES, torch.float16) is not capturing
    assert cuda_quant.use_cuda_quant(x(1, torch.bfloat16), MODE_VALUES) is not capturing  # x's type
    assert cuda_quant.use_cuda_quant(x(cuda_quant.MIN_M), MODE_LINEAR)  # codes: captured or not
    assert not cuda_quant.use_cuda_quant(x(4096), MODE_VALUES, torch.float32)
    assert not cuda_quant.use_cuda_quant(x(4096), MODE_VALUES)  # fp32 x: values in fp32


# ---------------------------------------------------------------------------------------------
# GPU: bit-exactness

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MS = [1, 3, 130]
KS = [16, 48, 4096]


def _skip_without_kernel():
    reason = cuda_quant.unavailable_reason(torch.cuda.current_device())
    if reason is not None:
        pytest.skip(f"the CUDA quantization kernel is unavailable: {reason}")


def _poison(nbytes):
    """Fill freed caching-allocator memory with 0xFF so that torch.empty returns poison."""
    t = torch.full((nbytes // 4 + 1024,), -1, dtype=torch.int32, device="cuda")
    del t


def _make_input(m, k, dt, *, pad=0):
    """[m, k] (a view with row stride k + pad when pad > 0): per-row magnitudes from tiny to huge,
    a zero block, +-Inf and NaN in some rows. Returns (x, gs) with gs either from the finite amax or
    larger (so that the 448 clamp occurs), drawn fresh."""
    lo, hi = (-24, 10) if dt == torch.float16 else (-60, 60)
    mags = torch.exp2(torch.empty(m, 1, device="cuda").uniform_(lo, hi))
    full = (torch.randn(m, k + pad, device="cuda") * mags).to(dt)
    x = full[:, :k] if pad else full
    kb = k // 16
    if m >= 2 or kb >= 2:
        x[0, :16] = 0  # a zero block
        if m >= 2 and kb >= 2:
            x[1, 16:32] = -0.0  # a block of negative zeros: scale 0, codes 0x8
    if m >= 3:
        x[1, torch.randint(k, ()).item()] = float("inf")
        x[2, torch.randint(k, ()).item()] = float("nan")
        x[m - 1, torch.randint(k, ()).item()] = float("-inf")
    elif kb >= 2:
        x[m - 1, k - 1] = float("nan")
    finite_amax = x.float().abs().nan_to_num(0, 0, 0).amax()
    gs = F.global_scale_from_amax(finite_amax).reshape(1)
    gs = gs * torch.tensor([1.0, 4.0, 1024.0])[torch.randint(3, ())].to("cuda")
    return x, gs.float()


@pytest.mark.gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("swizzle", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_codes_and_scales_bit_exact(seed, dt, m, k, swizzle, strided):
    _skip_without_kernel()
    x, gs = _make_input(m, k, dt, pad=16 if strided else 0)
    _poison(4 * m * k + (1 << 20))
    q, s = cuda_quant.quantize(x, gs, MODE_SWIZZLED if swizzle else MODE_LINEAR)
    qr, sr = F.quantize_nvfp4(x, gs, swizzle=swizzle)
    assert q.dtype == torch.uint8 and q.shape == (m, k // 2)
    assert s.dtype == torch.float8_e4m3fn and s.shape == sr.shape
    assert torch.equal(s.view(torch.uint8), sr.view(torch.uint8))  # padding included (zeros)
    bad = (q != qr).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} code bytes differ, first at {bad[0].tolist()}"


@pytest.mark.gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_block_values_bit_exact(seed, dt, m, k, out_dtype, strided):
    """The block values e2m1 * sf equal the Triton kernel's bit for bit (signed zeros included) and the
    reference's block values; blocks holding Inf/NaN are NaN in both kernels."""
    _skip_without_kernel()
    x, gs = _make_input(m, k, dt, pad=16 if strided else 0)
    _poison(4 * m * k + (1 << 20))
    v = cuda_quant.quantize(x, gs, MODE_VALUES, out_dtype=out_dtype)
    vt = launch_quant_triton(x, gs, MODE_VALUES, out_dtype)
    assert v.dtype == out_dtype and v.shape == (m, k)
    nan = v.isnan()
    assert torch.equal(nan, vt.isnan())
    bits, tbits = v.view(torch.int16)[~nan], vt.view(torch.int16)[~nan]
    bad = (bits != tbits).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} values differ from the Triton kernel's"
    ref = F.block_values(*F.quantize_nvfp4(x, gs))
    assert torch.equal(v.float()[~nan], ref[~nan])


def kernel_codes_reference(x: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What MODE_KERNEL_CODES writes: the reference's codes and linear scales, K padded to 32 with
    zeros, the codes in the kernel word layout."""
    q, s = F.quantize_nvfp4(x, gs)
    pad = -x.shape[1] % 32
    q = torch.nn.functional.pad(q, (0, pad // 2))
    s = torch.nn.functional.pad(s.view(torch.uint8), (0, pad // 16))
    return to_kernel_layout(q), s


@pytest.mark.gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_layout_codes_bit_exact(seed, dt, m, k, strided):
    """Codes in the GEMMs' word layout and linear scales, K padded to 32 (K = 16, 48: a half chunk of
    zeros written), every byte equal to the reference's."""
    _skip_without_kernel()
    x, gs = _make_input(m, k, dt, pad=16 if strided else 0)
    _poison(4 * m * k + (1 << 20))
    q, s = cuda_quant.quantize(x, gs, MODE_KERNEL_CODES)
    qr, sr = kernel_codes_reference(x, gs)
    kc = -(-k // 32) * 32
    assert q.dtype == torch.uint8 and q.shape == (m, kc // 2) and s.shape == (m, kc // 16)
    assert torch.equal(s.view(torch.uint8), sr)
    bad = (q != qr).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} code bytes differ, first at {bad[0].tolist()}"


@pytest.mark.gpu
def test_block_values_in_a_cuda_graph(seed):
    _skip_without_kernel()
    m, k = 5, 4096
    x, gs = _make_input(m, k, torch.bfloat16)
    gs = gs.clone()
    cuda_quant.quantize(x, gs, MODE_VALUES)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v = cuda_quant.quantize(x, gs, MODE_VALUES)
        assert not cuda_quant.use_cuda_quant(x, MODE_VALUES)  # the library's calls take Triton's here
    assert cuda_quant.use_cuda_quant(x, MODE_VALUES)
    for factor in (1.0, 0.25, 64.0):
        x.copy_(_make_input(m, k, torch.bfloat16)[0])
        gs.copy_(F.global_scale_from_amax(x.float().abs().nan_to_num(0, 0, 0).amax()).reshape(1) * factor)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(v.view(torch.int16), launch_quant_triton(x, gs, MODE_VALUES, torch.bfloat16).view(torch.int16))


@pytest.mark.gpu
def test_scales_cover_subnormal_and_clamped_ranges(seed):
    """The random inputs above do reach the edge cases (guards the test data, not the kernel)."""
    _skip_without_kernel()
    hits = torch.zeros(4, dtype=torch.bool)
    for _ in range(20):
        x, gs = _make_input(130, 4096, torch.bfloat16)
        _, s = cuda_quant.quantize(x, gs, MODE_LINEAR)
        b = s.view(torch.uint8).flatten()
        hits |= torch.stack([(b == 0).any(), ((b > 0) & (b < 8)).any(), (b == 0x7E).any(), (b == 0x7F).any()]).cpu()
    assert hits.all(), hits  # zero, subnormal, 448 and NaN scales


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [MODE_LINEAR, MODE_SWIZZLED])
def test_empty_inputs(mode):
    _skip_without_kernel()
    gs = torch.ones(1, device="cuda")
    q, s = cuda_quant.quantize(torch.empty(0, 64, device="cuda", dtype=torch.bfloat16), gs, mode)
    assert q.shape == (0, 32) and s.shape == (0, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [MODE_LINEAR, MODE_SWIZZLED])
def test_cuda_graph_reads_the_global_scale_on_replay(seed, mode):
    _skip_without_kernel()
    m, k = 130, 1040
    x, gs = _make_input(m, k, torch.bfloat16)
    gs = gs.clone()
    cuda_quant.quantize(x, gs, mode)  # build and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = cuda_quant.quantize(x, gs, mode)
    for factor in (1.0, 0.25, 64.0):
        x.copy_(_make_input(m, k, torch.bfloat16)[0])
        gs.copy_(F.global_scale_from_amax(x.float().abs().nan_to_num(0, 0, 0).amax()).reshape(1) * factor)
        graph.replay()
        torch.cuda.synchronize()
        qr, sr = F.quantize_nvfp4(x, gs, swizzle=mode == MODE_SWIZZLED)
        assert torch.equal(s.view(torch.uint8), sr.view(torch.uint8))
        assert torch.equal(q, qr)


@pytest.mark.gpu
@pytest.mark.parametrize("ctas_per_sm", [1, 4, 16])
def test_every_grid_size_is_bit_exact(seed, ctas_per_sm):
    """Few CTAs per SM make each thread loop over many rows (the block values then read the out_scale
    table; with one row per thread they compute it, as at every M of test_block_values_bit_exact)."""
    _skip_without_kernel()
    x, gs = _make_input(2000, 14336, torch.bfloat16)
    q, s = cuda_quant.quantize(x, gs, MODE_LINEAR, ctas_per_sm=ctas_per_sm)
    qr, sr = F.quantize_nvfp4(x, gs)
    assert torch.equal(s.view(torch.uint8), sr.view(torch.uint8)) and torch.equal(q, qr)
    v = cuda_quant.quantize(x, gs, MODE_VALUES, ctas_per_sm=ctas_per_sm)
    ref = F.block_values(qr, sr)
    nan = ref.isnan()
    assert torch.equal(v.isnan(), nan) and torch.equal(v.float()[~nan], ref[~nan])
