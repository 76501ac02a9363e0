"""Every Triton launch of the package: on its tensors' device, and loadable inside a CUDA-graph capture.

The device: Triton launches on the current device's stream, not on its tensors' device, so a layer on
``cuda:1`` called while ``cuda:0`` is current (a model spread over GPUs in one process) would launch on the
wrong device. ``launch_triton`` makes the first tensor argument's device current for the launch, as the
CUDA kernels' launches do (``nvcc.launch_on``) and PyTorch's own ops do.

The capture: Triton loads a kernel's module (``cuModuleLoadData``) at its first launch in a process. A
capture in PyTorch's default (global) mode refuses that call, which invalidates the whole capture. Warming a
graph up eagerly, as one should, does not always load what the capture will launch here: the backends send
captured calls, which have no host time to save, to Triton kernels where eager calls of the same shape take
the CUDA ones (``hopper.py``, ``cuda_quant.use_cuda_quant``). So while a capture is under way the launch runs
with this thread's capture mode relaxed, as PyTorch's caching allocator does around ``cudaMalloc``: the module
loads at once, the launch is recorded as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from typing import Any

import torch

_CAPTURE_MODE_RELAXED = 2  # CUstreamCaptureMode: CU_STREAM_CAPTURE_MODE_RELAXED


@functools.cache
def _exchange_capture_mode() -> Any:
    """The driver's ``cuThreadExchangeStreamCaptureMode`` (libcuda is loaded wherever a capture runs)."""
    fn = ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode
    fn.argtypes = [ctypes.POINTER(ctypes.c_int)]
    fn.restype = ctypes.c_int
    return fn


def _exchange(mode: ctypes.c_int) -> None:
    err = _exchange_capture_mode()(ctypes.byref(mode))
    if err:
        raise RuntimeError(f"cuThreadExchangeStreamCaptureMode failed: CUDA driver error {err}")


@contextlib.contextmanager
def module_loads_allowed() -> Iterator[None]:
    """Within it, this thread may load CUDA modules even while its current stream is being captured."""
    if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
        yield
        return
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    _exchange(mode)
    try:
        yield
    finally:
        _exchange(mode)  # back to the mode the capture set


def _cuda_device(args: tuple) -> torch.device | None:
    """The device of the first tensor argument, if it is a CUDA tensor."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return tensor.device if tensor is not None and tensor.is_cuda else None


def launch_triton(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)`` on the first tensor argument's device, loading the kernel first if a
    capture launches it first. Eager calls pay for neither where neither applies (entering both on every launch
    cost 10-17 us of host time a launch over the plain launch on an H100 host; now 3.5-4.4, NOTES.md v37f)."""
    device = _cuda_device(args)
    if device is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return launch_triton(kernel, grid, *args, **kwargs)
    if device is None or not torch.cuda.is_current_stream_capturing():
        return kernel[grid](*args, **kwargs)
    with module_loads_allowed():
        return kernel[grid](*args, **kwargs)
