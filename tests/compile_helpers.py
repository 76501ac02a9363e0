"""Shared by tests/test_passes.py and tests/test_compile.py (not a test module).

- :class:`PaddedEmulation`: the emulation backend in a Blackwell-like layout (N and K
  padded to 32, optionally 128x4-swizzled scales), so that the pad_k / slice / swizzle
  variants of the eager chain run, exactly, on the CPU. :func:`patch_padded_backends`
  installs it in place of two sm_100 backends for the duration of a test.
- :class:`SnapshotBackend`: a torch.compile backend (as vLLM's tests/compile/backend.py)
  that runs the fp4 post-grad pass and keeps copies of the graph before and after it.
- :func:`tiny_transformer`: attention + MLP with several NVFP4Linears.
- :func:`trace_module`: make_fx (fake) of a module's forward, its parameters and buffers as graph inputs.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fp4_compile import format as fmt
from fp4_compile.backends import SPECS, Backend
from fp4_compile.ops.reference import EMULATION, linear_by_steps, quantize as reference_quantize
from fp4_compile.passes import FP4PostGradPass
from models import Block


class PaddedEmulation:
    """Exact W4A4 emulation on 32-aligned weights; ``swizzle``: 128x4 scale layout."""

    def __init__(self, swizzle: bool) -> None:
        self.swizzle = swizzle

    def prepare_weight(self, packed, scales):
        packed, scales = fmt.pad_weight_for_alignment(packed, scales, fmt.ALIGNMENT)
        return packed, fmt.swizzle_blockscale(scales) if self.swizzle else scales

    def restore_weight(self, weight, weight_scale, out_features, in_features):
        if self.swizzle:
            weight_scale = fmt.unswizzle_blockscale(weight_scale, weight.shape[0], weight.shape[1] * 2)
        return (
            weight[:out_features, : in_features // 2].contiguous(),
            weight_scale[:out_features, : in_features // fmt.BLOCK_SIZE].contiguous(),
        )

    def _linear_scales(self, scales, rows, k):
        if self.swizzle:
            return fmt.unswizzle_blockscale(scales, rows, k)
        missing = k // fmt.BLOCK_SIZE - scales.shape[1]
        if missing:
            zeros = torch.zeros((rows, missing), dtype=torch.uint8, device=scales.device)
            scales = torch.cat((scales.view(torch.uint8), zeros), dim=1).view(scales.dtype)
        return scales

    def mm(self, a, a_scale, weight, weight_scale, alpha, out_dtype):
        k = a.shape[1] * 2
        a_scale = self._linear_scales(a_scale, a.shape[0], k)
        weight_scale = self._linear_scales(weight_scale, weight.shape[0], k)
        return EMULATION.mm(a, a_scale, weight, weight_scale, alpha, out_dtype)

    def linear(self, x, weight, weight_scale, input_global_scale, alpha, bias, out_features):
        return linear_by_steps(self, reference_quantize, x, weight, weight_scale, input_global_scale, alpha, bias,
                               out_features, swizzle=self.swizzle)


PADDED_SWIZZLED = PaddedEmulation(swizzle=True)
PADDED_LINEAR = PaddedEmulation(swizzle=False)

# Backend names whose specs patch_padded_backends replaces (any sm_100 names would do).
SWIZZLED = Backend.CUTLASS.value
UNSWIZZLED = Backend.FBGEMM.value


def patch_padded_backends(monkeypatch) -> None:
    """Make 'cutlass' (swizzled) and 'fbgemm' (linear scales) padded emulations on any device."""
    for backend, attr, swizzle in ((Backend.CUTLASS, "PADDED_SWIZZLED", True), (Backend.FBGEMM, "PADDED_LINEAR", False)):
        spec = dataclasses.replace(
            SPECS[backend],
            kernels=f"{__name__}:{attr}",
            alignment=fmt.ALIGNMENT,
            swizzled_scales=swizzle,
            availability=lambda device: None,
        )
        monkeypatch.setitem(SPECS, backend, spec)


# ---------------------------------------------------------------------------------------
# graph helpers


def op_counts(graph: torch.fx.Graph) -> Counter:
    return Counter(n.target for n in graph.nodes if n.op == "call_function")


class SnapshotBackend:
    """torch.compile backend: Inductor with the fp4 pass, keeping the graph before/after it."""

    def __init__(self) -> None:
        self.fp4_pass = FP4PostGradPass()
        self.before: list[torch.fx.Graph] = []
        self.after: list[torch.fx.Graph] = []

    def post_pass(self, graph: torch.fx.Graph) -> None:
        self.before.append(copy.deepcopy(graph))
        self.fp4_pass(graph)
        self.after.append(copy.deepcopy(graph))

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(
            gm, example_inputs, config_patches={"post_grad_custom_post_pass": self.post_pass, "fx_graph_cache": False}
        )


# ---------------------------------------------------------------------------------------
# models


def tiny_transformer(*, backend: str = "emulation", static: bool = True, seed: int = 0) -> nn.Module:
    """A Block quantized to NVFP4 (5 linears). ``static``: calibrated activation scales,
    except ``fc2`` which stays dynamic, so both kinds are in every graph."""
    from fp4_compile import quantize_model

    torch.manual_seed(seed)
    model = Block().eval()
    calibration = [torch.randn(2, 8, 64)] if static else None
    quantize_model(model, backend=backend, calibration_data=calibration, progress=False)
    if static:
        model.fc2.input_global_scale = None
        model.fc2.refresh_alpha()
    return model


class ExactGlue(nn.Module):
    """Several NVFP4Linear variants joined by ops that Inductor computes bit-exactly
    (views, relu, add, mul), so compiled == eager holds exactly."""

    def __init__(self, backend: str = "emulation", k: int = 64, n: int = 64) -> None:
        super().__init__()
        from fp4_compile import NVFP4Linear

        self.a = NVFP4Linear.from_linear(nn.Linear(k, n), backend=backend)  # dynamic, bias
        self.b = NVFP4Linear.from_linear(nn.Linear(n, k, bias=False), backend=backend, input_global_scale=2.0)
        self.c = NVFP4Linear.from_linear(nn.Linear(k, n), backend=backend, input_global_scale=1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(x + self.b(h)) * 0.5


def trace_module(module: nn.Module, *args, **kwargs) -> tuple[torch.fx.GraphModule, dict]:
    """make_fx (fake) of ``module(*args, **kwargs)`` with its buffers and parameters as graph inputs: the
    graph module, called as ``gm(params, args, kwargs)``, and those params."""
    params = {**dict(module.named_buffers()), **dict(module.named_parameters())}

    def forward(params, args, kwargs):
        return torch.func.functional_call(module, params, args, kwargs)

    with torch.no_grad():
        return make_fx(forward, tracing_mode="fake")(params, args, kwargs), params
