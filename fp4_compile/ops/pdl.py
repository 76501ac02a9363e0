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


def pdl_allowed() -> bool:
    """Not turned off by ``FP4C_PDL=0``."""
    return os.environ.get("FP4C_PDL", "1") != "0"


def use_pdl(device: torch.device) -> bool:
    """Launch our kernels on ``device`` with PDL?"""
    if device.type != "cuda" or not pdl_allowed():
        return False
    return _capable(device_index(device))


def inductor_pdl_patch() -> dict[str, bool]:
    """The Inductor config that makes its Triton kernels launch with PDL too (they wait before reading
    what the kernel before wrote and let their dependents launch after their loads; Inductor generates
    it for sm_90+ only): then our GEMMs launch during the norms and pointwise kernels before them
    instead of after (benchmarks/NOTES.md v21). Empty where this torch lacks the option or FP4C_PDL=0."""
    import torch._inductor.config as inductor_config

    if not pdl_allowed() or not hasattr(inductor_config.triton, "enable_pdl"):
        return {}
    return {"triton.enable_pdl": True}
