"""``silu(gate) * up`` as ``F.silu(gate) * up`` computes it (float math, the SiLU rounded to the
inputs' dtype, then the product): ``fp4::linear_silu_mul`` where the backend does not fuse it into
its GEMM. One Triton kernel on CUDA (one read of each input, one write; under TRITON_INTERPRET=1 on
any tensor), torch on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_quant import cdiv, interpreting

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, stride_gate, stride_up, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    out_type = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_type).to(tl.float32)  # F.silu's result, rounded
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_type), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for 2-D ``gate`` and ``up`` of one shape and floating dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() != 2 or not gate.dtype.is_floating_point:
        raise ValueError(f"gate and up must be 2-D floating tensors of one shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if gate.device.type != "cuda" and not interpreting():
        return torch.nn.functional.silu(gate) * up
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    up = up if up.stride(-1) == 1 else up.contiguous()
    m, n = gate.shape
    out = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    if m and n:
        _silu_mul_kernel[(m, cdiv(n, BLOCK))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                              BLOCK=BLOCK)
    return out
