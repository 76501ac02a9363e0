"""The CUDA C++ NVFP4 activation quantization of ``csrc/hopper/nvfp4_quant.cu``: build, load, launch.

``quantize(x2, global_scale, mode)`` returns exactly what ``triton_quant.launch_quant_triton`` returns for
the same mode (the function of ``fp4_compile.format.quantize_nvfp4``, bit for bit): packed codes
and linear or swizzled (zero-padded) e4m3 scales, or the block values ``e2m1 * sf`` (bf16/fp16) that
the Hopper W4A4 GEMMs take. Why a CUDA kernel: the Triton kernel is bound by integer ALU work
(~27 SASS per element); this one rounds E2M1 on the FP32 pipe, tabulates the per-scale-byte
reciprocal once per CTA and uses the sm_89 fp8 conversion (H100, M=4096: 91% of copy bandwidth at
K=4096 against Triton's 66%). For the block values, the reason is host time: eager W4A4 calls run
this kernel, through ctypes (about half of Triton's launcher's host time, NOTES.md v10) or from the
C++ fast path of ``fast_linear`` (which cannot launch Triton kernels); graphs take Triton's, which is
0.7-1 us faster at M <= 256 (``use_cuda_quant``).

The same library holds ``fp4c_rms_norm_values``, an RMSNorm before the block values (``fp4::rms_norm_quantize``'s
eager kernel, launched by ``rms_norm_quant.py`` and the C++ fast path of ``fast_linear``).

Built on first use with nvcc into a plain shared library (no torch headers, one binary for every
torch version) and called through ctypes on the current stream, so CUDA graphs capture it.
``FP4C_CUDA_QUANT=0`` turns it off (callers then use the Triton kernel); a build or load failure
does the same, once, with a warning naming the cause.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import torch

from ..format import BLOCK_SIZE, check_same_device, round_up, swizzled_scale_shape
from . import nvcc
from .weight_layout import CHUNK
from .nvcc import build_shared_library, kernel_flags, shared_library_command
from .pdl import use_pdl


SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "nvfp4_quant.cu"
# The same mode numbers as triton_quant.py (not imported: this module must load without Triton).
MODE_LINEAR = 0  # codes + linear scales [M, K/16]
MODE_SWIZZLED = 1  # codes + 128x4 swizzled scales, padding written as zeros
MODE_VALUES = 2  # exact block values e2m1 * sf in the output dtype (fp32: Triton only)
# Codes in the Hopper GEMMs' weight word layout (weight_layout.to_kernel_layout) with linear scales,
# K rounded up to 32 (the padding written as zero codes and scales): what the CUDA small-M GEMM
# decodes as W4A4 activations. This kernel only (no Triton counterpart).
MODE_KERNEL_CODES = 3
# Codes: H100 (bench_quant.py, K=4096): the Triton kernel is faster at M = 64 (2.9 vs 3.4 us), equal
# at M = 256; at M = 4096 this one takes 16 us against 23.
MIN_M = 1024
# The grid's CTAs per SM (each thread loops over the rows beyond it). H100, M=4096: 16 gave 93% /
# 82% of copy bandwidth at K = 4096 / 14336, 4 gave 91% / 75% (bench_quant.py sweeps 2..16).
CTAS_PER_SM = 16
# dtype codes of the C launcher
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VALUE_DTYPES = (torch.bfloat16, torch.float16)  # the block values it writes (fp32: Triton)


def nvcc_flags(capability: tuple[int, int]) -> list[str]:
    return kernel_flags(capability)


def compile_command(output: str, capability: tuple[int, int] = (9, 0)) -> list[str]:
    """The nvcc command line of the build (used by the CPU compile test)."""
    return shared_library_command(SOURCE, output, nvcc_flags(capability) + ["-Xptxas", "-v"])


@functools.lru_cache(maxsize=None)
def _library(capability: tuple[int, int]) -> ctypes.CDLL:
    return load_library(SOURCE, f"nvfp4_quant_sm{capability[0]}{capability[1]}", capability)


def load_library(source: pathlib.Path, stem: str, capability: tuple[int, int] = (9, 0)) -> ctypes.CDLL:
    """Build (cached) and load ``source``, the kernels or a variant with the same C entry points
    (benchmarks/compare_builds.py times builds against each other), with their signatures."""
    lib = ctypes.CDLL(str(build_shared_library(source, nvcc_flags(capability), stem)))
    fn = lib.fp4c_nvfp4_quant
    fn.restype = ctypes.c_int
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # x, ldx, x_dtype, q, ldq, s, lds, v, ldv, v_fp16, gs, M, K, mode, ctas_per_sm, pdl, stream
    fn.argtypes = [p, i64, i32, p, i64, p, i64, p, i64, i32, p, i32, i32, i32, i32, i32, p]
    norm = lib.fp4c_rms_norm_values
    norm.restype = ctypes.c_int
    # x, ldx, residual, ldr, w, sum, ldsum, v, ldv, dtype, gs, eps, M, K, unit_offset, pdl, stream
    norm.argtypes = [p, i64, p, i64, p, p, i64, p, i64, i32, p, ctypes.c_float, i32, i32, i32, i32, p]
    return lib


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why the kernel cannot run on this CUDA device (None: it can; built on the first call)."""
    return nvcc.unavailable_reason("CUDA quantization kernel", "FP4C_CUDA_QUANT", device_index, _library)


