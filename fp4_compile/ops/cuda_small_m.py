"""The CUDA C++ small-M (decode) GEMM of ``csrc/hopper/nvfp4_small_m.cu``: build, load, launch.

Built on first use with nvcc into a plain shared library (no torch headers: about 5 s instead of
a minute, and one binary serves every torch version) and called through ctypes on the current
stream, so it is captured by CUDA graphs like any kernel. ``FP4C_SMALL_M_KERNEL=0`` turns it
off (the Triton kernels then take small M too); any build or load failure does the same, once,
with a warning naming the cause.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import torch

from ..format import check_same_device, round_up
from . import cuda_quant, nvcc
from .nvcc import build_shared_library, kernel_flags, shared_library_command
from .pdl import use_pdl
from .triton_gemm import NUM_SMS_DEFAULT, dram_bytes_per_s, num_sms
from .triton_quant import cdiv
from .weight_layout import CHUNK, tiled_weight_problem


SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "nvfp4_small_m.cu"
MAX_M = 16
# Measured on an H100 (bench_small_m.py, NOTES.md v4 and v5): the kernel beats the Triton kernels at
# M <= 8 for every N timed (1024..28672); at M = 9..16 (two MMA n-tiles, the activations re-read
# from L2 for every 16 weight rows) only at N = 1024, where Triton has few tiles to split.
DISPATCH_MAX_M = 8
DISPATCH_MAX_M_SMALL_N = 16
SMALL_N = 1024
# W4A4 gives the kernel the activations as codes (cuda_quant.MODE_KERNEL_CODES: 0.5625 bytes per value
# instead of 2) from M = 8: each CTA reads all M x K activations from L2, which from there on costs
# more than the decode of the codes. H100 (bench_small_m.py, NOTES.md v15), us against the kernel on
# block values at M = 8: 28672x4096 32.0 / 36.4, 4096x4096 8.4 / 8.8; at M = 4 the block values are
# faster (7.8 / 8.3 at 4096x4096). At M = 9..16 (two n8-tiles) against Triton: faster at N = 4096 and
# 6144 (M=16: 9.7 / 12.3, 12.1 / 14.5), slower at N = 28672 (40.2 / 38.9): up to CODES_TWO_TILES_MAX_N.
CODES_MIN_M = 8
CODES_TWO_TILES_MAX_N = 8192
# A group of linears on bf16/fp16 activations at M = 9..16 (where the kernel re-reads them for every
# 16 weight rows) in one launch up to this many rows in all. H100, K = 4096 (bench_group.py, NOTES.md v21),
# us, one launch / the members' own calls: q/k/v (6144 rows) 12.9-14.8 / 21.5-23.6, gate/up (28672)
# 48-54 / 39.5.
VALUES_GROUP_MAX_ROWS = 8192
# fp4::linear_silu_mul's gated launch (gate and up rows in one CTA, SiLU*mul in the epilogue) on activation
# codes from this M: at M = 8 (one n8-tile) it took longer than the codes group and a silu_mul kernel
# after it (H100, gate/up 2 x 14336 x 4096, bench_group.py, NOTES.md v22: 34.3 / 35.2 us against 32.7 /
# 32.4, two runs), at M = 12..16 as long (44.0-45.2 against 44.3-45.6); on bf16 activations or block values
# it was faster at M = 1, 4 and 8 (W4A16 M=8: 35.2-35.5 against 37.7-38.4).
GATED_CODES_MIN_M = 9
# Warps per CTA (they split K): the fastest count measured was the largest that keeps the grid one wave
# of resident warps, 16 per SM at the kernel's ~110 registers (H100, M = 1, 4, 8, NOTES.md v18e:
# 28672x4096 1 warp, 28.7 us against 29.1 with 4 and 32.5 with 8; 14336x4096 2 warps, 15.2 against
# 15.8 with 4; 6144x4096 4; 4096x4096 and 4096x14336 8 (256 CTAs)). More warps per CTA shorten each
# warp's stream of loads; more CTAs than fit run in waves whose last one idles SMs. On activation codes
# (where each warp also decodes the activations) that rule lost at 28672x4096 M=8 (1 warp 34.6 us, 4
# warps 32.3): there 8 warps up to N = 4096, else 4, the best or within 1.3% of it on six shapes.
RESIDENT_WARPS_PER_SM = 16
WARP_CHOICES = (8, 4, 2, 1)
CODES_8_WARPS_MAX_N = 4096
# Where the resident-warps rule gives 1 warp, a GPU with DRAM as fast as this (an H200: 4.8 TB/s, the
# H100's SMs) runs 2 at M <= 4: its memory stream is faster, so the kernel's own arithmetic sets the pace
# (NOTES.md v44b-c) and a second warp per CTA shares it. H200, 28672x4096, us, 1 / 2 warps (NOTES.md v45a): M=1
# 24.45 / 22.70, M=4 24.82 / 23.07, M=8 28.01 / 29.88; the gated gate/up launch (2 x 14336) at M=1 29.06 /
# 26.54. On an H100 1 warp stays faster (M=1 25.41 / 26.70, v44e).
FAST_DRAM_BYTES_PER_S = 4e12
FAST_DRAM_TWO_WARPS_MAX_M = 4
# Bytes of each weight row that a 16-byte load asks L2 to fetch (FP4C_WEIGHT_PREFETCH in the source;
# 0, 64, 128 or 256). A build-time constant: bench_small_m.py times the others as variants. H100,
# M=1: 128 was fastest on all four Llama shapes, 5-11% over no prefetch (benchmarks/NOTES.md, v5).
WEIGHT_PREFETCH = 128


def nvcc_flags(capability: tuple[int, int], prefetch: int = WEIGHT_PREFETCH) -> list[str]:
    return kernel_flags(capability) + [f"-DFP4C_WEIGHT_PREFETCH={prefetch}"]


def compile_command(output: str, capability: tuple[int, int] = (9, 0)) -> list[str]:
    """The nvcc command line of the build (used by the CPU compile test)."""
    return shared_library_command(SOURCE, output, nvcc_flags(capability) + ["-Xptxas", "-v"])


def load_library(source: pathlib.Path, stem: str, capability: tuple[int, int] = (9, 0),
                 prefetch: int = WEIGHT_PREFETCH) -> ctypes.CDLL:
    """Build (cached) and load ``source``, the kernel or a variant of it with the same C entry point
    (benchmarks/compare_builds.py times builds against each other), with its signature."""
    lib = ctypes.CDLL(str(build_shared_library(source, nvcc_flags(capability, prefetch), stem)))
    fn = lib.fp4c_nvfp4_small_m_gemm
    fn.restype = ctypes.c_int
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, p, i64, p, i64, p, i64, p, i64, p, p, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, p]
    if hasattr(lib, "fp4c_nvfp4_small_m_gemm_group"):  # (older sources that compare_builds times lack it)
        group = lib.fp4c_nvfp4_small_m_gemm_group
        group.restype = ctypes.c_int
        group.argtypes = [i32, p, i32, i32, i32, i32, i32, i32, i32, i32, p]
    return lib


@functools.lru_cache(maxsize=None)
def _library(capability: tuple[int, int], prefetch: int = WEIGHT_PREFETCH) -> ctypes.CDLL:
    return load_library(SOURCE, f"nvfp4_small_m_sm{capability[0]}{capability[1]}", capability, prefetch)


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why the kernel cannot run on this CUDA device (None: it can; built on the first call)."""
    return nvcc.unavailable_reason("CUDA small-M kernel", "FP4C_SMALL_M_KERNEL", device_index, _library)


