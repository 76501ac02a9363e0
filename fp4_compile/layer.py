"""NVFP4Linear and quantize_model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import format as fmt
from . import ops  # noqa: F401  (registers torch.ops.fp4)
from .backends import (SPECS, Backend, BackendError, convert_to_kernel_format, kernels_for, resolve_backend,
                       select_backend)

logger = logging.getLogger(__name__)


def _as_global_scale(value: torch.Tensor | float, name: str, device: torch.device) -> torch.Tensor:
    gs = torch.as_tensor(value, device=device)
    if gs.dtype != torch.float32 and not gs.is_floating_point():
        raise TypeError(f"{name} must be a float32 tensor or a float, got {gs.dtype}")
    gs = gs.float().reshape(-1)
    fmt.check_global_scale(gs, name)
    return gs.to(device)


class NVFP4Linear(nn.Module):
    """A linear layer with NVFP4 weights (and NVFP4 activations for W4A4 backends).

    Buffers: ``weight`` (packed e2m1 in the backend's kernel format), ``weight_scale``
    (e4m3 block scales, kernel format), ``weight_global_scale`` and ``input_global_scale``
    (quantization multipliers ``448*6/amax``; ``input_global_scale`` is None for dynamic
    activation scales), ``alpha`` (the GEMM's output factor, derived: not in the state dict) and ``bias``.
    The state dict holds ``weight`` and ``weight_scale`` in the linear (checkpoint) layout, whatever the backend.

    ``backend_follows_device``: True where no backend was named (it was selected for the weight's device).
    Moving such a layer to another device (``.to``, ``.cuda()``, ``.cpu()``, ``to_empty``) then selects that
    device's backend of the same semantics and re-lays the weight out for it, so a model quantized on the CPU
    runs the Hopper or Blackwell kernels once moved to the GPU, not the emulation. A named backend stays.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        weight_global_scale: torch.Tensor | float,
        *,
        input_global_scale: torch.Tensor | float | None = None,
        bias: torch.Tensor | None = None,
        backend: Backend | str | None = None,
    ) -> None:
        super().__init__()
        fmt.check_linear_weight(packed, scales)
        n, k = packed.shape[0], packed.shape[1] * 2
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        fmt.check_same_device(packed=packed, scales=scales, bias=bias)
        device = packed.device
        self.in_features, self.out_features = k, n
        target = resolve_backend(backend, device)
        self.backend = Backend.EMULATION  # the linear layout given here is the emulation format
        self.backend_follows_device = backend is None
        self.register_buffer("weight_global_scale", _as_global_scale(weight_global_scale, "weight_global_scale", device))
        self.register_buffer(
            "input_global_scale",
            None if input_global_scale is None else _as_global_scale(input_global_scale, "input_global_scale", device),
        )
        self.register_buffer("alpha", None, persistent=False)  # derived from the global scales (refresh_alpha)
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scale", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        convert_to_kernel_format(target, self)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        backend: Backend | str | None = None,
        input_global_scale: torch.Tensor | float | None = None,
        weight_global_scale: torch.Tensor | float | None = None,
    ) -> "NVFP4Linear":
        """Quantize an ``nn.Linear``'s weight (global scale from its amax unless given)."""
        return cls._from_checked_weight(_checked_weight(linear), linear.bias, backend=backend,
                                        input_global_scale=input_global_scale, weight_global_scale=weight_global_scale)

    @classmethod
    def _from_checked_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        backend: Backend | str | None,
        input_global_scale: torch.Tensor | float | None,
        weight_global_scale: torch.Tensor | float | None,
    ) -> "NVFP4Linear":
        """``from_linear`` of a weight that ``_checked_weight`` has checked (quantize_model checks every layer
        before it replaces any)."""
        if weight_global_scale is None:
            gs = fmt.global_scale_from_amax(weight.abs().amax().float()).reshape(1)
        else:
            gs = _as_global_scale(weight_global_scale, "weight_global_scale", weight.device)
        packed, scales = fmt.quantize_nvfp4(weight, gs)
        bias = None if bias is None else bias.detach().to(weight.dtype)
        return cls(packed, scales, gs, input_global_scale=input_global_scale, bias=bias, backend=backend)

    @property
    def semantics(self) -> str:
        return SPECS[self.backend].semantics

    def linear_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and its scales in the linear (checkpoint) layout: ``[N, K/2]``, ``[N, K/16]``."""
        return kernels_for(self.backend).restore_weight(
            self.weight, self.weight_scale, self.out_features, self.in_features
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed, scales = self.linear_weight()
        return fmt.dequantize_nvfp4(packed, scales, self.weight_global_scale, dtype=dtype)

    def refresh_alpha(self) -> None:
        """Recompute ``alpha`` from the global scales (after a backend or scale change)."""
        if self.semantics == "W4A16":
            self.alpha = torch.reciprocal(self.weight_global_scale)
        elif self.input_global_scale is not None:
            self.alpha = torch.reciprocal(self.input_global_scale * self.weight_global_scale)
        else:
            self.alpha = None  # dynamic: computed per call from the batch's scale

    def set_backend(self, backend: Backend | str | None = None) -> None:
        """Re-lay the weight out for ``backend`` (or the best one for the weight's device, which then follows
        the layer's moves: ``backend_follows_device``)."""
        convert_to_kernel_format(resolve_backend(backend, self.weight.device), self)
        self.backend_follows_device = backend is None

    # The format's buffers keep their dtypes through ``model.to(dtype)``, ``.half()``, ``.bfloat16()`` or
    # ``.type(dtype)``, which would cast the e4m3 scales (``.type`` the packed codes too) and round the float32
    # global scales (the layer then unusable): those calls only move them. The bias is cast with the model, as
    # nn.Linear's would be.
    _FORMAT_BUFFERS = ("weight", "weight_scale", "weight_global_scale", "input_global_scale", "alpha")

    def _apply(self, fn: Callable, recurse: bool = True) -> "NVFP4Linear":
        before = {name: self._buffers[name] for name in self._FORMAT_BUFFERS if self._buffers.get(name) is not None}
        device = self.weight.device
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if self.weight.device != device:
            self._follow_device()
        return self

    def __setstate__(self, state: dict) -> None:
        # unpickled (torch.load of a whole model, with map_location or on another machine; deepcopy): as after
        # a move, the backend of the device its tensors landed on
        super().__setstate__(state)
        if self._buffers.get("weight") is not None:
            self._follow_device()

    def _follow_device(self) -> None:
        """After a move: the new device's backend, where this layer's backend was selected, not named."""
        if (target := self._backend_to_follow(self.weight.device)) is not None:
            convert_to_kernel_format(target, self)

    def _backend_to_follow(self, device: torch.device) -> Backend | None:
        """The backend this layer takes on ``device`` where that is another of the same semantics and its
        backend was selected, not named; else None."""
        # (layers pickled whole before the attribute existed lack it)
        if not getattr(self, "backend_follows_device", False) or device.type == "meta":
            return None
        try:
            target = select_backend(device)
        except BackendError:  # FP4_GEMM_BACKEND names a backend that device lacks: its forward will say so
            return None
        return target if target != self.backend and SPECS[target].semantics == self.semantics else None

    # The state dict holds the weight in the linear (checkpoint) layout, whatever this layer's backend: a
    # state dict saved on one backend (triton-w4a4 on a GPU) then loads into a layer on any other (emulation on
    # the CPU), where kernel layouts of one shape would otherwise be read as another's.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"], destination[prefix + "weight_scale"] = self.linear_weight()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        self._take_linear_weight(state_dict, prefix)
        self._take_activation_scale(state_dict, prefix)
        state_dict.pop(prefix + "alpha", None)  # derived (state dicts saved before alpha left them hold it)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.refresh_alpha()

    def _take_linear_weight(self, state_dict: dict, prefix: str) -> None:
        """Re-lay a linear-layout weight of ``state_dict`` out in this layer's kernel format, in place (any
        other shape is left for nn.Module's loading to report)."""
        packed, scales = state_dict.get(prefix + "weight"), state_dict.get(prefix + "weight_scale")
        n, k = self.out_features, self.in_features
        linear_shapes = ((n, k // 2), (n, k // fmt.BLOCK_SIZE))
        if packed is None or scales is None or (tuple(packed.shape), tuple(scales.shape)) != linear_shapes:
            return
        on_meta = self.weight.device.type == "meta"
        device = packed.device if on_meta else self.weight.device
        if on_meta and (target := self._backend_to_follow(device)) is not None:
            self.backend = target  # a layer built on the meta device, loaded with assign=True: its device's backend
        weight, weight_scale = kernels_for(self.backend).prepare_weight(packed.to(device), scales.to(device))
        state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = weight, weight_scale

    def _take_activation_scale(self, state_dict: dict, prefix: str) -> None:
        """A static activation scale of ``state_dict`` goes into a tensor of this layer's own: layers may share
        one (share_equal_activation_scales), and copying into it would set them all; a dynamic layer becomes
        static. (A state dict without one leaves the layer's scale; a strict load reports it missing, as
        nn.Module does for any buffer: torch passes strict=True to every module's loading, so a layer cannot
        tell a dynamic layer's state dict from a partial one.)"""
        if prefix + "input_global_scale" in state_dict:
            self.input_global_scale = torch.empty_like(self.weight_global_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt.check_float_input(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, this layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:  # nothing to quantize (an amax of no values is undefined)
            return x.new_zeros(*lead, self.out_features)
        backend = self.backend.value
        bias = self.bias  # the output is in x's dtype, so is the bias it adds (one dtype on every path)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.semantics == "W4A16":
            global_scale, alpha = self.weight_global_scale, self.alpha
        elif self.input_global_scale is None:
            global_scale = fmt.dynamic_global_scale(x2)
            alpha = torch.reciprocal(global_scale * self.weight_global_scale)
        else:
            global_scale, alpha = self.input_global_scale, self.alpha
        if self.semantics == "W4A16" or (x2.device.type == "cuda" and not fmt.is_traced(x2)):
            # W4A16 has the fused op only. W4A4 run eagerly on a GPU takes it too (what
            # torch.compile(backend="fp4") makes of the chain below): the Hopper fast path replays its
            # eager calls in C++ (ops/fast_linear.py).
            out = torch.ops.fp4.linear(x2, self.weight, self.weight_scale, global_scale, alpha, bias,
                                       self.out_features, backend)
            return out.reshape(*lead, self.out_features)
        # The unfused chain; torch.compile(backend="fp4") fuses it into one fp4::linear.
        a, a_scale = torch.ops.fp4.quantize(x2, global_scale, SPECS[self.backend].swizzled_scales)
        k_padded = self.weight.shape[1] * 2
        if k_padded != self.in_features:
            a = torch.ops.fp4.pad_k(a, k_padded)
        out = torch.ops.fp4.mm(a, a_scale, self.weight, self.weight_scale, alpha, x.dtype, backend)
        if out.shape[1] != self.out_features:
            out = out[:, : self.out_features]
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        scale = "static" if self.input_global_scale is not None else "dynamic"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend.value} ({self.semantics}), activation_scale={scale}"
        )


def nvfp4_layers(model: nn.Module) -> dict[str, NVFP4Linear]:
    """The NVFP4 layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}


def _checked_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight of a linear that NVFP4 can represent (floating point and finite), detached."""
    weight = linear.weight.detach()
    fmt.check_float_input(weight, "linear.weight")
    fmt.check_finite(weight, "linear.weight")
    return weight


def _call_model(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate_input_amax(
    model: nn.Module, linears: dict[str, nn.Linear], calibration_data: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Run ``calibration_data`` through ``model`` and record each linear's input amax."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            value = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value

        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        with torch.no_grad():
            for batch in calibration_data:
                _call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return amax


def quantize_model(
    model: nn.Module,
    *,
    backend: Backend | str | None = None,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
    calibration_data: Iterable[Any] | None = None,
    weight_global_scales: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` by an :class:`NVFP4Linear`, in place, and return
    ``model`` (where ``model`` is itself an ``nn.Linear``: its NVFP4Linear, as a module cannot replace itself).

    ``filter_fn(name, linear)`` chooses layers; layers whose in_features is not a multiple
    of 16 are skipped with a logged reason. With ``calibration_data`` (an iterable of
    model inputs) activation global scales are static (calibrated amax); otherwise dynamic.
    ``weight_global_scales`` (layer name -> scale) overrides the per-layer weight amax, e.g.
    to give partitions that engines fuse (q/k/v) one global scale. Every layer is checked before any is
    replaced: one that cannot be quantized (a non-finite weight or scale) raises, naming it, with ``model``
    as it was. Each is then replaced as soon as it is quantized, so that its dense weight can go.
    """
    from tqdm.auto import tqdm

    linears: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        if module.in_features % fmt.BLOCK_SIZE:
            logger.info("skipping %s: in_features=%d is not a multiple of 16", name, module.in_features)
            continue
        linears[name] = module
    amax = calibrate_input_amax(model, linears, calibration_data) if calibration_data is not None else {}
    checked: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
    for name, linear in linears.items():
        try:
            weight = _checked_weight(linear)
            input_gs = None
            if name in amax:
                input_gs = _as_global_scale(fmt.global_scale_from_amax(amax[name]), "input_global_scale",
                                            linear.weight.device)
            weight_gs = (weight_global_scales or {}).get(name)
            if weight_gs is not None:
                weight_gs = _as_global_scale(weight_gs, "weight_global_scale", linear.weight.device)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name or type(model).__name__}: {e}") from e
        checked[name] = weight, input_gs, weight_gs
        if calibration_data is not None and name not in amax:
            logger.info("%s saw no calibration data: dynamic activation scale", name)
    for name in tqdm(list(linears), desc="quantizing to NVFP4", disable=not progress, unit="linear"):
        # (popped: once replaced, nothing here holds the dense layer, which can go)
        linear, (weight, input_gs, weight_gs) = linears.pop(name), checked.pop(name)
        new = NVFP4Linear._from_checked_weight(weight, linear.bias, backend=backend, input_global_scale=input_gs,
                                               weight_global_scale=weight_gs)
        if not name:  # the model is this linear
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    share_equal_activation_scales(model)
    return model


def share_equal_activation_scales(model: nn.Module) -> None:
    """Give the NVFP4 layers of ``model`` whose static activation global scales are equal (same value,
    device and dtype) one scale tensor. The linears of one input (q/k/v, gate/up) calibrate equal
    scales, and ``fp4::linear_group`` quantizes their shared activations once per scale tensor
    (passes/group_linear.py). Nothing changes numerically. ``model.to(...)`` and ``load_state_dict`` afterwards
    give each layer its own tensor again (correct, only without the saving): call this again after them."""
    shared: dict[tuple, torch.Tensor] = {}
    for module in model.modules():
        gs = getattr(module, "input_global_scale", None) if isinstance(module, NVFP4Linear) else None
        if gs is None:
            continue
        key = (gs.device, gs.dtype, tuple(gs.shape), gs.detach().cpu().numpy().tobytes())
        if shared.setdefault(key, gs) is not gs:
            module.input_global_scale = shared[key]
