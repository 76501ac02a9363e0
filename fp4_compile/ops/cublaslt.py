"""cuBLASLt GEMM with a device-side alpha and a fused bias: ``csrc/hopper/cublaslt_gemm.cu``.

``gemm_alpha(a, b, alpha, out_dtype=..., bias=...)`` computes ``alpha * (a @ b.T) + bias`` in one
cuBLASLt call: fp32 accumulation, alpha read from device memory when the GEMM runs
(``CUBLASLT_POINTER_MODE_DEVICE``: no host sync, and a captured CUDA graph sees a new alpha), the
bias added in the epilogue, the output rounded once. torch's bf16 matmul can take neither.

Like ``cuda_small_m``, the shim is a plain shared library (no torch or cuBLAS headers) built by
nvcc on first use and called through ctypes on torch's current stream. It dlopens libcublasLt: the
copy torch has already loaded, else the one in torch's pip ``nvidia`` packages, else the loader's
search path. ``FP4C_CUBLASLT=0`` turns it off; any build or load failure does the same, once, with
a warning naming the cause.

Each call takes a 32 MiB cuBLASLt workspace from torch's caching allocator on its stream (inside a
capture: the graph's pool), so that calls on two streams, or graphs replayed beside them, never share
one (cuBLASLt's rule; torch keeps one per stream for its own GEMMs).

CUDA graphs: each device gets a float zero for beta and a cuBLASLt handle on the first call or by
``prepare(device)``; the first call of each shape also builds cuBLASLt descriptors and asks its
heuristic (host work). So call ``prepare(device)`` or run each shape once (a warm-up) before
capturing; a first call inside a capture is refused.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import pathlib
import site
import sys
import threading

import torch

from ..format import check_same_device
from . import nvcc
from .nvcc import build_shared_library, shared_library_command


SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "cublaslt_gemm.cu"
WORKSPACE_BYTES = 32 * 1024 * 1024  # what cuBLAS recommends for Hopper
# A bias with a 16-bit output needs N to be a multiple of this: otherwise cuBLASLt's bias epilogue put wrong
# values in 1-27% of the outputs (H100, libcublasLt 13, NOTES.md v35c; fp32 outputs and N % 8 == 0 were right,
# and so was a larger row stride of D alone). Callers pad N with zero rows of b and zero bias.
BIAS_N_MULTIPLE = 8
# cudaDataType_t values (library_types.h), as the shim takes them.
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_DATA_TYPE = {torch.float32: _CUDA_R_32F, torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}


def nvcc_flags() -> list[str]:
    # No device code: the arch flag only keeps nvcc from compiling for its default arch list.
    return ["-gencode=arch=compute_90,code=sm_90", "-O2", "-std=c++17", "-Xcompiler", "-Wall", "-ldl"]


def compile_command(output: str) -> list[str]:
    """The nvcc command line of the build (used by the CPU compile test)."""
    return shared_library_command(SOURCE, output, nvcc_flags())


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fp4c_cublaslt_init.restype = ctypes.c_char_p
    lib.fp4c_cublaslt_init.argtypes = [ctypes.c_char_p]
    lib.fp4c_cublaslt_version.restype = ctypes.c_size_t
    lib.fp4c_cublaslt_version.argtypes = []
    lib.fp4c_cublaslt_library.restype = ctypes.c_char_p
    lib.fp4c_cublaslt_library.argtypes = []
    lib.fp4c_cublaslt_last_error.restype = ctypes.c_char_p
    lib.fp4c_cublaslt_last_error.argtypes = []
    lib.fp4c_cublaslt_plan_count.restype = ctypes.c_size_t
    lib.fp4c_cublaslt_plan_count.argtypes = []
    fn = lib.fp4c_cublaslt_gemm
    fn.restype = ctypes.c_int
    #             device a  lda  b  ldb  d  ldd  bias alpha beta m    n    k    ab   d    ws workspace_size     stream
    fn.argtypes = [i32, p, i64, p, i64, p, i64, p, p, p, i64, i64, i64, i32, i32, p, ctypes.c_uint64, p]
    return lib


@functools.lru_cache(maxsize=None)
def _shim() -> ctypes.CDLL:
    """The built shim, not yet initialised (no libcublasLt needed)."""
    return _declare(ctypes.CDLL(str(build_shared_library(SOURCE, nvcc_flags(), "fp4c_cublaslt"))))


def library_candidates() -> list[str]:
    """libcublasLt files shipped with torch's pip wheels (``nvidia/cu13/lib`` for CUDA 13 builds,
    ``nvidia/cublas/lib`` for CUDA 12), best match for torch's CUDA version first."""
    roots: list[pathlib.Path] = [pathlib.Path(torch.__file__).resolve().parent.parent]
    try:
        roots += [pathlib.Path(p) for p in site.getsitepackages()]
    except AttributeError:  # pragma: no cover - virtualenv's old site module
        pass
    roots += [pathlib.Path(p) for p in sys.path if p and p.endswith("-packages")]
    major = (torch.version.cuda or "").split(".")[0]
    found: list[str] = []
    for root in dict.fromkeys(roots):
        patterns = []
        if major:
            patterns += [f"nvidia/cu{major}/lib/libcublasLt.so.{major}", f"nvidia/cublas/lib/libcublasLt.so.{major}",
                         f"torch/lib/libcublasLt.so.{major}"]
        patterns += ["nvidia/*/lib/libcublasLt.so*", "torch/lib/libcublasLt.so*"]
        for pattern in patterns:
            for path in sorted(glob.glob(str(root / pattern))):
                if path not in found:
                    found.append(path)
    return found


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    """The shim with libcublasLt loaded; RuntimeError naming the cause if it cannot be."""
    lib = _shim()
    candidates = library_candidates()
    error = lib.fp4c_cublaslt_init(candidates[0].encode() if candidates else None)
    if error is not None:
        raise RuntimeError(f"cannot load cuBLASLt: {error.decode(errors='replace')}")
    return lib


