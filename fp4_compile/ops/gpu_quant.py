"""NVFP4 activation quantization on the GPU: the public entry points.

Codes and scales (M >= 1024, where it is faster) and, in eager calls, bf16/fp16 block values (its
launch costs less host time) come from the CUDA kernel (``cuda_quant.py``: sm_89/sm_90 with nvcc)
where it can run, else from the Triton kernel (``triton_quant.py``: any sm_80+ GPU, and Triton's
interpreter on the CPU). Both compute ``fp4_compile.format.quantize_nvfp4`` bit for bit.
"""

from __future__ import annotations

import torch

from ..format import BLOCK_SIZE
from . import cuda_quant
from .cuda_quant import MODE_LINEAR, MODE_SWIZZLED, MODE_VALUES
from .triton_quant import check_device, launch_quant_triton


def _quantize(x2: torch.Tensor, gs: torch.Tensor, mode: int, out_dtype: torch.dtype | None = None,
              early_trigger: bool = False):
    if cuda_quant.use_cuda_quant(x2, mode, out_dtype):
        return cuda_quant.quantize(x2, gs, mode, out_dtype=out_dtype, early_trigger=early_trigger)
    return launch_quant_triton(x2, gs, mode, out_dtype, early_trigger)


def quantize_nvfp4_gpu(
    x: torch.Tensor, global_scale: torch.Tensor, swizzle: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` (fp32/fp16/bf16, K a multiple of 16) to NVFP4 on the GPU.

    Returns ``(packed uint8 [..., K/2], scales float8_e4m3fn)``: scales linear ``[..., K/16]``,
    or with ``swizzle=True`` the 2-D 128x4 layout ``[round_up(M,128), round_up(K/16,4)]`` of the
    flattened rows with every padded byte zero. ``global_scale`` is a float32 tensor of one
    element (the multiplier 448*6/amax); it is read on the device (no host sync, graph-safe).
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"x: the last dimension must be a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}")
    if global_scale.numel() != 1:
        raise ValueError(f"global_scale must have one element, got shape {tuple(global_scale.shape)}")
    check_device(x, global_scale, what="quantize_nvfp4_gpu")
    lead, k = x.shape[:-1], x.shape[-1]
    q, s = _quantize(x.reshape(-1, k), global_scale.float(), MODE_SWIZZLED if swizzle else MODE_LINEAR)
    q = q.reshape(*lead, k // 2)
    if not swizzle:
        s = s.reshape(*lead, k // BLOCK_SIZE)
    return q, s


def fake_quantize_nvfp4_gpu(x2: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact NVFP4 block values ``e2m1 * sf`` (without ``1/gs``) of ``x2 [M, K]`` in ``dtype``.

    Exact in bf16 and fp16 (at most 6 significant bits, magnitudes in [2^-10, 2688]); what the W4A4
    linear feeds its W4A16-style GEMMs: quantize once, then multiply the exact values. For those
    linears only: the kernel lets the next one launch before it completes (``early_trigger``), which only
    our GEMMs may follow.
    """
    return _quantize(x2, global_scale.float(), MODE_VALUES, dtype, early_trigger=True)


__all__ = ["quantize_nvfp4_gpu", "fake_quantize_nvfp4_gpu"]
