"""GEMM backends: names, capability checks, selection and weight preparation.

Each backend is a :class:`BackendSpec` (what it computes, what it needs) plus a kernels
object implementing :class:`BackendKernels`, imported lazily from the module the spec
names so that ``import fp4_compile`` never imports Triton, FlashInfer or FBGEMM.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

if TYPE_CHECKING:
    from .layer import NVFP4Linear

ENV_OVERRIDE = "FP4_GEMM_BACKEND"


class Backend(str, enum.Enum):
    """Backend names: vLLM's seven (``nvfp4_utils``) plus the project's own."""

    EMULATION = "emulation"
    CUTLASS = "cutlass"
    FLASHINFER_CUTLASS = "flashinfer-cutlass"
    FLASHINFER_TRTLLM = "flashinfer-trtllm"
    FLASHINFER_CUDNN = "flashinfer-cudnn"
    FBGEMM = "fbgemm"
    MARLIN = "marlin"
    CUBLAS = "cublas"
    TRITON_W4A4 = "triton-w4a4"

    def __str__(self) -> str:
        return self.value


class BackendError(ValueError):
    """An unknown or unavailable backend; the message lists every backend and why."""


class BackendKernels(Protocol):
    """What a backend's kernels module provides (one object per backend)."""

    def prepare_weight(self, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear-layout weight ``[N, K/2]`` and scales ``[N, K/16]`` -> kernel format (``weight.shape[0]`` = padded N)."""
        ...

    def restore_weight(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int, in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact inverse of :meth:`prepare_weight`."""
        ...

    def mm(
        self,
        a: torch.Tensor,
        a_scale: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        alpha: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """W4A4 GEMM on quantized operands -> ``[M, padded N]``."""
        ...

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_global_scale: torch.Tensor,
        alpha: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
    ) -> torch.Tensor:
        """Fused linear on ``x [M, K]`` -> ``[M, out_features]`` in ``x.dtype``."""
        ...


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _hopper_class_availability(device: torch.device) -> str | None:
    cap = _cuda_capability(device)
    if cap is None:
        return f"needs a CUDA GPU of sm_80 or newer (device is {device})"
    if cap < (8, 0):
        return f"needs sm_80 or newer (this GPU is sm_{cap[0]}{cap[1]})"
    if importlib.util.find_spec("triton") is None:
        return "needs the triton package"
    return None


def _blackwell_availability(backend: Backend) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        from .ops import blackwell  # light: it imports no GPU library

        return blackwell.availability(backend, device)

    return check


@dataclass(frozen=True)
class BackendSpec:
    backend: Backend
    semantics: str  # "W4A4" (activations quantized, Blackwell-exact) or "W4A16"
    requires: str  # for people: the hardware and packages it needs
    kernels: str  # "module:attribute" of its BackendKernels object
    alignment: int  # N and K of the prepared weight are multiples of this
    swizzled_scales: bool  # activation scales from fp4::quantize in the 128x4 layout
    availability: Callable[[torch.device], str | None]  # None if usable on the device, else why not


_BLACKWELL_REQUIRES = {
    Backend.CUTLASS: "sm_100/sm_103 GPU; nvcc >= 12.8, ninja and CUTLASS 4.x headers (pip nvidia-cutlass) "
    "to build fp4_compile's own kernel on first use",
    Backend.FLASHINFER_CUTLASS: "sm_100-family GPU; flashinfer-python (+ nvcc or flashinfer-jit-cache for its JIT)",
    Backend.FLASHINFER_TRTLLM: "sm_100-family GPU; flashinfer-python (+ nvcc or flashinfer-jit-cache; trtllm-gen "
    "cubins from flashinfer-cubin or a download); bf16 output",
    Backend.FLASHINFER_CUDNN: "sm_100-family GPU; flashinfer-python, nvidia-cudnn-frontend >= 1.13 and cuDNN >= 9.10",
    Backend.FBGEMM: "sm_100/sm_103 GPU; fbgemm-gpu-genai (torch.ops.fbgemm.f4f4bf16); bf16 output",
    Backend.CUBLAS: "sm_100-family GPU; torch built with CUDA >= 12.8 (cuBLASLt NVFP4 through scaled_mm)",
}

_HOPPER_REQUIRES = "sm_80+ (Hopper first) + triton; nvcc for the CUDA kernels (decode M, quantization, cuBLASLt call)"

SPECS: dict[Backend, BackendSpec] = {
    Backend.EMULATION: BackendSpec(
        Backend.EMULATION, "W4A4", "any device (CPU included)", "fp4_compile.ops.reference:EMULATION",
        1, False, lambda device: None,
    ),
    Backend.TRITON_W4A4: BackendSpec(
        Backend.TRITON_W4A4, "W4A4", _HOPPER_REQUIRES, "fp4_compile.ops.hopper:TRITON_W4A4",
        32, False, _hopper_class_availability,
    ),
    Backend.MARLIN: BackendSpec(
        Backend.MARLIN, "W4A16", _HOPPER_REQUIRES, "fp4_compile.ops.hopper:MARLIN",
        32, False, _hopper_class_availability,
    ),
    **{
        b: BackendSpec(
            b, "W4A4", req, f"fp4_compile.ops.blackwell:{b.name}", 32, True, _blackwell_availability(b)
        )
        for b, req in _BLACKWELL_REQUIRES.items()
    },
}

# Preference order per GPU family; the first available wins.
_PREFERENCE = (
    Backend.FLASHINFER_CUTLASS,
    Backend.CUBLAS,
    Backend.FBGEMM,
    Backend.FLASHINFER_TRTLLM,
    Backend.FLASHINFER_CUDNN,
    Backend.CUTLASS,
    Backend.TRITON_W4A4,
    Backend.EMULATION,
)


def parse_backend(name: str | Backend) -> Backend:
    if isinstance(name, Backend):
        return name
    try:
        return Backend(str(name).strip().lower())
    except ValueError:
        raise BackendError(f"unknown NVFP4 backend {name!r}.\n{_table(None)}") from None


def availability(backend: Backend | str, device: torch.device | str) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    return SPECS[parse_backend(backend)].availability(torch.device(device))


def describe_backends(device: torch.device | str | None = None) -> list[dict[str, str]]:
    """One row per backend: name, semantics, requirements, availability on ``device``."""
    device = torch.device(device) if device is not None else default_device()
    rows = []
    for spec in SPECS.values():
        reason = spec.availability(device)
        rows.append(
            {
                "backend": spec.backend.value,
                "semantics": spec.semantics,
                "requires": spec.requires,
                "available": "yes" if reason is None else "no",
                "reason": reason or "",
            }
        )
    return rows


def default_device() -> torch.device:
    """CUDA where torch sees a GPU, else the CPU: where layers, checkpoints and the CLI go by default."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_runnable_device(device: torch.device) -> None:
    """A CPU, or a CUDA device where torch sees a GPU; ValueError otherwise."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"must be a CPU or CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"no CUDA device is available here (torch {torch.__version__} sees no CUDA GPU)")


