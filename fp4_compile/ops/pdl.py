"""Programmatic dependent launch (PDL, sm_90): whether our kernels use it on a device.

A kernel launched with PDL may start while the kernel before it in the stream still runs; it
calls ``griddepcontrol.wait`` (Triton: ``gdc_wait``) before it touches memory, which blocks
until that grid has completed and its writes are visible. What overlaps is the launch and
ramp-up of one kernel with the tail of the other: 0.2-1 us per call at decode sizes on an
H100 (benchmarks/NOTES.md, v9). Used by the small-M and wgmma kernels, the Triton and CUDA
quantization kernels (which also let their dependent GEMM launch as soon as they start) and, for
W4A16, the Triton GEMM. ``FP4C_PDL=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

from .nvcc import device_capability, device_index


def _capable(device_index: int) -> bool:
    return device_capability(device_index) >= (9, 0)


def use_pdl(device: torch.device) -> bool:
    """Launch our kernels on ``device`` with PDL?"""
    if device.type != "cuda" or os.environ.get("FP4C_PDL", "1") == "0":
        return False
    return _capable(device_index(device))
