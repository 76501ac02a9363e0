"""NVFP4 activation quantization in Triton (sm_80+; runs under TRITON_INTERPRET=1 on CPU).

``launch_quant_triton(x2, global_scale, mode)`` computes exactly the function of
``fp4_compile.format.quantize_nvfp4`` (see shared NVFP4.md): per 16-element block
``sf = e4m3(min(gs * (amax * (1/6)), 448))`` rounded to nearest even (bit-exact, emulated
with integer ops so that it needs no fp8 hardware or interpreter support), a NaN scale
byte (0x7F) for blocks holding Inf/NaN, ``out_scale = sf == 0 ? 0 : 1 / (sf * (1/gs))``
and E2M1 round-to-nearest-even codes. The swizzled ("128x4") scale layout is written
whole, padding included (every padded byte zero), by the same kernel: no memset launch.
The public entry points are in ``gpu_quant.py``, which runs the CUDA kernel of ``cuda_quant.py``
instead where it can (sm_89/sm_90 with nvcc): same function, faster.

The ``@triton.jit`` helpers here (``_block_scales``, ``_e2m1_code``, ``_fake_quant``) are shared with the
fused W4A4 GEMM in ``triton_gemm.py``, which quantizes activation tiles in registers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..format import BLOCK_SIZE, swizzled_scale_shape
from .cuda_quant import MODE_LINEAR, MODE_SWIZZLED, MODE_VALUES
from .pdl import use_pdl
from .triton_launch import launch_triton

try:  # does this Triton launch with programmatic dependent launch (``launch_pdl``, gdc_*)?
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    TRITON_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # then the kernels' PDL branches are never compiled (PDL=False)
    gdc_launch_dependents = gdc_wait = None
    TRITON_PDL = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side integer helpers for launch grids: triton.cdiv and triton.next_power_of_2 are
# ConstexprFunction objects whose calls cost about 2 us each (measured), a few per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def check_device(*tensors: torch.Tensor, what: str = "this kernel") -> None:
    """Triton kernels run on CUDA tensors (or any tensor under TRITON_INTERPRET=1)."""
    if interpreting():
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise RuntimeError(
                f"{what} is a Triton GPU kernel (sm_80+) and got a tensor on {t.device}; "
                "use the 'emulation' backend (fp4_compile.ops.reference) on the CPU, "
                "or set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter"
            )


# ---------------------------------------------------------------------------------------
# shared jit helpers


@triton.jit
def _nanmax(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _block_scales(x3, gs):
    """x3 fp32 [R, G, 16] -> (sf_byte uint8 [R, G], sf fp32 [R, G], out_scale fp32 [R, G]).

    sf = e4m3(min(gs * (amax * (1/6)), 448)) with round-to-nearest-even, emulated:
    below 2^-6 (e4m3 subnormals, step 2^-9) by adding and subtracting 2^14; above by
    rounding the float32 bit pattern to 3 mantissa bits. Non-finite blocks get NaN (0x7F).
    """
    amax = tl.reduce(tl.abs(x3), 2, _nanmax)
    bad = ~(amax < float("inf"))  # NaN or Inf in the block
    v = tl.minimum(gs * (amax * 0.16666666666666666), 448.0)
    v = tl.where(bad, 0.0, v)
    # subnormal range: round to a multiple of 2^-9 (RNE) via the float adder
    sub = (v + 16384.0) - 16384.0
    bits = v.to(tl.int32, bitcast=True)
    rbits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # 0xFFF00000
    nrm = rbits.to(tl.float32, bitcast=True)
    small = v < 0.015625
    sf = tl.where(small, sub, nrm)
    e = ((rbits >> 23) & 0xFF) - 120
    nbyte = (e << 3) | ((rbits >> 20) & 7)
    sbyte = (sub * 512.0).to(tl.int32)
    byte = tl.where(small, sbyte, nbyte)
    byte = tl.where(bad, 0x7F, byte)
    sf = tl.where(bad, float("nan"), sf)
    inv_gs = tl.math.div_rn(1.0, gs)
    safe = tl.where(sf == 0.0, 1.0, sf * inv_gs)
    out_scale = tl.where(sf == 0.0, 0.0, tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe))
    return byte.to(tl.uint8), sf, out_scale


@triton.jit
def _scaled(x3, out_scale):
    """v = x * out_scale and its clamped magnitude a = min(|v|, 6) (fp32)."""
    v = x3 * out_scale[:, :, None]
    return v, tl.minimum(tl.abs(v), 6.0)


@triton.jit
def _e2m1_code(v, a):
    """E2M1 code 0..15 (int32) of a = min(|v|, 6) with the sign bit of v; round to nearest even.

    a >= 1: round the float32 bit pattern to one mantissa bit (code = biased exponent*2 + bit - 252);
    a < 1: 2a + 2^23 rounds 2a to an integer (0, 1, 2 = codes of 0, 0.5, 1.0).
    """
    bits = a.to(tl.int32, bitcast=True)
    big = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252
    small = (a * 2.0 + 8388608.0).to(tl.int32, bitcast=True) & 3
    mag = tl.where(a < 1.0, small, big)
    return mag | ((v.to(tl.int32, bitcast=True) >> 28) & 8)


@triton.jit
def _e2m1_signed_value(v, a):
    """The E2M1 value (fp32, RNE, with the sign of v) of a = min(|v|, 6)."""
    bits = a.to(tl.int32, bitcast=True)
    big = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) & -4194304).to(tl.float32, bitcast=True)  # 0xFFC00000
    small = ((a * 2.0 + 8388608.0) - 8388608.0) * 0.5
    mag = tl.where(a < 1.0, small, big)
    sign = v.to(tl.int32, bitcast=True) & -2147483648  # 0x80000000
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _fake_quant(x3, gs):
    """x3 fp32 [R, G, 16] -> exact NVFP4 block values e2m1 * sf (fp32, no 1/gs)."""
    _, sf, out_scale = _block_scales(x3, gs)
    v, a = _scaled(x3, out_scale)
    return _e2m1_signed_value(v, a) * sf[:, :, None]


# ---------------------------------------------------------------------------------------
# the quantization kernel



@triton.jit
def _quant_kernel(
    x_ptr, gs_ptr, q_ptr, s_ptr, v_ptr,
    M, KB, stride_xm, stride_qm, stride_sm, stride_vm,
    MP, KBP,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, MODE: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr = False,
):
    if PDL:  # launched with PDL (ops/pdl.py): wait for the kernel before
        gdc_wait()
        if EARLY:  # the kernel after us is our GEMM, which waits for our completion: it may launch now,
            # once the kernels before us have completed (it reads its weights before that wait:
            # cuda_small_m.dependent_launch_mode). A kernel launched after us without PDL is not affected; the
            # Triton GEMM, which measured up to 1.19x slower after this trigger with PDL, launches plainly.
            gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    e16 = tl.arange(0, 16)
    r3 = rows[:, None, None]
    g3 = groups[None, :, None]
    valid = (r3 < M) & (g3 < KB)
    x = tl.load(x_ptr + r3.to(tl.int64) * stride_xm + g3 * 16 + e16[None, None, :], mask=valid, other=0.0)
    x = x.to(tl.float32)
    gs = tl.load(gs_ptr)
    byte, sf, out_scale = _block_scales(x, gs)
    v, a = _scaled(x, out_scale)
    if MODE == 2:
        val = _e2m1_signed_value(v, a) * sf[:, :, None]
        tl.store(v_ptr + r3.to(tl.int64) * stride_vm + g3 * 16 + e16[None, None, :],
                 val.to(v_ptr.dtype.element_ty), mask=valid)
    else:
        code = _e2m1_code(v, a)
        lo, hi = tl.split(tl.reshape(code, [BLOCK_M, BLOCK_G, 8, 2]))
        packed = (lo | (hi << 4)).to(tl.uint8)
        e8 = tl.arange(0, 8)
        tl.store(q_ptr + r3.to(tl.int64) * stride_qm + g3 * 8 + e8[None, None, :], packed,
                 mask=(r3 < M) & (g3 < KB))
        r2 = rows[:, None]
        g2 = groups[None, :]
        if MODE == 0:
            tl.store(s_ptr + r2.to(tl.int64) * stride_sm + g2, byte, mask=(r2 < M) & (g2 < KB))
        else:
            off = ((r2 // 128) * (KBP // 4) + g2 // 4) * 512 + (r2 % 32) * 16 + ((r2 // 32) % 4) * 4 + g2 % 4
            tl.store(s_ptr + off.to(tl.int64), byte, mask=(r2 < MP) & (g2 < KBP))


QUANT_CONFIG: dict[str, int] = {"BLOCK_M": 8, "BLOCK_G": 16, "num_warps": 4}  # H100, benchmarks/NOTES.md


def pdl_launch_args(device: torch.device) -> dict:
    """Launch arguments of a Triton kernel whose ``PDL: tl.constexpr`` makes it wait for the kernel
    before (``gdc_wait``) before it touches memory: PDL on where ops/pdl.py and this Triton allow it."""
    pdl = TRITON_PDL and not interpreting() and use_pdl(device)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


def _quant_blocks(m: int, kb: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_G, num_warps) for the quant kernel."""
    if interpreting():
        return 4, 4, 1
    cfg = QUANT_CONFIG
    block_g = cfg["BLOCK_G"] if kb >= cfg["BLOCK_G"] else next_power_of_2(kb)
    block_m = cfg["BLOCK_M"] if m >= cfg["BLOCK_M"] else next_power_of_2(m)
    return block_m, block_g, cfg["num_warps"]


