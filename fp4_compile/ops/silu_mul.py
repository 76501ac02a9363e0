"""``silu(gate) * up`` as ``F.silu(gate) * up`` computes it (float math, the SiLU rounded to the
inputs' dtype, then the product), and optionally the exact NVFP4 block values of that product:
``fp4::linear_silu_mul`` where the backend does not fuse it into its GEMM. One Triton kernel on CUDA (one
read of each input, one write; under TRITON_INTERPRET=1 on any tensor), torch on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import format as fmt
from .triton_quant import _fake_quant, cdiv, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch_args

BLOCK = 1024  # elements of a row per program: 64 NVFP4 blocks


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, gs_ptr, n, stride_gate, stride_up, stride_out,
                     BLOCK: tl.constexpr, QUANTIZE: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (as rms_norm_quant.py's kernel: wait for the kernel before, then let the next one launch)
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)
    # [BLOCK / 16, 16]: one NVFP4 block per row of the tile
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK // 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = cols < n
    out_type = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_type).to(tl.float32)  # F.silu's result, rounded
    out = (act * up).to(out_type)
    if QUANTIZE:  # the product's exact block values (n is a multiple of 16: masked blocks are whole)
        out = tl.reshape(_fake_quant(tl.expand_dims(out.to(tl.float32), 0), tl.load(gs_ptr)),
                         (BLOCK // 16, 16)).to(out_type)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.silu(gate) * up`` for 2-D ``gate`` and ``up`` of one shape and floating dtype; with ``global_scale``
    (one float32 element) the exact NVFP4 block values ``e2m1 * sf`` of it (``format.quantize_nvfp4``, without
    ``1/gs``), in the same dtype (N a multiple of 16)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() != 2 or not gate.dtype.is_floating_point:
        raise ValueError(f"gate and up must be 2-D floating tensors of one shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    m, n = gate.shape
    if global_scale is not None and n % fmt.BLOCK_SIZE:
        raise ValueError(f"N={n} must be a multiple of {fmt.BLOCK_SIZE} to quantize silu(gate) * up")
    if gate.device.type != "cuda" and not interpreting():
        out = torch.nn.functional.silu(gate) * up
        if global_scale is not None:
            out = fmt.block_values(*fmt.quantize_nvfp4(out, global_scale.reshape(1).float())).to(out.dtype)
        return out
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    up = up if up.stride(-1) == 1 else up.contiguous()
    out = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    if m and n:
        gs = global_scale.reshape(1).float() if global_scale is not None else out
        _silu_mul_kernel[(m, cdiv(n, BLOCK))](gate, up, out, gs, n, gate.stride(0), up.stride(0), out.stride(0),
                                              BLOCK=BLOCK, QUANTIZE=global_scale is not None,
                                              **pdl_launch_args(gate.device))
    return out
