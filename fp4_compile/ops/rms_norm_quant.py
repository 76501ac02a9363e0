"""RMSNorm (after an optional residual add) and NVFP4 block values in one pass: ``fp4::rms_norm_quantize``.

A W4A4 layer's q/k/v and gate/up projections quantize the output of an RMSNorm. Run apart, that is
Inductor's norm kernel, then a quantization kernel, then the GEMM; here one Triton program per row adds
the residual, normalizes, scales by the weight and writes the exact NVFP4 block values ``e2m1 * sf``
(without ``1/gs``) that the Hopper GEMMs take, with the rounding of the eager ops: the residual sum and
the normalized row in the activation dtype, ``(x * rsqrt(mean(x^2) + eps)).to(dtype) * weight`` rounded
again (Gemma's norm, ``UNIT_OFFSET``: ``(x * rsqrt(mean(x^2) + eps) * (1 + weight)).to(dtype)``, rounded
once), then ``triton_quant._fake_quant`` (``fp4_compile.format.quantize_nvfp4``, bit for bit). One launch
instead of two, and the normalized activations never reach memory. ``passes/fuse_rms_norm_quant.py``
makes the op from a graph. Runs under TRITON_INTERPRET=1 on any tensor.

Eager calls on 16-bit rows (either norm) take the CUDA twin of this kernel (``fp4c_rms_norm_values`` in
csrc/hopper/nvfp4_quant.cu, the same roundings; the float32 sum of squares in another order), which the
C++ fast path of ``fast_linear`` launches without Python: a Python op call with a Triton launch cost an
eager call about 60 us of host time (benchmarks/profile_host.py, NOTES.md v25). Captured calls (CUDA graphs,
no host time) keep the Triton kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import BLOCK_SIZE
from . import cuda_quant, nvcc
from .cuda_small_m import DISPATCH_MAX_M
from .pdl import use_pdl
from .triton_launch import launch_triton
from .triton_quant import (_fake_quant, check_device, gdc_launch_dependents, gdc_wait, next_power_of_2,
                           pdl_launch_args)


# Up to this M the linears after the norm run the CUDA small-M kernel, whose launch the trigger hides: a W4A4
# decode step at one token (4 layers, H100, NOTES.md v23) took 319-326 us instead of 333-334. Above it
# they may run the Triton GEMM, which measured up to 1.19x slower when launched early (NOTES.md v9c).
TRIGGER_MAX_M = DISPATCH_MAX_M


@triton.jit
def _rms_norm_quant_kernel(x_ptr, res_ptr, w_ptr, gs_ptr, sum_ptr, val_ptr, K, eps,
                           stride_x, stride_res, stride_sum, stride_val,
                           HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK_G: tl.constexpr,
                           PDL: tl.constexpr, TRIGGER: tl.constexpr):
    if PDL:  # launched with PDL (ops/pdl.py): wait for the kernel before
        gdc_wait()
        if TRIGGER:  # then let the next kernel launch: after the wait, as Inductor's own PDL kernels trigger, so
            # safe before any kernel (a PDL kernel after us waits where it touches our buffers, and everything
            # before us has completed)
            gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    e = tl.arange(0, 16)
    offs = g[:, None] * 16 + e[None, :]
    mask = offs < K
    dtype = val_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the residual stream's add, rounded as the eager add rounds it
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(dtype)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(tl.sum(xf * xf, axis=1), axis=0) / K
    normed = xf * (1.0 / tl.sqrt(mean_sq + eps))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:  # Gemma's norm: times (1 + weight) in float32, rounded once
        h = (normed * (1.0 + w)).to(dtype).to(tl.float32)
    else:  # Llama's: rounded, times the weight, rounded again
        h = (normed.to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
    vals = _fake_quant(tl.expand_dims(h, 0), tl.load(gs_ptr))
    tl.store(val_ptr + row * stride_val + offs[None, :, :], vals.to(dtype), mask=mask[None, :, :])


# fp4c_rms_norm_values holds at most 4 block pairs per thread of 256 in registers.
CUDA_MAX_K = 32768


def _aligned_rows(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.dim() == 1 or (t.stride(0) * t.element_size()) % 16 == 0)


def _use_cuda_kernel(x2: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """The CUDA kernel for this call: eager (not captured) 16-bit rows of at most CUDA_MAX_K, aligned,
    where it is built; as fp4::rms_norm_quantize's C++ fast path decides, so that both give the same bits."""
    if (x2.device.type != "cuda" or x2.dtype not in cuda_quant.VALUE_DTYPES
            or x2.shape[1] > CUDA_MAX_K or not _aligned_rows(x2) or not weight.is_contiguous() or not _aligned_rows(weight)
            or (residual is not None and not _aligned_rows(residual))):
        return False
    if cuda_quant.unavailable_reason(nvcc.device_index(x2.device)) is not None:
        return False
    return not torch.cuda.is_current_stream_capturing()


def rms_norm_quantize_gpu(x2: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                          global_scale: torch.Tensor,
                          unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values [M, K], residual sum [M, K] or None) of 2-D ``x2`` (and ``residual``), in x2's dtype
    (``unit_offset``: Gemma's norm, see fp4::rms_norm_quantize)."""
    check_device(x2, residual, weight, global_scale, what="rms_norm_quantize")
    m, k = x2.shape
    if k % BLOCK_SIZE:
        raise ValueError(f"K={k} must be a multiple of {BLOCK_SIZE}")
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    vals = torch.empty_like(x2, memory_format=torch.contiguous_format)
    out_sum = torch.empty_like(vals) if residual is not None else None
    gs32 = global_scale.reshape(1).float()
    if m and _use_cuda_kernel(x2, residual, weight):
        pdl = (2 if m <= TRIGGER_MAX_M else 1) if use_pdl(x2.device) else 0
        res_ptr, res_ld = (residual.data_ptr(), residual.stride(0)) if residual is not None else (None, 0)
        err = nvcc.launch_on(x2.device, lambda capability, stream: cuda_quant._library(capability).fp4c_rms_norm_values(
            x2.data_ptr(), x2.stride(0), res_ptr, res_ld, weight.data_ptr(),
            out_sum.data_ptr() if out_sum is not None else None, k, vals.data_ptr(), k,
            cuda_quant.DTYPE_CODES[x2.dtype], gs32.data_ptr(), float(eps), m, k, int(unit_offset), pdl, stream))
        if err != 0:
            raise RuntimeError(f"fp4c_rms_norm_values failed: CUDA error {err} (M={m}, K={k}, {x2.dtype})")
    elif m:
        res = residual if residual is not None else x2
        total = out_sum if out_sum is not None else vals
        block_g = next_power_of_2(k // BLOCK_SIZE)
        launch_triton(_rms_norm_quant_kernel, (m,),
            x2, res, weight, gs32, total, vals, k, float(eps),
            x2.stride(0), res.stride(0), total.stride(0), vals.stride(0),
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, BLOCK_G=block_g,
            num_warps=8 if k >= 4096 else 4, TRIGGER=m <= TRIGGER_MAX_M, **pdl_launch_args(x2.device))
    return vals, out_sum