def launch_quant_triton(x2: torch.Tensor, gs: torch.Tensor, mode: int, out_dtype: torch.dtype | None = None,
                        early_trigger: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton quant kernel on ``x2 [M, K]`` (see gpu_quant.py for the public functions).
    ``early_trigger``: as ``cuda_quant.quantize``'s."""
    m, k = x2.shape
    kb = k // BLOCK_SIZE
    dev = x2.device
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    gs = gs.reshape(1)
    if gs.dtype != torch.float32:
        raise TypeError(f"global_scale must be float32, got {gs.dtype}")
    bm, bg, warps = _quant_blocks(m, kb)
    mp, kbp = m, kb
    # the outputs a mode does not write are passed as one it does (never dereferenced: MODE is constexpr)
    if mode == MODE_VALUES:
        q = s = v = torch.empty((m, k), dtype=out_dtype or x2.dtype, device=dev)
    else:
        q = v = torch.empty((m, k // 2), dtype=torch.uint8, device=dev)
        if mode == MODE_SWIZZLED:
            mp, kbp = swizzled_scale_shape(m, k)
            s = torch.empty((mp, kbp), dtype=torch.uint8, device=dev)
        else:
            s = torch.empty((m, kb), dtype=torch.uint8, device=dev)
    grid = (cdiv(mp, bm), cdiv(kbp, bg))
    if m == 0 or k == 0:
        grid = (0, 0) if mode != MODE_SWIZZLED else grid
    if grid[0] > 0 and grid[1] > 0:
        launch_triton(_quant_kernel, grid,
            x2, gs, q, s, v,
            m, kb, x2.stride(0), q.stride(0), s.stride(0), v.stride(0),
            mp, kbp,
            BLOCK_M=bm, BLOCK_G=bg, MODE=mode, EARLY=early_trigger, num_warps=warps, **pdl_launch_args(dev),
        )
    if mode == MODE_VALUES:
        return v
    return q, s.view(torch.float8_e4m3fn)


@triton.jit
def _e2m1_value(code):
    """E2M1 code (int32, 0..15) -> value (fp32), arithmetic (no table)."""
    mag = code & 7
    sh = tl.maximum((mag >> 1) - 1, 0)
    v2 = tl.where(mag < 2, mag, (2 + (mag & 1)) << sh)  # 2 * |value|
    val = v2.to(tl.float32) * 0.5
    return tl.where((code & 8) != 0, -val, val)


@triton.jit
def _e4m3_value(b):
    """fp8 e4m3 byte (int32) -> fp32 value, NaN for 0x7F/0xFF (arithmetic, interpreter-safe)."""
    e = (b >> 3) & 15
    m = b & 7
    nrm = (8 + m).to(tl.float32) * ((e + 117) << 23).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    v = tl.where(e == 0, sub, nrm)
    v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
    return tl.where((b & 0x80) != 0, -v, v)


@triton.jit
def _dequant_codes_kernel(q_ptr, s_ptr, v_ptr, M, KB, stride_qm, stride_sm, stride_vm,
                          BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    r3 = rows[:, None, None]
    g3 = groups[None, :, None]
    valid = (r3 < M) & (g3 < KB)
    e8 = tl.arange(0, 8)
    b = tl.load(q_ptr + r3.to(tl.int64) * stride_qm + g3 * 8 + e8[None, None, :], mask=valid, other=0).to(tl.int32)
    sb = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_sm + groups[None, :],
                 mask=(rows[:, None] < M) & (groups[None, :] < KB), other=0).to(tl.int32)
    sf = _e4m3_value(sb)[:, :, None]
    lo = _e2m1_value(b & 15) * sf
    hi = _e2m1_value(b >> 4) * sf
    v = tl.reshape(tl.join(lo, hi), [BLOCK_M, BLOCK_G, 16])
    e16 = tl.arange(0, 16)
    tl.store(v_ptr + r3.to(tl.int64) * stride_vm + g3 * 16 + e16[None, None, :], v.to(v_ptr.dtype.element_ty),
             mask=valid)


def dequantize_codes_triton(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed NVFP4 codes [M, K/2] + linear scales [M, K/16] -> exact block values e2m1*sf [M, K] in dtype."""
    m, k = packed.shape[0], packed.shape[1] * 2
    kb = k // BLOCK_SIZE
    scales = scales.reshape(m, kb)
    if scales.dtype != torch.uint8:
        scales = scales.view(torch.uint8)
    out = torch.empty((m, k), dtype=dtype, device=packed.device)
    bm, bg = (4, 4) if interpreting() else (8, 16)
    if m and k:
        launch_triton(_dequant_codes_kernel, (cdiv(m, bm), cdiv(kb, bg)),
            packed, scales, out, m, kb, packed.stride(0), scales.stride(0), out.stride(0),
            BLOCK_M=bm, BLOCK_G=bg, num_warps=4)
    return out


__all__ = ["launch_quant_triton", "dequantize_codes_triton", "interpreting", "check_device", "MODE_LINEAR",
           "MODE_SWIZZLED", "MODE_VALUES"]