def use_cuda_quant(x2: torch.Tensor, mode: int, out_dtype: torch.dtype | None = None) -> bool:
    """Quantize ``x2 [M, K]`` (on its device) in ``mode`` (block values: to ``out_dtype``) with the CUDA
    kernel rather than the Triton one?

    Codes and scales: from MIN_M rows, where it is faster on the GPU. Block values: in eager calls
    only. There its launch costs about half the host time of Triton's (H100 host: 18 against 33-48 us
    per call, benchmarks/profile_host.py), and eager W4A4 layers are bound by host time; on the GPU
    it matches Triton's at M=4096 (bench_quant.py, H100: 86% / 89% of copy bandwidth at K = 4096 /
    14336 against 88% / 91%, NOTES.md v19) but takes 0.7-1 us more at M <= 256, so calls captured in a
    CUDA graph, where host time is gone, take Triton's.
    """
    if x2.device.type != "cuda" or x2.dtype not in DTYPE_CODES:
        return False
    if mode == MODE_VALUES:
        if (out_dtype or x2.dtype) not in VALUE_DTYPES:
            return False
    elif x2.shape[0] < MIN_M:
        return False
    if unavailable_reason(nvcc.device_index(x2.device)) is not None:
        return False
    return mode != MODE_VALUES or not torch.cuda.is_current_stream_capturing()


