"""NVFP4 weight GEMMs in Triton for sm_80+ (Hopper first): W4A4 (exact emulation) and W4A16.

One kernel, ``_fp4_gemm_kernel``, computes ``out[m, n] = alpha * sum_k a[m, k] * w[n, k] (+ bias)``
with fp32 accumulation, where ``w`` are NVFP4 weights decoded in registers to the exact
values ``e2m1 * sf * 2^-8`` (bf16 or fp16; the 2^8 goes into alpha) and ``a`` is one of
  A_MODE 0: float activations used as they are (W4A16, or W4A4 on pre-quantized block values),
  A_MODE 1: float activations quantized to NVFP4 block values inside the kernel (W4A4, small M),
  A_MODE 2: NVFP4 activation codes + linear block scales (``fp4::mm``).

Weight layout (``prepare_weight`` in hopper.py, ``weight_layout.py``): uint8 ``[Np, Kp/2]`` with N
padded to a multiple of 32 and K of 256; each 4-byte word holds 8 codes with their bits placed so that 8
integer instructions turn the word into four bf16x2 patterns ``e2m1 * 2^-126``, and one
``fma.rn.bf16x2`` per pair applies ``sf * 2^118`` (no LUT, no overflow: 448 * 2^118 < 2^128).
Scales: fp8 e4m3 ``[Np, Kp/16]``, zero padded. Both are tiled (``tiled_offsets``). Under TRITON_INTERPRET=1
(no inline asm) the same placement is computed in int64 and read back as codes; both paths give
identical values.

Small M (<= 16) runs weights as the MMA's M side (``tl.dot(w, x^T)``, tokens padded to 16)
with split-K; partial tiles go to an fp32 workspace and the last program of each tile (an
atomic ticket, self-resetting) reduces them and runs the epilogue: one launch, graph-safe.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

from ..format import round_up
from . import cublaslt, nvcc
from . import weight_layout as WL
from .split_tickets import split_tickets
from .triton_launch import launch_triton
from .triton_quant import (_e2m1_value, _e4m3_value, _fake_quant, cdiv, check_device, gdc_wait, interpreting,
                           next_power_of_2, pdl_launch_args)

W_SHIFT = 8  # decoded weights are e2m1 * sf * 2^-W_SHIFT (keeps sf * 2^(126-8) inside bf16)


def _asm_word(fp16: bool) -> str:
    """PTX: one 32-bit word ($4, 8 codes) + its two block scales ($5: e4m3 bytes lo | hi << 8) -> 4 x2 pairs.

    Scales: ``cvt.rn.f16x2.e4m3x2`` (exact, subnormals and NaN included), then sf * 2^6 in fp16, or
    sf * 2^118 in bf16 (through fp32), broadcast to both lanes. Codes: the bit placement of
    ``weight_layout.place_bf16`` (the sign to bit 15 of a lane, the 3 magnitude bits to the lowest
    exponent bits / top mantissa bit: e2m1 * 2^-126 in bf16; fp16 moves the magnitude up 3 bits:
    e2m1 * 2^-14); one x2 multiply (fma with -0) by the scale makes the exact value e2m1 * sf * 2^-8.
    """
    fma = "fma.rn.f16x2" if fp16 else "fma.rn.bf16x2"
    lines = ["{", ".reg .b32 s0, s1, z, t, lo, hi, h;", ".reg .b64 p;", ".reg .b16 sl, sh;", ".reg .f32 f0, f1;",
             "mov.b32 {sl, sh}, $5;", "cvt.rn.f16x2.e4m3x2 h, sl;", "mov.b32 z, 0x80008000;"]
    if fp16:
        lines += ["mov.b32 t, 0x54005400;", "mul.rn.f16x2 h, h, t;",  # * 64
                  "prmt.b32 s0, h, h, 0x1010;", "prmt.b32 s1, h, h, 0x3232;"]
    else:
        lines += ["mov.b32 {sl, sh}, h;", "cvt.f32.f16 f0, sl;", "cvt.f32.f16 f1, sh;",
                  "mul.rn.f32 f0, f0, 0f7A800000;", "mul.rn.f32 f1, f1, 0f7A800000;",  # * 2^118
                  "cvt.rn.bf16x2.f32 s0, f0, f0;", "cvt.rn.bf16x2.f32 s1, f1, f1;"]
    for j, (out, sc) in enumerate((("$0", "s0"), ("$1", "s0"), ("$2", "s1"), ("$3", "s1"))):
        if j == 3:
            lines += [f"and.b32 t, $4, {WL.GROUP3_BITS:#010x};", f"mul.wide.u32 p, t, {WL.GROUP3_MULT};",
                      "mov.b64 {lo, hi}, p;", "or.b32 t, lo, hi;", f"and.b32 t, t, {WL.BF16_BITS:#010x};"]
            if fp16:
                lines.append(f"mul.lo.u32 t, t, {WL.FP16_MULT};")
        elif fp16:  # isolate, then one multiply shifts by s and adds the << 3 copy
            shift = WL.GROUP_SHIFTS[j]
            lines += [f"and.b32 t, $4, {WL.BF16_BITS >> shift:#010x};",
                      f"mul.lo.u32 t, t, {WL.FP16_MULT << shift};"]
        else:
            lines += [f"shl.b32 t, $4, {WL.GROUP_SHIFTS[j]};", f"and.b32 t, t, {WL.BF16_BITS:#010x};"]
        if fp16:
            lines.append(f"and.b32 t, t, {WL.FP16_BITS:#010x};")
        lines.append(f"{fma} {out}, t, {sc}, z;")
    lines.append("}")
    return "\n".join(lines)


_ASM_BF16 = tl.constexpr(_asm_word(False))
_ASM_FP16 = tl.constexpr(_asm_word(True))


@triton.jit
def _split16(r, cdt: tl.constexpr):
    """int32 holding two 16-bit floats -> (low, high) in cdt."""
    lo = (r & 0xFFFF).to(tl.int16).to(cdt, bitcast=True)
    hi = (r >> 16).to(tl.int16).to(cdt, bitcast=True)
    return lo, hi


_BF16_BITS = tl.constexpr(WL.BF16_BITS)
_SHIFT1 = tl.constexpr(WL.GROUP_SHIFTS[1])
_SHIFT2 = tl.constexpr(WL.GROUP_SHIFTS[2])
_GROUP3_BITS = tl.constexpr(WL.GROUP3_BITS)
_GROUP3_MULT = tl.constexpr(WL.GROUP3_MULT)


@triton.jit
def _placed_codes(v):
    """A placed bf16x2 bit pattern (int64, weight_layout.place_bf16) -> the two e2m1 codes (low, high lane)."""
    return ((v >> 6) & 7) | ((v >> 12) & 8), ((v >> 22) & 7) | ((v >> 28) & 8)


@triton.jit
def _decode_words(wq, sp, BN: tl.constexpr, BK: tl.constexpr, USE_ASM: tl.constexpr, IS_FP16: tl.constexpr):
    """Words int32 [BN, BK/32, 4] + scale pairs int32 [BN, BK/32, 1] (e4m3 bytes of k-blocks 2j | 2j+1 << 8)
    -> [BN, BK] values e2m1 * sf * 2^-8 in bf16 (fp16 if IS_FP16), natural k order."""
    if IS_FP16:
        cdt: tl.constexpr = tl.float16
    else:
        cdt: tl.constexpr = tl.bfloat16
    if USE_ASM:
        if IS_FP16:
            asm: tl.constexpr = _ASM_FP16
        else:
            asm: tl.constexpr = _ASM_BF16
        r0, r1, r2, r3 = tl.inline_asm_elementwise(
            asm=asm, constraints="=r,=r,=r,=r,r,r", args=[wq, tl.broadcast_to(sp, wq.shape)],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        l0, h0 = _split16(r0, cdt)
        l1, h1 = _split16(r1, cdt)
        l2, h2 = _split16(r2, cdt)
        l3, h3 = _split16(r3, cdt)
    else:
        scl_lo = _e4m3_value(sp & 0xFF) * 0.00390625  # 2^-8
        scl_hi = _e4m3_value((sp >> 8) & 0xFF) * 0.00390625
        w = wq.to(tl.int64) & 0xFFFFFFFF
        l0, h0 = _placed_codes(w & _BF16_BITS)
        l1, h1 = _placed_codes((w << _SHIFT1) & _BF16_BITS)
        l2, h2 = _placed_codes((w << _SHIFT2) & _BF16_BITS)
        p = (w & _GROUP3_BITS) * _GROUP3_MULT
        l3, h3 = _placed_codes(((p & 0xFFFFFFFF) | (p >> 32)) & _BF16_BITS)
        l0, h0 = (_e2m1_value(l0) * scl_lo).to(cdt), (_e2m1_value(h0) * scl_lo).to(cdt)
        l1, h1 = (_e2m1_value(l1) * scl_lo).to(cdt), (_e2m1_value(h1) * scl_lo).to(cdt)
        l2, h2 = (_e2m1_value(l2) * scl_hi).to(cdt), (_e2m1_value(h2) * scl_hi).to(cdt)
        l3, h3 = (_e2m1_value(l3) * scl_hi).to(cdt), (_e2m1_value(h3) * scl_hi).to(cdt)
    # pair (lo, hi) = columns (2t, 2t+1); r0..r3 = offsets 0, 8, 16, 24
    u01 = tl.join(tl.join(l0, h0), tl.join(l1, h1))  # [BN, J, 4(t), 2(e0), 2(e3)]
    u23 = tl.join(tl.join(l2, h2), tl.join(l3, h3))
    u = tl.join(u01, u23)  # [BN, J, t, e0, e3, e4]; k = 32j + 16 e4 + 8 e3 + 2t + e0
    u = tl.permute(u, (0, 1, 5, 4, 2, 3))
    return tl.reshape(u, [BN, BK])


@triton.jit
def tiled_offsets(rows, cols, row_len, PIECE: tl.constexpr):
    """Element offsets of (rows, cols) in a tiled weight view (``weight_layout.tile_rows``) whose rows hold
    ``row_len`` elements: each 16-row tile's PIECE-element row pieces are contiguous, tile by tile."""
    return (rows // 16) * (16 * row_len) + (cols // PIECE) * (16 * PIECE) + (rows % 16) * PIECE + cols % PIECE


@triton.jit
def _fp4_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, bias_ptr, alpha_ptr, gs_ptr, part_ptr, lock_ptr,
    M, N, K,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_om, stride_part, split_k,
    A_MODE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    IS_SPLIT: tl.constexpr, GROUP_M: tl.constexpr,
    DOT: tl.constexpr, SWAP: tl.constexpr, USE_ASM: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_FP16: tl.constexpr, W_EVICT: tl.constexpr, BMQ: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # launched with programmatic dependent launch (ops/pdl.py): wait for the kernel before
        gdc_wait()
    G: tl.constexpr = BK // 16
    if IS_FP16:
        cdt = tl.float16
    else:
        cdt = tl.bfloat16

    # tile indices (grouped order for L2 reuse of the weight tiles across M tiles)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    m_tiles = tl.cdiv(M, BM)
    width = GROUP_M * n_tiles
    group = pid // width
    first_m = group * GROUP_M
    gsize = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_n_safe = tl.where(n_mask, offs_n, 0)  # padded weight rows exist only up to Np

    kt_total = tl.cdiv(K, BK)
    kt_per = tl.cdiv(kt_total, split_k)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)

    g_ar = tl.arange(0, G)
    j_ar = tl.arange(0, BK // 32)
    e8 = tl.arange(0, 8)
    k_ar = tl.arange(0, BK)

    # weight rows (tiled views: code words 32, scale pairs 8 a tile row piece)
    w_n = offs_n_safe.to(tl.int64)[:, None]
    # activation rows actually loaded: BMQ = next_pow2(M) <= BM when one M tile covers M (small M:
    # the [BMQ, BK] tile is quantized once and broadcast to the BM >= 16 rows the MMA needs)
    offs_q = pid_m * BM + tl.arange(0, BMQ)
    q_mask = offs_q < M
    offs_q_safe = tl.where(q_mask, offs_q, 0)
    a_rows = a_ptr + offs_q_safe.to(tl.int64)[:, None] * stride_am
    if A_MODE == 2:
        as_rows = as_ptr + offs_q_safe.to(tl.int64)[:, None] * stride_asm
    if A_MODE == 1:
        gs = tl.load(gs_ptr)

    # weight words: [BN, BK/8] int32 per k-tile (16-byte vector loads), viewed as [BN, BK/32, 4]
    w_off2 = tl.arange(0, BK // 8)[None, :]

    if DOT:
        if SWAP:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)

    for kt in range(kt0, kt1):
        k0 = kt * BK
        # ---- weights: [BN, G, 8] bytes + [BN, G] scales -> [BN, BK] values * 2^-8
        # scale pairs: int16 [BN, BK/32] (blocks 2j, 2j+1 of each 32-element chunk)
        sp_ptrs = ws_ptr + tiled_offsets(w_n, (k0 // 32 + j_ar)[None, :], stride_wsn, 8)
        if EVEN_K:
            sp = tl.load(sp_ptrs, eviction_policy=W_EVICT)
        else:
            sp = tl.load(sp_ptrs, mask=((k0 // 32 + j_ar) < tl.cdiv(K, 32))[None, :], other=0, eviction_policy=W_EVICT)
        sp = (sp.to(tl.int32) & 0xFFFF)[:, :, None]
        wq_ptrs = w_ptr + tiled_offsets(w_n, k0 // 8 + w_off2, stride_wn, 32)
        if EVEN_K:
            wq = tl.load(wq_ptrs, eviction_policy=W_EVICT)
        else:
            # the weight is zero-padded in K: load whole 32-element chunks
            wq = tl.load(wq_ptrs, mask=(k0 + 8 * w_off2) < tl.cdiv(K, 32) * 32, other=0, eviction_policy=W_EVICT)
        wq = tl.reshape(wq, [BN, BK // 32, 4])
        w = _decode_words(wq, sp, BN, BK, USE_ASM, IS_FP16)

        # ---- activations: [BM, BK] in the compute dtype
        if A_MODE == 2:
            if EVEN_K:
                ab = tl.load(a_rows[:, :, None] + k0 // 2 + (g_ar[None, :, None] * 8 + e8[None, None, :]),
                             mask=q_mask[:, None, None], other=0).to(tl.int32)
                asb = tl.load(as_rows + (k0 // 16 + g_ar)[None, :], mask=q_mask[:, None], other=0)
            else:
                kmask_g = (k0 // 16 + g_ar) < (K // 16)
                ab = tl.load(a_rows[:, :, None] + k0 // 2 + (g_ar[None, :, None] * 8 + e8[None, None, :]),
                             mask=q_mask[:, None, None] & kmask_g[None, :, None], other=0).to(tl.int32)
                asb = tl.load(as_rows + (k0 // 16 + g_ar)[None, :], mask=q_mask[:, None] & kmask_g[None, :],
                              other=0)
            asf = _e4m3_value(asb.to(tl.int32))[:, :, None]
            a_even = (_e2m1_value(ab & 15) * asf).to(cdt)
            a_odd = (_e2m1_value(ab >> 4) * asf).to(cdt)
            a = tl.reshape(tl.join(a_even, a_odd), [BMQ, BK])
        else:
            if EVEN_K:
                a = tl.load(a_rows + (k0 + k_ar)[None, :], mask=q_mask[:, None], other=0.0)
            else:
                a = tl.load(a_rows + (k0 + k_ar)[None, :], mask=q_mask[:, None] & ((k0 + k_ar) < K)[None, :],
                            other=0.0)
            if A_MODE == 1:
                a3 = tl.reshape(a.to(tl.float32), [BMQ, G, 16])
                a = tl.reshape(_fake_quant(a3, gs), [BMQ, BK]).to(cdt)
            else:
                a = a.to(cdt)
        if BMQ < BM:
            a = tl.reshape(tl.broadcast_to(tl.reshape(a, [1, BMQ, BK]), [BM // BMQ, BMQ, BK]), [BM, BK])

        # ---- MMA (or FMA GEMV for one row)
        if DOT:
            if SWAP:
                acc = tl.dot(w, tl.trans(a), acc)
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        else:
            acc2 += w.to(tl.float32) * a.to(tl.float32)

    if DOT:
        if SWAP:
            res = tl.trans(acc)  # [BM, BN]
        else:
            res = acc
    else:
        res = tl.reshape(tl.sum(acc2, axis=1), [1, BN])  # BM == 1

    out_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    alpha = tl.load(alpha_ptr) * 256.0  # 2^W_SHIFT
    if not IS_SPLIT:
        o = res * alpha
        if HAS_BIAS:
            o += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # split-K: partial to the workspace, ticket; the last program reduces + epilogue
        p_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k.to(tl.int64) * stride_part + p_off, res, mask=out_mask)
        tl.debug_barrier()
        tile = pid_m * n_tiles + pid_n
        ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if ticket == split_k - 1:
            tot = tl.zeros([BM, BN], dtype=tl.float32)
            for s in range(split_k):
                tot += tl.load(part_ptr + s * stride_part + p_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            o = tot * alpha
            if HAS_BIAS:
                o += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


# ---------------------------------------------------------------------------------------
# configs: a table by M bucket and shape (no autotuning at call time, graph-capture safe)


@dataclass(frozen=True)
class GemmConfig:
    BM: int
    BN: int
    BK: int
    SPLIT_K: int = 0  # 0: choose from the grid size
    num_warps: int = 4
    num_stages: int = 3
    DOT: bool = True
    SWAP: bool = True
    GROUP_M: int = 8


NUM_SMS_DEFAULT = 132


def m_bucket(m: int) -> str:
    if m <= 1:
        return "1"
    if m <= 16:
        return "2-16"
    if m <= 64:
        return "17-64"
    if m <= 256:
        return "65-256"
    return ">256"


# Defaults per bucket (mode-independent). Shape-specific tuned entries override them:
# TUNED[(mode, bucket, N, K)] = GemmConfig(...), filled from benchmarks/tune.py results on H100.
DEFAULTS: dict[str, GemmConfig] = {
    "1": GemmConfig(BM=16, BN=64, BK=256, num_warps=4, num_stages=4),
    "2-16": GemmConfig(BM=16, BN=64, BK=256, num_warps=4, num_stages=4),
    "17-64": GemmConfig(BM=64, BN=128, BK=64, num_warps=4, num_stages=4),
    "65-256": GemmConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
    ">256": GemmConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=4, SPLIT_K=1),
}
TUNED: dict[tuple[str, str, int, int], GemmConfig] = {}

# W4A4 linear quantizes activations inside the GEMM up to this M; above it one quant
# kernel writes the exact block values (fp16) once and the W4A16 mainloop consumes them.
FUSED_QUANT_MAX_M = 16


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (cached; NUM_SMS_DEFAULT without CUDA)."""
    try:
        return torch.cuda.get_device_properties(index).multi_processor_count
    except Exception:  # noqa: BLE001 - interpreter / no CUDA
        return NUM_SMS_DEFAULT


@functools.lru_cache(maxsize=None)
def dram_bytes_per_s(index: int) -> float:
    """Peak DRAM bandwidth of CUDA device ``index`` from its memory clock and bus width (cached; 0.0 where
    torch does not report them, or without CUDA): an H100 SXM 3.35e12, an H200 4.8e12."""
    try:
        props = torch.cuda.get_device_properties(index)
        return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8  # double data rate; clock in kHz
    except Exception:  # noqa: BLE001 - no CUDA, or a torch without these fields
        return 0.0


def pick_config(mode: str, m: int, n: int, k: int, device: torch.device | None = None) -> GemmConfig:
    """The config for a call: the tuned table entry, else the bucket default; split-K resolved."""
    return _pick_config(mode, m_bucket(m), m, n, k, num_sms(device.index or 0) if device is not None
                        and device.type == "cuda" else NUM_SMS_DEFAULT)


@functools.lru_cache(maxsize=4096)
def _pick_config(mode: str, bucket: str, m: int, n: int, k: int, sms: int) -> GemmConfig:
    cfg = TUNED.get((mode, bucket, n, k)) or DEFAULTS[bucket]
    if interpreting():
        cfg = replace(cfg, BM=min(cfg.BM, 16), BN=min(cfg.BN, 32), BK=min(cfg.BK, 64), num_stages=1)
    if cfg.BM > 16 and m <= 16 and not interpreting():
        cfg = replace(cfg, BM=16)
    if not cfg.DOT and m > 1:
        cfg = replace(cfg, DOT=True, BM=16)
    return resolve_split(cfg, m, n, k, sms)


def resolve_split(cfg: GemmConfig, m: int, n: int, k: int, sms: int = NUM_SMS_DEFAULT,
                  waves: float = 1.5) -> GemmConfig:
    """Split-K factor for ``cfg.SPLIT_K == 0``: fill the SMs ``waves`` times, >= 4 k-tiles per split."""
    if cfg.SPLIT_K:
        return cfg
    bm = cfg.BM if cfg.DOT else 1
    tiles = cdiv(m, bm) * cdiv(n, cfg.BN)
    k_tiles = cdiv(k, cfg.BK)
    # fp32 partials (split * M * N * 4 bytes, written and read back) stay under the weight
    # bytes (N * K * 9/16): on H100 larger splits at M = 64..128 cost more than the idle SMs
    # they fill (benchmarks/NOTES.md: S4 best at M = 64 and 128 on 4096x4096, S8/S16 slower)
    cap = max(1, (k * 9) // (16 * 4 * max(m, 1)))
    split = 1
    while tiles * split < waves * sms and k_tiles // (split * 2) >= 4 and split * 2 <= min(cap, 32):
        split *= 2
    return replace(cfg, SPLIT_K=split)


# ---------------------------------------------------------------------------------------
# launcher

MODES = ("w4a4", "w4a16", "mm")


def fp4_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    alpha: torch.Tensor,
    *,
    n: int,
    k: int,
    a_mode: int,
    out_dtype: torch.dtype,
    a_scale: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    config: GemmConfig | None = None,
    mode: str = "w4a16",
    use_asm: bool | None = None,
    return_kernel: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """out [M, n] = alpha * a @ w^T (+ bias). ``a`` [M, k] float (A_MODE 0/1) or uint8 [M, >=k/2] (2)."""
    m = a.shape[0]
    dev = a.device
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=dev)
    elif out.shape != (m, n) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major {out_dtype} [{m}, {n}] tensor")
    if m == 0 or n == 0:
        return (out, None) if return_kernel else out
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return (out, None) if return_kernel else out
    interp = interpreting()
    if use_asm is None:
        use_asm = default_use_asm(dev)
    cfg = config if config is not None else pick_config(mode, m, n, k, dev)
    if cfg.SPLIT_K == 0:
        cfg = resolve_split(cfg, m, n, k, NUM_SMS_DEFAULT if interp else num_sms(dev.index or 0))
    if not cfg.DOT and m != 1:
        raise ValueError("the FMA (DOT=False) path handles one row only")
    bm = 1 if not cfg.DOT else cfg.BM
    bmq = bm if m > bm else min(bm, next_power_of_2(m))
    split = cfg.SPLIT_K
    m_tiles = cdiv(m, bm)
    n_tiles = cdiv(n, cfg.BN)
    dummy = out
    part = locks = dummy
    if split > 1:
        part = torch.empty((split, m, n), dtype=torch.float32, device=dev)
        locks = split_tickets(dev, m_tiles * n_tiles)
    if a.stride(-1) != 1:
        a = a.contiguous()
    if weight.dtype != torch.int32:
        weight = weight.view(torch.int32)
    if weight_scale.dtype != torch.int16:
        weight_scale = weight_scale.view(torch.uint8).view(torch.int16)  # scale pairs of 32-element chunks
    if a_scale is not None and a_scale.dtype != torch.uint8:
        a_scale = a_scale.view(torch.uint8)
    even_k = k % cfg.BK == 0
    grid = (m_tiles * n_tiles, split)
    kernel = launch_triton(_fp4_gemm_kernel, grid,
        a, a_scale if a_scale is not None else dummy, weight, weight_scale, out,
        bias if bias is not None else dummy, alpha, global_scale if global_scale is not None else dummy,
        part, locks,
        m, n, k,
        a.stride(0), a_scale.stride(0) if a_scale is not None else 0, weight.stride(0), weight_scale.stride(0),
        out.stride(0), m * n, split,
        A_MODE=a_mode, BM=bm, BN=cfg.BN, BK=cfg.BK, IS_SPLIT=split > 1, GROUP_M=cfg.GROUP_M,
        DOT=cfg.DOT, SWAP=cfg.SWAP, USE_ASM=use_asm, EVEN_K=even_k, HAS_BIAS=bias is not None,
        IS_FP16=compute_dtype == torch.float16, W_EVICT="evict_first" if m <= 64 else "", BMQ=bmq,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        # PDL for W4A16 only: 0.97-0.99x at M = 16..64 on an H100, but after the quantization kernel
        # (which lets its dependents launch at once) 1.10-1.19x slower (benchmarks/NOTES.md, v9)
        **(pdl_launch_args(dev) if mode == "w4a16" else {"PDL": False}),
    )
    if return_kernel:
        return out, kernel
    return out


# ---------------------------------------------------------------------------------------
# large M: dequantize the weight once per call (exact values, bf16/fp16) and use cuBLAS


@triton.jit
def _dequant_weight_kernel(w_ptr, ws_ptr, out_ptr, N, K, stride_wn, stride_wsn, stride_on,
                           BN: tl.constexpr, BK: tl.constexpr, USE_ASM: tl.constexpr, IS_FP16: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    rows = tl.where(n_mask, offs_n, 0).to(tl.int64)
    k0 = pid_k * BK
    j_ar = tl.arange(0, BK // 32)
    kc = tl.cdiv(K, 32)
    sp = tl.load(ws_ptr + tiled_offsets(rows[:, None], (k0 // 32 + j_ar)[None, :], stride_wsn, 8),
                 mask=((k0 // 32 + j_ar) < kc)[None, :], other=0)
    sp = (sp.to(tl.int32) & 0xFFFF)[:, :, None]
    w_off = tl.arange(0, BK // 8)[None, :]
    wq = tl.load(w_ptr + tiled_offsets(rows[:, None], k0 // 8 + w_off, stride_wn, 32), mask=(k0 + 8 * w_off) < kc * 32,
                 other=0)
    w = _decode_words(tl.reshape(wq, [BN, BK // 32, 4]), sp, BN, BK, USE_ASM, IS_FP16)
    k_ar = k0 + tl.arange(0, BK)
    w = w.to(tl.float32) * 256.0  # undo the decode's 2^-8 (exact): cuBLASLt then takes alpha as it is
    tl.store(out_ptr + rows[:, None] * stride_on + k_ar[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (k_ar < K)[None, :])


@functools.lru_cache(maxsize=None)
def _has_e4m3_cvt(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def default_use_asm(device: torch.device) -> bool:
    """The inline-PTX decode needs ``cvt.rn.f16x2.e4m3x2`` (sm_89+); sm_80/86 use the arithmetic one."""
    if interpreting() or os.environ.get("FP4_TRITON_NO_ASM", "0") == "1":
        return False
    return _has_e4m3_cvt(nvcc.device_index(device))


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor, n: int, k: int,
                      dtype: torch.dtype = torch.bfloat16, use_asm: bool | None = None) -> torch.Tensor:
    """[n, k] exact values e2m1 * sf (no 1/gs) of a prepared weight, in bf16 or fp16."""
    if use_asm is None:
        use_asm = default_use_asm(weight.device)
    if weight.dtype != torch.int32:
        weight = weight.view(torch.int32)
    if weight_scale.dtype != torch.int16:
        weight_scale = weight_scale.view(torch.uint8).view(torch.int16)
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    bn, bk = (16, 64) if interpreting() else (64, 256)
    grid = (cdiv(n, bn), cdiv(k, bk))
    launch_triton(_dequant_weight_kernel, grid, weight, weight_scale, out, n, k, weight.stride(0),
                  weight_scale.stride(0), out.stride(0), BN=bn, BK=bk, USE_ASM=use_asm, IS_FP16=dtype == torch.float16,
                  num_warps=4)
    return out


def dequant_mm(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, *,
               n: int, k: int, out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large-M path: out = (a @ dequant(w)^T) * alpha (+ bias), the weight dequantized once per call.

    ``a`` holds exact operand values in bf16 or fp16 (activations for W4A16, NVFP4 block values
    for W4A4); the weight is dequantized to the same type. With cuBLASLt (``cublaslt.py``) alpha,
    a device scalar, and the bias are applied in the GEMM's fp32 epilogue: one rounding, like the
    fused kernels. Without it, torch.mm rounds to ``a.dtype`` before alpha and bias (see use_dequant).
    Returns [M, n], a view of a wider result where cuBLASLt needed N padded for the bias.
    """
    use_cublaslt = cublaslt.available(a.device)
    # cuBLASLt's bias with a 16-bit output: N padded with the weight's zero rows and a zero bias
    padded = use_cublaslt and bias is not None and out_dtype != torch.float32
    rows = round_up(n, cublaslt.BIAS_N_MULTIPLE) if padded else n
    wd = dequantize_weight(weight, weight_scale, rows, k, a.dtype)
    if use_cublaslt:
        if rows != n:
            bias = torch.nn.functional.pad(bias.reshape(n), (0, rows - n))
        return cublaslt.gemm_alpha(a, wd, alpha, out_dtype=out_dtype, bias=bias)[:, :n]
    out = torch.mm(a, wd.t()).mul_(alpha)
    if bias is not None:
        out = out.add_(bias)
    return out.to(out_dtype)


def load_tuned(source: str | os.PathLike | dict) -> int:
    """Fill TUNED (and the path thresholds) from a benchmarks/tune.py result (a path or its dict)."""
    import json

    global FUSED_QUANT_MAX_M, DEQUANT_MIN_M
    if isinstance(source, dict):
        data = source
    else:
        with open(source) as f:
            data = json.load(f)
    cnt = 0
    for key, rec in sorted(data.get("best", {}).items(), key=lambda kv: kv[1]["m"]):
        mode, n, k, m = rec["mode"], rec["n"], rec["k"], rec["m"]
        cfg = dict(rec["cfg"])
        if m <= 16:
            cfg["SPLIT_K"] = cfg.get("SPLIT_K", 0)
        TUNED[(mode, m_bucket(m), n, k)] = GemmConfig(**cfg)
        cnt += 1
    th = data.get("thresholds", {})
    FUSED_QUANT_MAX_M = int(th.get("fused_quant_max_m", FUSED_QUANT_MAX_M))
    DEQUANT_MIN_M = int(th.get("dequant_min_m", DEQUANT_MIN_M))
    DEQUANT_SHAPES.update({tuple(x) for x in th.get("dequant_shapes", [])})
    if data.get("quant_config"):
        from . import triton_quant

        triton_quant.QUANT_CONFIG.update(data["quant_config"])
    _pick_config.cache_clear()
    return cnt


# M from which linear dequantizes the weight and calls cuBLAS (tuned; see NOTES.md); shapes listed
# in DEQUANT_SHAPES as (mode, bucket, n, k) use it in that bucket too.
DEQUANT_MIN_M = 1024
DEQUANT_SHAPES: set[tuple] = set()


def use_dequant(mode: str, m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | None = None) -> bool:
    """Large M. Without cuBLASLt, bf16 calls only: torch.mm's output is rounded before alpha (fp16
    could overflow there, fp16/fp32 callers would lose precision)."""
    if interpreting():
        return False
    if dtype != torch.bfloat16 and (device is None or not cublaslt.available(device)):
        return False
    return m >= DEQUANT_MIN_M or (mode, m_bucket(m), n, k) in DEQUANT_SHAPES


def check_cuda(*tensors: torch.Tensor | None) -> None:
    check_device(*tensors, what="the triton-w4a4 / marlin kernels")


def _load_default_tables() -> None:
    try:
        from .tuned_h100 import TABLE

        load_tuned(TABLE)
    except Exception:  # noqa: BLE001 - a bad table must not break import; defaults apply
        pass
    path = os.environ.get("FP4_TUNED_JSON")
    if path and os.path.exists(path):
        load_tuned(path)


_load_default_tables()