def library_info() -> tuple[str, int]:
    """(the libcublasLt loaded, as a soname or a path; its cublasLtGetVersion(), e.g. 130100)."""
    lib = _library()
    return lib.fp4c_cublaslt_library().decode(), int(lib.fp4c_cublaslt_version())


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why ``gemm_alpha`` cannot run on this CUDA device (None: it can; built on the first call)."""
    return nvcc.unavailable_reason("cuBLASLt alpha GEMM", "FP4C_CUBLASLT", device_index, lambda cap: _library(),
                                   capabilities=None)


class _DeviceState:
    def __init__(self, device: torch.device):
        self.beta = torch.zeros(1, dtype=torch.float32, device=device)  # read by cuBLASLt (device pointer mode)


_states: dict[int, _DeviceState] = {}
_states_lock = threading.Lock()


def _state(index: int) -> _DeviceState:
    state = _states.get(index)
    if state is not None:
        return state
    with _states_lock:
        state = _states.get(index)
        if state is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "fp4_compile.ops.cublaslt: the first call on a device must not be inside a CUDA graph "
                    "capture (it allocates beta and creates the cuBLASLt handle): call cublaslt.prepare(device) or run "
                    "once before capturing")
            state = _states[index] = _DeviceState(torch.device("cuda", index))
    return state


def _device_index(device: torch.device | int | str | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"cuBLASLt needs a CUDA device, got {device}")
    return nvcc.device_index(device)


def prepare(device: torch.device | int | str | None = None) -> None:
    """Build/load the shim, allocate ``device``'s beta and create its cuBLASLt handle (one tiny
    GEMM), outside any CUDA graph capture. Later first calls of a new shape still ask cuBLASLt's
    heuristic (host work only): warm each shape up before capturing to be safe. Once per device:
    later calls (one per prepared weight) return at once."""
    index = _device_index(device)
    reason = unavailable_reason(index)
    if reason is not None:
        raise RuntimeError(f"cuBLASLt alpha GEMM unavailable: {reason}")
    if index in _states:  # a GEMM was issued on this device: beta exists, the handle was made
        return
    dev = torch.device("cuda", index)
    a = torch.zeros(1, 16, dtype=torch.bfloat16, device=dev)
    gemm_alpha(a, a, torch.ones(1, device=dev), out_dtype=torch.bfloat16)


def available(device: torch.device) -> bool:
    """Can ``gemm_alpha`` run on ``device`` now? False on CPU devices, where the shim cannot run,
    and inside a CUDA graph capture before the device's beta exists (callers then take their
    other path instead of failing the capture)."""
    if device.type != "cuda":
        return False
    index = _device_index(device)
    if unavailable_reason(index) is not None:
        return False
    return index in _states or not torch.cuda.is_current_stream_capturing()


def _row_stride(t: torch.Tensor, name: str) -> int:
    rows, cols = t.shape
    if cols > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    if rows <= 1:
        return max(cols, 1)  # the row stride of a single row is never used
    ld = t.stride(0)
    if ld < cols or ld % 8:
        raise ValueError(f"{name}'s row stride must be >= {cols} and a multiple of 8 elements (16 bytes), "
                         f"got {ld}")
    return ld


def gemm_alpha(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, *, out_dtype: torch.dtype,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[M, N] = alpha * (a @ b.T) (+ bias)``, fp32 accumulation, rounded once to ``out_dtype``.

    ``a`` [M, K] and ``b`` [N, K]: both bf16 or both fp16 CUDA tensors, last dimension contiguous,
    16-byte aligned (data pointer and row stride); ``alpha``: one float32 element on the same device,
    read when the GEMM runs (in-place updates reach a captured CUDA graph); ``out_dtype``: a.dtype
    or float32; ``bias``: N elements (converted to ``out_dtype``, which is what cuBLASLt's bias
    epilogue takes; with a 16-bit output N must be a multiple of BIAS_N_MULTIPLE). Returns a new
    contiguous [M, N] tensor. Raises RuntimeError if cuBLASLt is
    unavailable (see ``unavailable_reason``) or fails.
    """
    check_same_device(a=a, b=b, alpha=alpha, bias=bias)
    if a.device.type != "cuda":
        raise RuntimeError(f"the cuBLASLt GEMM needs CUDA tensors, got {a.device}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        raise TypeError(f"a and b must both be bf16 or both fp16, got {a.dtype} and {b.dtype}")
    if out_dtype not in (a.dtype, torch.float32):
        raise TypeError(f"out_dtype must be {a.dtype} or torch.float32, got {out_dtype}")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a [M, K] and b [N, K] must share K, got {tuple(a.shape)} and {tuple(b.shape)}")
    if alpha.numel() != 1:
        raise ValueError(f"alpha must hold one element, got shape {tuple(alpha.shape)}")
    if alpha.dtype != torch.float32:
        raise TypeError(f"alpha must be float32, got {alpha.dtype}")
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have N={n} elements, got shape {tuple(bias.shape)}")
        if out_dtype != torch.float32 and n % BIAS_N_MULTIPLE:
            raise ValueError(f"a bias with a {out_dtype} output needs N to be a multiple of {BIAS_N_MULTIPLE} "
                             f"(cuBLASLt's bias epilogue is wrong otherwise), got N={n}: pad b with zero rows "
                             f"and the bias with zeros")
        bias = bias.reshape(n)
        if bias.dtype != out_dtype or not bias.is_contiguous() or bias.data_ptr() % 16:
            bias = bias.to(out_dtype).contiguous()
            if bias.data_ptr() % 16:
                bias = bias.clone()
    lda, ldb = _row_stride(a, "a"), _row_stride(b, "b")
    for name, t in (("a", a), ("b", b)):
        if t.numel() and t.data_ptr() % 16:
            raise ValueError(f"{name}'s data pointer must be 16-byte aligned (address % 16 = {t.data_ptr() % 16})")
    index = nvcc.device_index(a.device)
    if m == 0 or n == 0 or k == 0:
        out = torch.zeros((m, n), dtype=out_dtype, device=a.device)
        return out + bias if bias is not None else out
    reason = unavailable_reason(index)
    if reason is not None:
        raise RuntimeError(f"cuBLASLt alpha GEMM unavailable: {reason}")
    lib = _library()
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    state = _state(index)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=a.device)
    err = nvcc.launch_on(a.device, lambda capability, stream: lib.fp4c_cublaslt_gemm(
        index, a.data_ptr(), lda, b.data_ptr(), ldb, out.data_ptr(), n,
        bias.data_ptr() if bias is not None else None, alpha.data_ptr(), state.beta.data_ptr(),
        m, n, k, _DATA_TYPE[a.dtype], _DATA_TYPE[out_dtype], workspace.data_ptr(), WORKSPACE_BYTES, stream))
    if err != 0:
        message = lib.fp4c_cublaslt_last_error().decode(errors="replace")
        raise RuntimeError(f"fp4c_cublaslt_gemm failed: {message} (M={m}, N={n}, K={k}, lda={lda}, ldb={ldb}, "
                           f"{a.dtype} -> {out_dtype}, bias={bias is not None})")
    return out
