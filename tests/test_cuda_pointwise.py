"""The CUDA kernels of a layer's other fp4 ops: the RMSNorm before the block values (``fp4c_rms_norm_values``
in csrc/hopper/nvfp4_quant.cu, ``fp4::rms_norm_quantize``'s eager kernel) and ``silu_mul.cu``
(``fp4::linear_silu_mul``'s second half), and the C++ fast path that launches both without Python.

On any machine with nvcc: silu_mul.cu compiles for sm_90 without spills. On a GPU: silu_mul equals
``F.silu(gate) * up`` bit for bit (vector and scalar paths, strided rows); the norm kernel writes every
element of strided and contiguous rows alike (its agreement with the CPU reference and the Triton kernel:
test_fuse_rms_norm_quant.py); linear_silu_mul's fast path (gated launch or two linears) gives the Python path's
bits. Fresh random data every run.
"""

from __future__ import annotations

import pytest
import torch

from fp4_compile import format as F
from fp4_compile.ops import silu_mul as silu_mul_module
from nvcc_helpers import compile_with_ptxas_report, needs_nvcc


@needs_nvcc
def test_silu_mul_kernel_compiles_for_sm90_without_spills(tmp_path):
    from fp4_compile.ops.nvcc import kernel_flags, shared_library_command

    report = compile_with_ptxas_report(shared_library_command(
        silu_mul_module.SOURCE, str(tmp_path / "k.so"), kernel_flags((9, 0)) + ["-Xptxas", "-v"]))
    assert len(report.kernels) == 4 and all("silu_mul_kernel" in k for k in report.kernels), report.kernels
    assert all(s == ("0", "0") for s in report.spills), report.spills


# ---------------------------------------------------------------------------------------------
# GPU

def _cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fp4_compile.ops import cuda_quant

    index = torch.cuda.current_device()
    for reason in (cuda_quant.unavailable_reason(index), silu_mul_module.unavailable_reason(index)):
        if reason is not None:
            pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n", [(1, 14336), (37, 1000), (300, 4104), (5, 7)])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_mul_kernel_equals_eager(seed, dtype, m, n, strided):
    _cuda_kernels()
    wide = torch.randn(m, 2 * n + 8, device="cuda").mul(4).to(dtype)
    gate = wide[:, 8:n + 8] if strided else wide[:, :n].contiguous()
    up = torch.randn(m, n, device="cuda").mul(4).to(dtype)
    out = silu_mul_module.silu_mul(gate, up)
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)


@pytest.mark.gpu
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_norm_kernel_writes_every_element_of_strided_rows(seed, unit_offset):
    """Rows of a wider tensor (the Python path's CUDA kernel with strides) and the C++ path's contiguous
    call give the same bits, and the outputs are fresh tensors, fully written (NaN-poisoned memory beneath)."""
    _cuda_kernels()
    torch.cuda.empty_cache()
    poison = torch.full((1 << 22,), float("nan"), device="cuda")
    del poison  # the allocator hands the NaN-filled block out again
    m, k = 33, 4096
    wide = torch.randn(m, k + 64, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    gs = F.global_scale_from_amax(torch.tensor(40.0, device="cuda")).reshape(1)
    strided = torch.ops.fp4.rms_norm_quantize(wide[:, :k], res, w, 1e-6, gs, unit_offset)
    contiguous = torch.ops.fp4.rms_norm_quantize(wide[:, :k].contiguous(), res, w, 1e-6, gs, unit_offset)
    for a, b in zip(strided, contiguous):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton-w4a4", "marlin"])
@pytest.mark.parametrize("m", [64])
def test_linear_silu_mul_fast_path_equals_the_python_path(seed, backend, m):
    """linear_silu_mul on the fast path: its second call (the C++ path) gives the first's (the Python path's)
    bits, within the exact product's tolerance of the float64 reference; unfused (M = 64: two linears and the
    CUDA silu_mul) and gated (M = 1: one grouped launch) alike."""
    from fp4_compile.backends import kernels_for
    from fp4_compile.ops import fast_linear

    _cuda_kernels()
    if fast_linear.unavailable_reason(torch.cuda.current_device()) is not None:
        pytest.skip(fast_linear.unavailable_reason(torch.cuda.current_device()))
    n, k = 4096, 4096  # (at M = 64 both linears run the wgmma kernel: their plans replay)
    weights, scales, refs = [], [], []
    for _ in range(2):
        w = torch.randn(n, k, device="cuda")
        gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
        pw, sw = F.quantize_nvfp4(w, gw)
        wt, wst = kernels_for(backend).prepare_weight(pw, sw)
        weights.append(wt)
        scales.append(wst)
        refs.append((F.block_values(pw, sw).double(), gw))
    for rows in (m, 1):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        if backend == "marlin":
            gss, alphas = [g for _, g in refs], [(1 / g).float() for _, g in refs]
            xv = x.double()
        else:
            gss, alphas = [gx, gx], [(1 / (gx * g)).float() for _, g in refs]
            xv = F.block_values(*F.quantize_nvfp4(x, gx)).double()
        args = (x, weights, scales, gss, alphas, [None, None], n, backend)
        first = torch.ops.fp4.linear_silu_mul(*args)
        before = fast_linear.replayed_calls()
        again = torch.ops.fp4.linear_silu_mul(*args)
        assert fast_linear.replayed_calls() == before + (1 if rows == 1 else 2)  # one gated launch, or two linears
        assert torch.equal(first, again)
        gate, up = ((xv @ wv.t() * a.double()).to(torch.bfloat16) for (wv, _), a in zip(refs, alphas))
        expected = (torch.nn.functional.silu(gate) * up).double()
        rel = float((first.double() - expected).norm() / expected.norm())
        assert rel <= 1e-2, rel
