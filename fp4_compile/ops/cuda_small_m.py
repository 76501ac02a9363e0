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

from . import nvcc
from .nvcc import build_shared_library, kernel_flags, shared_library_command
from .pdl import use_pdl


SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "nvfp4_small_m.cu"
MAX_M = 16
# Measured on an H100 (bench_small_m.py, NOTES.md v4 and v5): the kernel beats the Triton kernels at
# M <= 8 for every N timed (1024..28672); at M = 9..16 (two MMA n-tiles, the activations re-read
# from L2 for every 16 weight rows) only at N = 1024, where Triton has few tiles to split.
DISPATCH_MAX_M = 8
DISPATCH_MAX_M_SMALL_N = 16
SMALL_N = 1024
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
    fn.argtypes = [p, i64, p, i64, p, i64, p, i64, p, p, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, p]
    return lib


@functools.lru_cache(maxsize=None)
def _library(capability: tuple[int, int], prefetch: int = WEIGHT_PREFETCH) -> ctypes.CDLL:
    return load_library(SOURCE, f"nvfp4_small_m_sm{capability[0]}{capability[1]}", capability, prefetch)


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why the kernel cannot run on this CUDA device (None: it can; built on the first call)."""
    return nvcc.unavailable_reason("CUDA small-M kernel", "FP4C_SMALL_M_KERNEL", device_index, _library)


def dispatches(m: int, n: int) -> bool:
    """Is an [m, K] x [n, K] call one that the backends give to this kernel (where it can run)?"""
    return 1 <= m <= (DISPATCH_MAX_M_SMALL_N if n <= SMALL_N else DISPATCH_MAX_M)


def use_small_m(x: torch.Tensor, m: int, n: int) -> bool:
    """Route an [m, K] x [n, K] call on ``x.device`` to the CUDA kernel?"""
    if not dispatches(m, n) or x.device.type != "cuda":
        return False
    return unavailable_reason(x.device.index if x.device.index is not None else torch.cuda.current_device()) is None


def launch_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(rows per warp, stages, warps per CTA). One 16-row CTA per weight tile; 8 warps split K
    while there are few CTAs (N <= 4096: 256), 4 when there are many (H100, bench_small_m.py)."""
    return 16, 2, (8 if n <= 4096 else 4)


def small_m_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, *,
                 n: int, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                 rows_per_warp: int | None = None, stages: int | None = None,
                 warps: int | None = None, prefetch: int = WEIGHT_PREFETCH,
                 library: ctypes.CDLL | None = None) -> torch.Tensor:
    """out [M, n] = (x @ dequant(w)^T) * alpha (+ bias), M <= 16.

    ``x``: bf16/fp16 [M, K] (K a multiple of 16, at most the weight's padded K); the weight in the
    Hopper layout (uint8 [Np, Kp/2], e4m3 [Np, Kp/16]); ``alpha`` one float32 on the device;
    ``out_dtype`` x.dtype or float32. Fed NVFP4 block values, this is the exact W4A4 product.
    ``rows_per_warp``, ``stages``, ``warps`` and ``prefetch`` override the launch configuration and
    the build (benchmark variants; ``prefetch`` other than WEIGHT_PREFETCH is a second build);
    ``library`` (from ``load_library``) the package's build.
    Launched with programmatic dependent launch where ``pdl.use_pdl`` says so.
    """
    x, weight_scale, alpha, bias = nvcc.gemm_operands("CUDA small-M kernel", x, weight, weight_scale, alpha, bias,
                                                      out_dtype)
    m, k = x.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"the small-M kernel takes 1..{MAX_M} rows, got {m}")
    if prefetch not in (0, 64, 128, 256):
        raise ValueError(f"prefetch must be 0, 64, 128 or 256 bytes, got {prefetch}")
    if stages not in (None, 2, 4) or (stages == 4 and m > 8):
        raise ValueError(f"stages must be 2, or 4 for M <= 8 (got {stages} at M={m})")
    kp = weight.shape[1] * 2
    if k % 16 or k > kp or kp % 32 or weight.shape[0] % 32 or n > weight.shape[0]:
        raise ValueError(f"bad shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, n={n}")
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    default_rows, default_stages, default_warps = launch_config(m, n, k)
    rows_per_warp = rows_per_warp or default_rows
    stages = stages or default_stages
    warps = warps or default_warps
    err = nvcc.launch_on(x.device, lambda capability, stream: (
        library or _library(capability, prefetch)).fp4c_nvfp4_small_m_gemm(
        x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), weight_scale.data_ptr(),
        weight_scale.stride(0), out.data_ptr(), out.stride(0), bias.data_ptr() if bias is not None else None,
        alpha.data_ptr(), m, n, k, kp, int(x.dtype == torch.float16), int(out_dtype == torch.float32),
        rows_per_warp, stages, warps, int(use_pdl(x.device)), stream))
    if err != 0:
        raise RuntimeError(f"fp4c_nvfp4_small_m_gemm failed: CUDA error {err} "
                           f"(M={m}, N={n}, K={k}, rows_per_warp={rows_per_warp}, stages={stages}, warps={warps})")
    return out
