"""The CUDA C++ mid-M GEMM of ``csrc/hopper/nvfp4_mid_m.cu``: build, load, launch.

Built and loaded like the small-M kernel (``cuda_small_m``: nvcc, ctypes, the current stream, so
CUDA graphs capture it); ``FP4C_MID_M_KERNEL=0`` turns it off, and so does a failed build, once,
with a warning. A CTA owns 128 (or 256) weight rows and an M tile of 16..128 activation rows held
in shared memory; K is split across CTAs with fp32 partials reduced by the last CTA of each tile.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import torch

from . import nvcc
from .cuda_mma import check_gemm_args, nvcc_flags
from .cuda_small_m import dispatches as small_m_dispatches
from .nvcc import build_shared_library, shared_library_command
from .triton_gemm import lock_buffer

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "nvfp4_mid_m.cu"
MAX_M = 128
# (activation rows, weight rows, warps) of a CTA: the tiles the source instantiates (FP4C_TILE)
TILES = ((16, 128, 4), (16, 128, 8), (32, 128, 4), (32, 128, 8), (64, 128, 4), (64, 128, 8), (64, 256, 8),
         (128, 128, 8))
GROUP_K = 128  # k per pipeline step
# The calls the backends give it: those above the small-M kernel's range, up to MAX_M.
DISPATCH_MAX_M = MAX_M


def compile_command(output: str, capability: tuple[int, int] = (9, 0)) -> list[str]:
    """The nvcc command line of the build (used by the CPU compile test)."""
    return shared_library_command(SOURCE, output, nvcc_flags(capability) + ["-Xptxas", "-v"])


@functools.lru_cache(maxsize=None)
def _library(capability: tuple[int, int]) -> ctypes.CDLL:
    stem = f"nvfp4_mid_m_sm{capability[0]}{capability[1]}"
    lib = ctypes.CDLL(str(build_shared_library(SOURCE, nvcc_flags(capability), stem)))
    fn = lib.fp4c_nvfp4_mid_m_gemm
    fn.restype = ctypes.c_int
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, p, i64, p, i64, p, i64, p, p, p, p] + [i32] * 11 + [p]
    return lib


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why the kernel cannot run on this CUDA device (None: it can; built on the first call)."""
    return nvcc.unavailable_reason("CUDA mid-M kernel", "FP4C_MID_M_KERNEL", device_index, _library)


def dispatches(m: int, n: int) -> bool:
    """Is an [m, K] x [n, K] call one that the backends give to this kernel (where it can run)?"""
    return not small_m_dispatches(m, n) and 1 <= m <= DISPATCH_MAX_M


def use_mid_m(x: torch.Tensor, m: int, n: int) -> bool:
    """Route an [m, K] x [n, K] call on ``x.device`` to the CUDA kernel?"""
    if not dispatches(m, n) or x.device.type != "cuda":
        return False
    return unavailable_reason(x.device.index if x.device.index is not None else torch.cuda.current_device()) is None


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(m: int, n: int, k: int, sms: int = 132) -> tuple[int, int, int, int]:
    """(activation rows, weight rows, warps, K splits) of a CTA for an [m, k] x [n, k] call.

    The smallest M tile that holds m, at most 64 (larger M: several M tiles, the weights re-read
    from L2); 128 weight rows on 8 warps; K split until the CTAs reach about 1.5 per SM (M tiles
    up to 32) or 1 per SM (64), each keeping at least two 128-k steps (H100, bench_mid_m.py).
    """
    m_tile = next((t for t in (16, 32) if m <= t), 64)
    rows, warps = 128, 8
    tiles = -(-n // rows) * -(-m // m_tile)
    target = (1.5 if m_tile <= 32 else 1.0) * sms
    steps = -(-k // GROUP_K)
    splits = max(1, min(round(target / tiles), steps // 2))
    return m_tile, rows, warps, splits


def mid_m_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, *,
               n: int, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
               tile: tuple[int, int, int] | None = None, splits: int | None = None) -> torch.Tensor:
    """out [M, n] = (x @ dequant(w)^T) * alpha (+ bias), M <= 128; arguments as ``small_m_gemm``.

    ``tile`` (one of ``TILES``) and ``splits`` override the launch configuration (benchmark variants).
    """
    x, weight_scale, bias, alpha, m, k, kp = check_gemm_args("CUDA mid-M kernel", x, weight, weight_scale, alpha,
                                                             bias, n, out_dtype, MAX_M)
    dev = x.device
    *d_tile, d_splits = launch_config(m, n, k, _num_sms(dev.index if dev.index is not None
                                                        else torch.cuda.current_device()))
    tile, splits = tuple(tile or d_tile), splits or d_splits
    if tile not in TILES:
        raise ValueError(f"tile (activation rows, weight rows, warps) must be one of {TILES}, got {tile}")
    m_tile, rows, warps = tile
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    partial = tickets = None
    if splits > 1:
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=dev)
        tiles = -(-n // rows) * -(-m // m_tile)
        tickets = lock_buffer(dev, tiles)
        if tickets is None:  # first call inside a graph capture: a fresh zeroed buffer
            tickets = torch.zeros(tiles, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):  # ctypes launches on the current device
        err = _library(torch.cuda.get_device_capability(dev)).fp4c_nvfp4_mid_m_gemm(
            x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), weight_scale.data_ptr(),
            weight_scale.stride(0), out.data_ptr(), out.stride(0), bias.data_ptr() if bias is not None else None,
            alpha.data_ptr(), partial.data_ptr() if partial is not None else None,
            tickets.data_ptr() if tickets is not None else None, m, n, weight.shape[0], k, kp,
            int(x.dtype == torch.float16), int(out_dtype == torch.float32), m_tile, rows, warps, splits,
            torch.cuda.current_stream(dev).cuda_stream)
    if err != 0:
        raise RuntimeError(f"fp4c_nvfp4_mid_m_gemm failed: CUDA error {err} "
                           f"(M={m}, N={n}, K={k}, tile={tile}, splits={splits})")
    return out
