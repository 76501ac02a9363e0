"""The ``fp4`` torch.library ops, each defined once next to its fake kernel.

All ops are functional (no mutation), so the Inductor pattern matcher sees them as
plain nodes. Implementations dispatch on the ``backend`` argument through
:func:`fp4_compile.backends.kernels_for`; fake kernels only compute shapes and work
with a symbolic M.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import format as fmt
from ..backends import kernels_for, parse_backend


def _check_activation(x: Tensor, global_scale: Tensor) -> None:
    fmt.check_float_input(x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first), got shape {tuple(x.shape)}")
    fmt.check_global_scale(global_scale, "input_global_scale", check_value=False)
    fmt.check_same_device(x=x, input_global_scale=global_scale)


def _check_weight(weight: Tensor, weight_scale: Tensor, alpha: Tensor) -> None:
    if weight.dtype != torch.uint8:
        raise TypeError(f"weight must be packed uint8 NVFP4, got {weight.dtype}")
    if weight_scale.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"weight_scale must be float8_e4m3fn (or its uint8 view), got {weight_scale.dtype}")
    fmt.check_global_scale(alpha, "alpha", check_value=False)


@torch.library.custom_op("fp4::quantize", mutates_args=())
def quantize(x: Tensor, global_scale: Tensor, swizzle: bool = False) -> tuple[Tensor, Tensor]:
    """x [M, K] -> packed uint8 [M, K/2], scales fp8 (linear [M, K/16] or 128x4 swizzled)."""
    _check_activation(x, global_scale)
    if x.device.type == "cuda":
        from .gpu_quant import quantize_nvfp4_gpu

        return quantize_nvfp4_gpu(x, global_scale, swizzle)
    from .reference import quantize as quantize_reference

    return quantize_reference(x, global_scale, swizzle)


@quantize.register_fake
def _(x: Tensor, global_scale: Tensor, swizzle: bool = False) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    packed = x.new_empty((m, k // 2), dtype=torch.uint8)
    if swizzle:
        shape = ((m + 127) // 128 * 128, (k // fmt.BLOCK_SIZE + 3) // 4 * 4)
    else:
        shape = (m, k // fmt.BLOCK_SIZE)
    return packed, x.new_empty(shape, dtype=torch.float8_e4m3fn)


@torch.library.custom_op("fp4::pad_k", mutates_args=())
def pad_k(packed: Tensor, k_padded: int) -> Tensor:
    """Zero-pad packed activations [M, K/2] to K = k_padded elements."""
    if k_padded // 2 < packed.shape[1] or k_padded % 2:
        raise ValueError(f"k_padded={k_padded} must be even and >= K={packed.shape[1] * 2}")
    padded = fmt.pad_activation_for_alignment(packed, k_padded)
    return padded.clone() if padded is packed else padded  # ops must not return an alias


@pad_k.register_fake
def _(packed: Tensor, k_padded: int) -> Tensor:
    return packed.new_empty((packed.shape[0], k_padded // 2))


@torch.library.custom_op("fp4::mm", mutates_args=())
def mm(
    a: Tensor,
    a_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    alpha: Tensor,
    out_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    """W4A4 GEMM on quantized operands: alpha * (a . weight^T) -> [M, padded N] in out_dtype."""
    if a.dtype != torch.uint8:
        raise TypeError(f"a must be packed uint8 NVFP4, got {a.dtype}")
    _check_weight(weight, weight_scale, alpha)
    fmt.check_same_device(a=a, a_scale=a_scale, weight=weight, weight_scale=weight_scale, alpha=alpha)
    return kernels_for(backend).mm(a, a_scale, weight, weight_scale, alpha, out_dtype)


@mm.register_fake
def _(a, a_scale, weight, weight_scale, alpha, out_dtype, backend):
    return a.new_empty((a.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fp4::linear", mutates_args=())
def linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_global_scale: Tensor,
    alpha: Tensor,
    bias: Tensor | None,
    out_features: int,
    backend: str,
) -> Tensor:
    """The fused NVFP4 linear: quantize x + pad + GEMM * alpha + slice + bias -> [M, out_features]."""
    _check_activation(x, input_global_scale)
    _check_weight(weight, weight_scale, alpha)
    fmt.check_same_device(x=x, weight=weight, weight_scale=weight_scale, alpha=alpha, bias=bias)
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    parse_backend(backend)
    out = kernels_for(backend).linear(x, weight, weight_scale, input_global_scale, alpha, bias, out_features)
    return out.contiguous()  # the fake kernel promises a contiguous [M, N] (a sliced GEMM output is not)


@linear.register_fake
def _(x, weight, weight_scale, input_global_scale, alpha, bias, out_features, backend):
    return x.new_empty((x.shape[0], out_features))
