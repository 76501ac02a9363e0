"""The optional nvcc-built CUDA parts: finding nvcc, building a source into a cached shared library
(no torch headers), and deciding whether a part can run on a device."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import torch

from ..format import check_same_device

log = logging.getLogger(__name__)

# The Hopper kernels (small-M GEMM, quantization) use sm_89's e4m3 conversions; only sm_90 was run.
KERNEL_CAPABILITIES = ((8, 9), (9, 0))


def kernel_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc flags of the Hopper kernels, for one GPU architecture."""
    arch = f"{capability[0]}{capability[1]}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", "-lineinfo"]


@functools.lru_cache(maxsize=None)
def nvcc_path() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, else from PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc: str | None = None) -> tuple[int, int] | None:
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        return None
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def build_dir() -> pathlib.Path:
    """``$FP4C_BUILD_DIR``, else ``~/.cache/fp4_compile``."""
    root = os.environ.get("FP4C_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fp4_compile")
    return pathlib.Path(root)


def shared_library_command(source: pathlib.Path, output: str, flags: list[str]) -> list[str]:
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return [nvcc, *flags, "-shared", "-Xcompiler", "-fPIC", "-o", output, str(source)]


def source_digest(source: pathlib.Path, flags: list[str] | None = None) -> str:
    """A hash of ``source``, the headers beside it (``*.cuh``) and, given ``flags``, the flags and the
    nvcc version: what names a build (and, without flags, the kernel code a measurement was made with)."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.cuh")))
    extra = repr((flags, nvcc_version())).encode() if flags is not None else b""
    return hashlib.sha256(text + extra).hexdigest()[:16]


def build_shared_library(source: pathlib.Path, flags: list[str], stem: str) -> pathlib.Path:
    """Compile ``source`` with ``flags`` into ``build_dir()/stem-<source_digest>.so`` unless already there,
    so an edited kernel is rebuilt; the library is written to a temporary name and renamed, so
    concurrent builds are safe.
    """
    key = source_digest(source, flags)
    out = build_dir() / f"{stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = shared_library_command(source, tmp, flags)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as error:  # callers handle build failures as RuntimeError
            raise RuntimeError(f"nvcc did not finish in {error.timeout} s ({' '.join(cmd)})") from error
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def unavailable_reason(what: str, env_var: str, device_index: int, load: Callable[[tuple[int, int]], object],
                       capabilities: tuple[tuple[int, int], ...] | None = KERNEL_CAPABILITIES) -> str | None:
    """Why the CUDA part ``what`` cannot run on CUDA device ``device_index`` (None: it can).

    ``env_var=0`` turns it off; ``capabilities`` lists the GPUs it is built for (None: any);
    ``load(capability)`` builds and loads it (on the first call, seconds), and its failure (OSError
    or RuntimeError) is a reason, logged once as a warning when the caller caches the answer.
    """
    if os.environ.get(env_var, "1") == "0":
        return f"turned off by {env_var}=0"
    if getattr(torch.version, "hip", None):
        return f"this torch is a ROCm build ({what} is CUDA only)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability(device_index)
    if capabilities is not None and cap not in capabilities:
        built = "/".join(f"sm_{a}{b}" for a, b in capabilities)
        return f"built for {built} only, this GPU is sm_{cap[0]}{cap[1]}"
    if nvcc_path() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    try:
        load(cap)
    except (OSError, RuntimeError) as error:
        log.warning("fp4_compile: the %s is off, its build or load failed: %s", what, error)
        return f"build or load failed: {error}"
    return None


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device where it names none: not cached, the
    current device may change)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def launch_on(device: torch.device, launch: Callable[[tuple[int, int], int], int]) -> int:
    """Run ``launch(capability, stream)``, a ctypes launch onto the current CUDA device and the raw
    stream handle it is given, for ``device``: its capability and its current stream. The current
    device is switched only when it is not ``device`` already: with the stream lookup, that took
    most of the host time of an eager call (benchmarks/profile_host.py)."""
    index = device_index(device)
    if index == torch.cuda.current_device():
        return launch(device_capability(index), torch._C._cuda_getCurrentRawStream(index))
    with torch.cuda.device(index):
        return launch(device_capability(index), torch._C._cuda_getCurrentRawStream(index))


def aligned_rows(t: torch.Tensor, row_bytes_multiple: int = 16, base_alignment: int = 16) -> torch.Tensor:
    """``t`` [M, K] (or [K]) as the CUDA kernels read it: unit-stride rows from a ``base_alignment``-byte aligned
    address, ``row_bytes_multiple`` bytes apart or a multiple of it (one row: any stride); else a fresh contiguous copy.
    (``contiguous()`` returns a contiguous tensor as it is, aligned or not: one row sliced out of a wider one
    faulted the quantization kernel, NOTES.md v49.)"""
    if t.stride(-1) == 1 and t.data_ptr() % base_alignment == 0 and (
            t.dim() == 1 or t.shape[0] <= 1 or (t.stride(0) * t.element_size()) % row_bytes_multiple == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def gemm_operands(what: str, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  alpha: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Check and normalize the operands of the ctypes-launched Hopper GEMMs (small-M, wgmma):
    CUDA tensors on one device, bf16/fp16 ``x`` with unit-stride, 16-byte aligned rows, e4m3 (or
    uint8) scales, ``alpha`` float32, ``bias`` contiguous in ``out_dtype`` (x.dtype or float32).
    Returns ``(x, weight_scale, alpha, bias)``; the scales as they came (the kernels read their bytes:
    a uint8 view per call cost host time)."""
    check_same_device(x=x, weight=weight, weight_scale=weight_scale, alpha=alpha, bias=bias)
    if x.device.type != "cuda":
        raise RuntimeError(f"the {what} needs CUDA tensors, got {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bf16 or fp16, got {x.dtype}")
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"out_dtype must be {x.dtype} or float32, got {out_dtype}")
    return (aligned_rows(x), *weight_operands(weight_scale, alpha, bias, out_dtype))


def weight_operands(weight_scale: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The weight-side part of ``gemm_operands``: ``(weight_scale, alpha, bias)``."""
    if weight_scale.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise TypeError(f"weight_scale must be float8_e4m3fn or uint8, got {weight_scale.dtype}")
    if bias is not None and (bias.dtype != out_dtype or not bias.is_contiguous()):
        bias = bias.to(out_dtype).contiguous()
    if alpha.dtype != torch.float32:
        alpha = alpha.float()
    return weight_scale, alpha, bias