def _table(device: torch.device | None) -> str:
    lines = [f"backends on {device or default_device()}:"]
    for row in describe_backends(device):
        state = "available" if row["available"] == "yes" else f"unavailable: {row['reason']}"
        lines.append(f"  {row['backend']:<19} {row['semantics']:<6} {state}")
    return "\n".join(lines)


def select_backend(device: torch.device | str | None = None) -> Backend:
    """The best backend for ``device``; ``FP4_GEMM_BACKEND=name`` overrides the choice."""
    device = torch.device(device) if device is not None else default_device()
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        return resolve_backend(override, device)
    for backend in _PREFERENCE:
        if SPECS[backend].availability(device) is None:
            return backend
    return Backend.EMULATION


def resolve_backend(backend: Backend | str | None, device: torch.device | str | None = None) -> Backend:
    """``backend`` checked for ``device``, or the selected one when None. Raises :class:`BackendError`."""
    device = torch.device(device) if device is not None else default_device()
    if backend is None:
        return select_backend(device)
    backend = parse_backend(backend)
    reason = SPECS[backend].availability(device)
    if reason is not None:
        raise BackendError(f"NVFP4 backend '{backend.value}' is not available: {reason}.\n{_table(device)}")
    return backend


def kernels_for(backend: Backend | str) -> BackendKernels:
    """The kernels object of ``backend`` (imports its module on first use)."""
    return _kernels(SPECS[parse_backend(backend)].kernels)


@functools.cache
def _kernels(location: str) -> BackendKernels:
    """The object at ``"module:attr"`` (cached: a lookup per call cost host time)."""
    module, attr = location.split(":")
    return getattr(importlib.import_module(module), attr)


def convert_to_kernel_format(backend: Backend | str, layer: "NVFP4Linear") -> None:
    """Re-lay ``layer``'s weight and scales out for ``backend`` (swizzle, pad, shuffle)."""
    backend = parse_backend(backend)
    packed, scales = layer.linear_weight()
    weight, weight_scale = kernels_for(backend).prepare_weight(packed, scales)
    layer.weight = weight
    layer.weight_scale = weight_scale
    layer.backend = backend
    layer.refresh_alpha()