def quantize(x2: torch.Tensor, global_scale: torch.Tensor, mode: int, ctas_per_sm: int = CTAS_PER_SM,
             out_dtype: torch.dtype | None = None, early_trigger: bool = False,
             library: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """NVFP4-quantize ``x2 [M, K]`` (fp32/fp16/bf16, K a multiple of 16) on its CUDA device.

    ``global_scale``: float32, one element, on the same device (read there: no host sync, and a
    captured CUDA graph follows later changes of its value). Returns, like ``launch_quant_triton``:
    ``MODE_LINEAR``: (codes uint8 [M, K/2], scales float8_e4m3fn [M, K/16]);
    ``MODE_SWIZZLED``: (codes, scales float8_e4m3fn [round_up(M,128), round_up(K/16,4)], padding 0);
    ``MODE_VALUES``: the block values e2m1 * sf [M, K] in ``out_dtype`` (bf16 or fp16; default x's);
    ``MODE_KERNEL_CODES``: (codes uint8 [M, Kc/2] in the kernel word layout, scales float8_e4m3fn
    [M, Kc/16]), Kc = K rounded up to 32, the padding zero.
    Rows may be strided (the last dimension must be contiguous, else x2 is copied).
    ``ctas_per_sm`` (1..16) sizes the grid (a benchmark variant). Launched with programmatic
    dependent launch where ``pdl.use_pdl`` says so; ``early_trigger``: the caller launches one of our
    GEMMs right after (it waits for this kernel's completion before it reads the activations), which may
    then launch once this kernel has waited for the kernels before it (so that the GEMM may read its
    weights early: ``cuda_small_m.dependent_launch_mode``). Any other kernel after it must not: Inductor's
    PDL kernels wait only for what the kernel just before them wrote. ``library`` (from ``load_library``):
    another build (benchmark variants).
    """
    if x2.dtype not in DTYPE_CODES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x2.dtype}")
    if x2.dim() != 2 or x2.shape[1] % BLOCK_SIZE:
        raise ValueError(f"x must be 2-D [M, K] with K a multiple of {BLOCK_SIZE}, got shape {tuple(x2.shape)}")
    if global_scale.dtype != torch.float32:
        raise TypeError(f"global_scale must be float32, got {global_scale.dtype}")
    if global_scale.numel() != 1:
        raise ValueError(f"global_scale must have one element, got shape {tuple(global_scale.shape)}")
    if mode not in (MODE_LINEAR, MODE_SWIZZLED, MODE_VALUES, MODE_KERNEL_CODES):
        raise ValueError(f"mode must be MODE_LINEAR, MODE_SWIZZLED, MODE_VALUES or MODE_KERNEL_CODES, got {mode}")
    out_dtype = out_dtype or x2.dtype
    if mode == MODE_VALUES and out_dtype not in VALUE_DTYPES:
        raise TypeError(f"the block values are written in bf16 or fp16 (float32: triton_quant), got {out_dtype}")
    if not 1 <= ctas_per_sm <= 16:
        raise ValueError(f"ctas_per_sm must be 1..16, got {ctas_per_sm}")
    check_same_device(x=x2, global_scale=global_scale)
    if x2.device.type != "cuda":
        raise RuntimeError(f"the CUDA quantization kernel needs CUDA tensors, got {x2.device}; "
                           "use fp4_compile.format.quantize_nvfp4 on the CPU")
    m, k = x2.shape
    dev = x2.device
    x2 = nvcc.aligned_rows(x2)  # the kernel reads each row in 16-byte vectors
    if mode == MODE_VALUES:
        v = torch.empty((m, k), dtype=out_dtype, device=dev)
        q = s = v  # not written
    elif mode == MODE_KERNEL_CODES:
        kc = round_up(k, CHUNK)
        q = v = torch.empty((m, kc // 2), dtype=torch.uint8, device=dev)
        s = torch.empty((m, kc // BLOCK_SIZE), dtype=torch.uint8, device=dev)
    else:
        q = v = torch.empty((m, k // 2), dtype=torch.uint8, device=dev)
        s = torch.empty(swizzled_scale_shape(m, k) if mode == MODE_SWIZZLED else (m, k // BLOCK_SIZE),
                        dtype=torch.uint8, device=dev)
    if s.numel():  # M == 0 or K == 0: nothing to write
        err = nvcc.launch_on(dev, lambda capability, stream: (library or _library(capability)).fp4c_nvfp4_quant(
            x2.data_ptr(), x2.stride(0), DTYPE_CODES[x2.dtype], q.data_ptr(), q.stride(0), s.data_ptr(),
            s.stride(0), v.data_ptr(), v.stride(0), int(out_dtype == torch.float16), global_scale.data_ptr(),
            m, k, mode, ctas_per_sm, (2 if early_trigger else 1) if use_pdl(dev) else 0, stream))
        if err != 0:
            raise RuntimeError(f"fp4c_nvfp4_quant failed: CUDA error {err} (M={m}, K={k}, mode={mode}, x {x2.dtype})")
    if mode == MODE_VALUES:
        return v
    return q, s.view(torch.float8_e4m3fn)


__all__ = ["MODE_LINEAR", "MODE_SWIZZLED", "MODE_VALUES", "MODE_KERNEL_CODES", "quantize", "use_cuda_quant",
           "unavailable_reason"]