def dispatches(m: int, n: int, *, host_bound: bool = False) -> bool:
    """Is an [m, K] x [n, K] call one that the backends give to this kernel (where it can run)?
    ``host_bound``: an eager call that ``fast_linear`` will replay takes every M up to MAX_M, where the
    Triton kernel's eager calls cost 100-200 us of host time each (NOTES.md v19), but for those at
    M = 9..16 that the wgmma kernel, asked first, runs faster (``cuda_wgmma.use_wgmma``: large weights)."""
    if host_bound:
        return 1 <= m <= MAX_M
    return 1 <= m <= (DISPATCH_MAX_M_SMALL_N if n <= SMALL_N else DISPATCH_MAX_M)


def _runs_on(x: torch.Tensor, *other_kernels) -> bool:
    """Can this kernel, and the kernels a path also needs (their ``unavailable_reason``), run on
    ``x.device``?"""
    if x.device.type != "cuda":
        return False
    index = nvcc.device_index(x.device)
    return all(reason(index) is None for reason in (unavailable_reason, *other_kernels))


def use_small_m(x: torch.Tensor, m: int, n: int, host_bound: bool = False) -> bool:
    """Route an [m, K] x [n, K] call on ``x.device`` to the CUDA kernel? (``host_bound``: see ``dispatches``)"""
    return dispatches(m, n, host_bound=host_bound) and _runs_on(x)


