"""The emulation backend: exact W4A4 in plain torch, on any device (the CPU included).

Activations are quantized with the reference of ``format.py``; both operands become
``e2m1 * float(sf)`` in float32 (exact), one float32 matmul, then ``alpha``. This is the
function every other backend is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import format as fmt


class EmulationKernels:
    """Linear weight layout, no padding; see :class:`fp4_compile.backends.BackendKernels`."""

    def prepare_weight(self, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return packed.contiguous(), scales.contiguous()

    def restore_weight(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int, in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return weight[:out_features, : in_features // 2], weight_scale[:out_features, : in_features // fmt.BLOCK_SIZE]

    def mm(
        self,
        a: torch.Tensor,
        a_scale: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        alpha: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):  # float32 under a caller's autocast too: exact
            acc = fmt.block_values(a, a_scale) @ fmt.block_values(weight, weight_scale).t()
        return (acc * alpha.reshape(())).to(out_dtype)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_global_scale: torch.Tensor,
        alpha: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
    ) -> torch.Tensor:
        return linear_by_steps(self, quantize, x, weight, weight_scale, input_global_scale, alpha, bias,
                               out_features, swizzle=False)


def linear_by_steps(
    kernels: Any,
    quantize_fn: Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_global_scale: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    *,
    swizzle: bool,
) -> torch.Tensor:
    """A fused linear made of a backend's quantize and mm: quantize, pad K, GEMM, slice N, bias.

    The same steps, in the same order, as the layer's unfused chain, so that a compiled
    (fused) model equals the eager one bit for bit on backends without a fused kernel.
    """
    a, a_scale = quantize_fn(x, input_global_scale, swizzle)
    a = fmt.pad_activation_for_alignment(a, weight.shape[1] * 2)
    out = fmt.slice_output(kernels.mm(a, a_scale, weight, weight_scale, alpha, x.dtype), out_features)
    return out if bias is None else out + bias


def quantize(x: torch.Tensor, global_scale: torch.Tensor, swizzle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference activation quantization of a 2-D ``x`` (no value checks: runs inside graphs)."""
    packed, scales = fmt.quantize_rows(x, global_scale)
    return packed, fmt.swizzle_blockscale(scales) if swizzle else scales


EMULATION = EmulationKernels()
