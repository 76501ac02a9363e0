"""What the two nvcc-built mma.sync GEMMs (``cuda_small_m``, ``cuda_mid_m``) share on the Python
side: their build flags and the checking and normalizing of a call's arguments."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..format import check_same_device
from .nvcc import kernel_flags

# Bytes of each weight row that a 16-byte load asks L2 to fetch (FP4C_WEIGHT_PREFETCH in
# nvfp4_mma.cuh; 0, 64, 128 or 256). A build-time constant: bench_small_m.py times the others as
# variants. H100, M=1: 128 was fastest on all four Llama shapes, 5-11% over none (NOTES.md, v5).
WEIGHT_PREFETCH = 128


def nvcc_flags(capability: tuple[int, int], prefetch: int = WEIGHT_PREFETCH) -> list[str]:
    return kernel_flags(capability) + [f"-DFP4C_WEIGHT_PREFETCH={prefetch}"]


class GemmArgs(NamedTuple):
    x: torch.Tensor             # [M, K] bf16/fp16, unit stride, 16-byte aligned rows
    weight_scale: torch.Tensor  # viewed as uint8
    bias: torch.Tensor | None   # out_dtype, contiguous
    alpha: torch.Tensor         # float32
    m: int
    k: int
    kp: int                     # the weight's padded K


def check_gemm_args(what: str, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    alpha: torch.Tensor, bias: torch.Tensor | None, n: int, out_dtype: torch.dtype,
                    max_m: int) -> GemmArgs:
    """Raise on what the kernel ``what`` cannot take; convert what it can (strides, dtypes)."""
    check_same_device(x=x, weight=weight, weight_scale=weight_scale, alpha=alpha, bias=bias)
    if x.device.type != "cuda":
        raise RuntimeError(f"the {what} needs CUDA tensors, got {x.device}")
    m, k = x.shape
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bf16 or fp16, got {x.dtype}")
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"out_dtype must be {x.dtype} or float32, got {out_dtype}")
    if not 1 <= m <= max_m:
        raise ValueError(f"the {what} takes 1..{max_m} rows, got {m}")
    kp = weight.shape[1] * 2
    if k % 16 or k > kp or kp % 32 or weight.shape[0] % 32 or n > weight.shape[0]:
        raise ValueError(f"bad shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, n={n}")
    if x.stride(1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:
        x = x.contiguous()
    if weight_scale.dtype != torch.uint8:
        weight_scale = weight_scale.view(torch.uint8)
    if bias is not None and (bias.dtype != out_dtype or not bias.is_contiguous()):
        bias = bias.to(out_dtype).contiguous()
    if alpha.dtype != torch.float32:
        alpha = alpha.float()
    return GemmArgs(x, weight_scale, bias, alpha, m, k, kp)