def dispatches_codes(m: int, n: int, host_bound: bool = False) -> bool:
    """Is a W4A4 [m, K] x [n, K] call one that the backend gives to this kernel on activation codes?
    (``host_bound``: see ``dispatches``; at N = 28672, M = 16 codes tied Triton on the GPU, NOTES.md v18f)"""
    return CODES_MIN_M <= m <= MAX_M and (m <= 8 or n <= CODES_TWO_TILES_MAX_N or host_bound)


def use_codes(x: torch.Tensor, m: int, n: int, host_bound: bool = False) -> bool:
    """Route a W4A4 [m, K] x [n, K] call on ``x.device`` to this kernel on activation codes (written by
    the CUDA quantization kernel)?"""
    return dispatches_codes(m, n, host_bound) and _runs_on(x, cuda_quant.unavailable_reason)


def use_values_group(x: torch.Tensor, m: int, ns: list[int]) -> bool:
    """Route a group of linears of one [m, K] activation (``fp4::linear_group``: N = ``ns``) to one launch on
    bf16/fp16 activations (W4A16, or W4A4 block values)? Where each member's own call would run this
    kernel, and at M = 9..16 also up to VALUES_GROUP_MAX_ROWS weight rows in all, where one launch beat the
    members' own (Triton) calls (NOTES.md v21)."""
    rows = sum(cdiv(n, 16) * 16 for n in ns)
    each_own = all(dispatches(m, n) for n in ns)
    return (each_own or 1 <= m <= MAX_M and rows <= VALUES_GROUP_MAX_ROWS) and _runs_on(x)


def use_codes_group(x: torch.Tensor, m: int) -> bool:
    """Route a W4A4 group of linears of one [m, K] activation (``fp4::linear_group``) to one launch on
    activation codes? From CODES_MIN_M rows at any N: one launch over all the members' rows costs less
    than the members' own launches, Triton's included above CODES_TWO_TILES_MAX_N (NOTES.md v21)."""
    return CODES_MIN_M <= m <= MAX_M and _runs_on(x, cuda_quant.unavailable_reason)


def launch_config(m: int, n: int, k: int, sms: int = NUM_SMS_DEFAULT, codes: bool = False,
                  fast_dram: bool = False) -> tuple[int, int, int]:
    """(rows per warp, stages, warps per CTA) on a GPU of ``sms`` SMs; ``codes``: on activation codes;
    ``fast_dram``: the GPU's DRAM streams FAST_DRAM_BYTES_PER_S or more.
    One 16-row CTA per weight tile, its warps splitting K: as many warps (8, 4, 2 or 1, at most one per
    128-k group) as keep the whole grid one wave of resident warps (RESIDENT_WARPS_PER_SM per SM), and
    with ``fast_dram`` at least 2 up to M = FAST_DRAM_TWO_WARPS_MAX_M; on codes 8 up to N =
    CODES_8_WARPS_MAX_N, else 4."""
    if codes:
        return 16, 2, (8 if n <= CODES_8_WARPS_MAX_N else 4)
    ctas, groups = cdiv(n, 16), cdiv(k, 128)
    warps = next((w for w in WARP_CHOICES if w <= groups and ctas * w <= RESIDENT_WARPS_PER_SM * sms), 1)
    if fast_dram and m <= FAST_DRAM_TWO_WARPS_MAX_M:
        warps = max(warps, min(2, groups))
    return 16, 2, warps


