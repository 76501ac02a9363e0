"""``silu(gate) * up`` as ``F.silu(gate) * up`` computes it (float math, the SiLU rounded to the
inputs' dtype, then the product): ``fp4::linear_silu_mul`` where the backend does not fuse it into
its GEMM. On CUDA one read of each input and one write: the kernel of ``csrc/hopper/silu_mul.cu``
(bit for bit ATen's, launched through ctypes here and without Python by the C++ fast path of
``fast_linear``: host time bounds eager layers), else (no nvcc, sm other than 8.9/9.0,
``FP4C_CUDA_SILU_MUL=0``) a Triton kernel, which also runs under TRITON_INTERPRET=1 on any tensor; torch
on the CPU.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import torch
import triton
import triton.language as tl

from . import nvcc
from .cuda_quant import DTYPE_CODES, VALUE_DTYPES
from .pdl import use_pdl
from .triton_launch import launch_triton
from .triton_quant import cdiv, interpreting

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "silu_mul.cu"

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


@functools.lru_cache(maxsize=None)
def _library(capability: tuple[int, int]) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(nvcc.build_shared_library(SOURCE, nvcc.kernel_flags(capability),
                                                    f"silu_mul_sm{capability[0]}{capability[1]}")))
    fn = lib.fp4c_silu_mul
    fn.restype = ctypes.c_int
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, p, i64, p, i64, i32, i32, i32, i32, p]  # gate, ldg, up, ldu, out, ldo, dtype, M, N, pdl
    return lib


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why the CUDA kernel cannot run on this CUDA device (None: it can; built on the first call)."""
    return nvcc.unavailable_reason("CUDA silu_mul kernel", "FP4C_CUDA_SILU_MUL", device_index, _library)


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
    if not (m and n):
        return out
    if (gate.device.type == "cuda" and gate.dtype in VALUE_DTYPES
            and unavailable_reason(nvcc.device_index(gate.device)) is None):
        err = nvcc.launch_on(gate.device, lambda capability, stream: _library(capability).fp4c_silu_mul(
            gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), out.stride(0),
            DTYPE_CODES[gate.dtype], m, n, int(use_pdl(gate.device)), stream))
        if err != 0:
            raise RuntimeError(f"fp4c_silu_mul failed: CUDA error {err} (M={m}, N={n}, {gate.dtype})")
    else:
        launch_triton(_silu_mul_kernel, (m, cdiv(n, BLOCK)), gate, up, out, n, gate.stride(0), up.stride(0),
                      out.stride(0), BLOCK=BLOCK)
    return out