def device_launch_config(m: int, n: int, k: int, device_index: int, codes: bool = False) -> tuple[int, int, int]:
    """``launch_config`` for CUDA device ``device_index`` (its SMs and DRAM bandwidth)."""
    return launch_config(m, n, k, num_sms(device_index), codes,
                         fast_dram=dram_bytes_per_s(device_index) >= FAST_DRAM_BYTES_PER_S)


def group_warps(m: int, ns: list[int], k: int, device_index: int, codes: bool) -> int:
    """Warps per CTA of a grouped launch (``small_m_gemm_group``): ``launch_config`` for all the members' rows."""
    return device_launch_config(m, sum(cdiv(n, 16) * 16 for n in ns), k, device_index, codes)[2]


def small_m_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, *,
                 n: int, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                 x_scale: torch.Tensor | None = None, k: int | None = None,
                 rows_per_warp: int | None = None, stages: int | None = None,
                 warps: int | None = None, prefetch: int = WEIGHT_PREFETCH,
                 library: ctypes.CDLL | None = None, after_quantization: bool = False) -> torch.Tensor:
    """out [M, n] = (x @ dequant(w)^T) * alpha (+ bias), M <= 16.

    ``x``: bf16/fp16 [M, K] (K a multiple of 16, at most the weight's padded K); the weight in the
    Hopper layout (uint8 [Np, Kp/2], e4m3 [Np, Kp/16]); ``alpha`` one float32 on the device;
    ``out_dtype`` x.dtype or float32. Fed NVFP4 block values, this is the exact W4A4 product.
    W4A4 on codes instead: ``x`` uint8 [M, >= Kc/2] and ``x_scale`` e4m3 [M, >= Kc/16] as
    ``cuda_quant.quantize(..., MODE_KERNEL_CODES)`` writes them (Kc = ``k`` rounded up to 32, its padding
    zero), ``k`` the activations' K, ``out_dtype`` bf16, fp16 (the MMA operand type) or float32 (bf16).
    ``rows_per_warp``, ``stages``, ``warps`` and ``prefetch`` override the launch configuration and
    the build (benchmark variants; ``prefetch`` other than WEIGHT_PREFETCH is a second build);
    ``library`` (from ``load_library``) the package's build.
    Launched with programmatic dependent launch where ``pdl.use_pdl`` says so; ``after_quantization``:
    ``x`` was just written by our quantization kernel on this stream (``dependent_launch_mode``).
    """
    if x_scale is None:
        x, weight_scale, alpha, bias = nvcc.gemm_operands("CUDA small-M kernel", x, weight, weight_scale, alpha,
                                                          bias, out_dtype)
        m, k = x.shape
        fp16 = x.dtype == torch.float16
    else:
        x, x_scale, weight_scale, alpha, bias, k = _code_operands(x, x_scale, weight, weight_scale, alpha, bias,
                                                                 out_dtype, k)
        m = x.shape[0]
        fp16 = out_dtype == torch.float16
    _check_shapes(x, weight, weight_scale, m, n, k)
    if prefetch not in (0, 64, 128, 256):
        raise ValueError(f"prefetch must be 0, 64, 128 or 256 bytes, got {prefetch}")
    _check_warps(warps)
    if stages not in (None, 2, 4) or (stages == 4 and m > 8):
        raise ValueError(f"stages must be 2, or 4 for M <= 8 (got {stages} at M={m})")
    if x_scale is not None and (rows_per_warp not in (None, 16) or stages not in (None, 2)):
        raise ValueError("activation codes run with 16 rows per warp and 2 stages only")
    kp = weight.shape[1] * 2
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    default_rows, default_stages, default_warps = device_launch_config(m, n, k, nvcc.device_index(x.device),
                                                                       codes=x_scale is not None)
    rows_per_warp = rows_per_warp or default_rows
    stages = stages or default_stages
    warps = warps or default_warps
    err = nvcc.launch_on(x.device, lambda capability, stream: (
        library or _library(capability, prefetch)).fp4c_nvfp4_small_m_gemm(
        x.data_ptr(), x.stride(0), x_scale.data_ptr() if x_scale is not None else None,
        x_scale.stride(0) if x_scale is not None else 0, weight.data_ptr(), weight.stride(0), weight_scale.data_ptr(),
        weight_scale.stride(0), out.data_ptr(), out.stride(0), bias.data_ptr() if bias is not None else None,
        alpha.data_ptr(), m, n, k, kp, int(fp16), int(out_dtype == torch.float32),
        rows_per_warp, stages, warps, dependent_launch_mode(x.device, after_quantization), stream))
    if err != 0:
        raise RuntimeError(f"fp4c_nvfp4_small_m_gemm failed: CUDA error {err} "
                           f"(M={m}, N={n}, K={k}, rows_per_warp={rows_per_warp}, stages={stages}, warps={warps})")
    return out


def dependent_launch_mode(device: torch.device, after_quantization: bool) -> int:
    """The C entries' ``pdl``: 0 a plain launch, 1 programmatic dependent launch (``pdl.use_pdl``), 2 the same
    with the first weight loads before the wait for the kernel before (the kernel takes it on activation
    codes at M > 8, where it measured faster, else runs as 1). 2 only ``after_quantization``: that kernel is
    then our quantization (cuda_quant's or triton_quant's, early trigger), which lets the GEMM launch only once
    it has waited for the kernels before it, so no kernel still running can be writing the weights. Their
    loads then overlap the quantization's tail instead of following it."""
    if not use_pdl(device):
        return 0
    return 2 if after_quantization else 1


# Members of one grouped launch (the C entry's kMaxGroup).
MAX_GROUP = 4


def small_m_gemm_group(xs: list[torch.Tensor], members: list[tuple], *, out_dtype: torch.dtype,
                       x_scales: list[torch.Tensor] | None = None, k: int | None = None,
                       gated: bool = False, warps: int | None = None) -> list[torch.Tensor]:
    """Several ``small_m_gemm`` calls of one M, K and activation dtype in one launch: ``members`` holds
    ``(weight, weight_scale, alpha, n, bias)`` per GEMM, ``xs`` its activations, one tensor per member (the
    same tensor where they share it): bf16/fp16 [M, K] (W4A16, or W4A4 block values), or with
    ``x_scales`` and ``k`` W4A4 activation codes, as ``small_m_gemm`` takes them. One launch instead of
    one per member saves each member's launch, ramp and tail: a layer's q/k/v or gate/up projections at
    decode M. Warps per CTA come from ``launch_config`` for all the members' rows together, so the K
    split (hence the fp32 summation order) can differ from separate calls.

    ``gated``: two members (gate, up) of one activation tensor and one N; returns ``[silu(gate) * up]``,
    each GEMM's result rounded to ``out_dtype`` first and silu(gate) too (as ``F.silu(gate) * up`` computes
    it on the two linears' outputs), computed in the same launch (8 outputs per CTA). ``warps`` overrides
    the warps per CTA (benchmark variants, as ``small_m_gemm``'s)."""
    _check_warps(warps)
    if not 2 <= len(members) <= MAX_GROUP or len(xs) != len(members) or (
            x_scales is not None and len(x_scales) != len(members)):
        raise ValueError(f"a group holds 2..{MAX_GROUP} GEMMs with one activation tensor each, "
                         f"got {len(members)} GEMMs and {len(xs)} activations")
    if gated and (len(members) != 2 or xs[0] is not xs[1] or members[0][3] != members[1][3]
                  or (x_scales is not None and x_scales[0] is not x_scales[1])):
        raise ValueError("a gated launch takes two GEMMs (gate, up) of one activation tensor and one N")
    codes = x_scales is not None
    table, outs, keep = [], [], []  # keep: the (possibly converted) operands the table points at
    shape = None
    for i, (x, (weight, weight_scale, alpha, n, bias)) in enumerate(zip(xs, members)):
        if codes:
            x, x_scale, weight_scale, alpha, bias, k = _code_operands(x, x_scales[i], weight, weight_scale, alpha,
                                                                      bias, out_dtype, k)
            keep.append(x_scale)
        else:
            x, weight_scale, alpha, bias = nvcc.gemm_operands("CUDA small-M kernel", x, weight, weight_scale, alpha,
                                                              bias, out_dtype)
            k, x_scale = x.shape[1], None
        if shape is not None and (x.shape[0], k, weight.shape[1] * 2) != shape:
            raise ValueError("the members of a group must share M, K and the weights' padded K")
        shape = (x.shape[0], k, weight.shape[1] * 2)
        _check_shapes(x, weight, weight_scale, x.shape[0], n, k)
        if not gated or i == 0:  # (a gated launch writes the gate's row only)
            outs.append(torch.empty((x.shape[0], n), dtype=out_dtype, device=x.device))
        out = outs[-1]
        keep += [x, weight_scale, alpha, bias]
        table += [x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), weight_scale.data_ptr(),
                  weight_scale.stride(0), out.data_ptr(), out.stride(0), bias.data_ptr() if bias is not None else 0,
                  alpha.data_ptr(), n, x_scale.data_ptr() if codes else 0, x_scale.stride(0) if codes else 0]
    if len({x.dtype for x in xs}) != 1:
        raise TypeError("the members' activations must share one dtype")
    m, k, kp = shape
    fp16 = (out_dtype if codes else xs[0].dtype) == torch.float16
    device = xs[0].device
    warps = warps or group_warps(m, [n for *_, n, _ in members], k, nvcc.device_index(device), codes)
    members_arg = (ctypes.c_int64 * len(table))(*table)
    err = nvcc.launch_on(device, lambda capability, stream: _library(capability).fp4c_nvfp4_small_m_gemm_group(
        len(members), members_arg, m, k, kp, int(fp16), int(out_dtype == torch.float32), int(gated), warps,
        int(use_pdl(device)), stream))
    if err != 0:
        raise RuntimeError(f"fp4c_nvfp4_small_m_gemm_group failed: CUDA error {err} (M={m}, "
                           f"N={[n for *_, n, _ in members]}, K={k}, warps={warps}, codes={codes}, gated={gated})")
    return outs


def _check_warps(warps: int | None) -> None:
    if warps is not None and not 1 <= warps <= 8:
        raise ValueError(f"warps per CTA must be 1..8, got {warps}")


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, m: int, n: int, k: int) -> None:
    """M in the kernel's range; K a multiple of 16 within the weight's padded K; N within its rows; the weight
    and its scales as ``tiled_weight_problem`` wants them (its 2-byte scale loads)."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"the small-M kernel takes 1..{MAX_M} rows, got {m}")
    problem = tiled_weight_problem(weight, weight_scale, scale_alignment=2)
    if problem is not None:
        raise ValueError(problem)
    if k % 16 or k > weight.shape[1] * 2 or n > weight.shape[0]:
        raise ValueError(f"bad shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, n={n}")


def _code_operands(x, x_scale, weight, weight_scale, alpha, bias, out_dtype, k):
    """``gemm_operands`` for activation codes: uint8 codes and e4m3 scales whose rows cover ``k``
    rounded up to 32, 16-byte aligned code rows."""
    if k is None:
        raise ValueError("activation codes need k, the activations' K")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out_dtype must be bf16, fp16 or float32, got {out_dtype}")
    if x.dtype != torch.uint8 or x_scale.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise TypeError(f"activation codes must be uint8 with e4m3 scales, got {x.dtype} and {x_scale.dtype}")
    kc = round_up(k, CHUNK)
    if x.dim() != 2 or x_scale.dim() != 2 or x.shape[0] != x_scale.shape[0] or x.shape[1] < kc // 2 \
            or x_scale.shape[1] < kc // 16:
        raise ValueError(f"activation codes [M, >= {kc // 2}] and scales [M, >= {kc // 16}] for K={k}, "
                         f"got {tuple(x.shape)} and {tuple(x_scale.shape)}")
    check_same_device(x=x, x_scale=x_scale, weight=weight, weight_scale=weight_scale, alpha=alpha, bias=bias)
    if x.device.type != "cuda":
        raise RuntimeError(f"the CUDA small-M kernel needs CUDA tensors, got {x.device}")
    return (nvcc.aligned_rows(x), nvcc.aligned_rows(x_scale, 2, 2),
            *nvcc.weight_operands(weight_scale, alpha, bias, out_dtype), k)
