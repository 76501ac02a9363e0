"""The ``fp4`` torch.library ops, each defined once next to its fake kernel.

All ops are functional (no mutation), so the Inductor pattern matcher sees them as
plain nodes. Implementations dispatch on the ``backend`` argument through
:func:`fp4_compile.backends.kernels_for`; fake kernels only compute shapes and work
with a symbolic M.

Why ``torch.library.Library`` rather than ``torch.library.custom_op``: an eager call of a
``custom_op`` passes through more Python wrappers (dynamo guard, autograd, aliasing check): the
same kernel behind one took 15-20 us more host time per call on the GPU machines
(``benchmarks/profile_host.py``, NOTES.md v10), and eager prefill is bound by host time.
The ops are for inference: where an input needs a gradient, the outputs get a backward that raises
(as a ``custom_op`` without a registered backward does). On Hopper the eager fast path
(ops/fast_linear.py) replaces the Python Autograd kernel of the ops a model's forward calls with a C++
one for CUDA tensors: the Python hop cost each eager call about 20 us.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import format as fmt
from ..backends import kernels_for, parse_backend

_LIB = torch.library.Library("fp4", "DEF")


def _below_autograd(op: torch._ops.OpOverload, keyset, args: tuple):
    """The op's kernels past the Autograd key, from its Autograd kernel."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _no_backward_message(op_name: str) -> str:
    return (f"{op_name} has no backward: the NVFP4 layers are for inference "
            "(run them under torch.no_grad() or torch.inference_mode())")


class _NoBackward(torch.autograd.Function):
    """Runs an op below autograd and gives its outputs a backward that raises when it runs.

    The backward is ``fp4::_no_backward`` per input that needs a gradient, not a raise in Python: AOT
    autograd traces the backward while compiling a model whose output needs a gradient (any other
    parameter does, in grad mode), and that trace (on fake tensors) must succeed; only running it
    raises. It depends on the output's gradient alone, so the forward saves nothing for it."""

    @staticmethod
    def forward(ctx, op: torch._ops.OpOverload, keyset, *args):
        name = op._schema.name  # the op the user called, not its Python twin (fp4::_<op>_python)
        ctx.op_name = name[:-len("_python")].replace("::_", "::", 1) if name.endswith("_python") else name
        ctx.inputs = [(a.shape, a.dtype) if isinstance(a, Tensor) else None for a in args]
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros made from nothing
        return _below_autograd(op, keyset, args)

    @staticmethod
    def backward(ctx, *grads):
        grad = next((g for g in grads if g is not None), None)
        if grad is None:
            return (None,) * (2 + len(ctx.inputs))
        return (None, None, *(torch.ops.fp4._no_backward(grad, *ctx.inputs[i], ctx.op_name) if needs else None
                              for i, needs in enumerate(ctx.needs_input_grad[2:])))


def _inference_autograd(op: torch._ops.OpOverload) -> Callable:
    """The op's Autograd kernel: below autograd straight away when no input needs a gradient. An op
    with tensor-list arguments or outputs (``fp4::linear_group``) raises at once where one does:
    an ``autograd.Function`` would not see the tensors inside a list."""
    lists = any(isinstance(a.type, torch.ListType) for a in (*op._schema.arguments, *op._schema.returns))

    def kernel(keyset, *args):
        if torch._C.is_grad_enabled():
            if not lists:
                if torch._C._any_requires_grad(*args):
                    return _NoBackward.apply(op, keyset, *args)
            elif torch._C._any_requires_grad(*(t for a in args for t in (a if isinstance(a, list) else (a,))
                                               if isinstance(t, torch.Tensor))):
                raise RuntimeError(_no_backward_message(op._schema.name))
        return _below_autograd(op, keyset, args)
    return kernel


def _define(schema: str, fake: Callable) -> Callable:
    """Define ``fp4::<schema>`` with the decorated function as its kernel on every device and
    ``fake`` as its fake (meta) kernel. Every op has the inference Autograd kernel, the integer-output
    ones too: with an autograd fallthrough instead, AOT autograd lost the requires-grad of a layer's
    output (its backward silently absent rather than raising)."""
    name = schema.split("(", 1)[0]

    def register(fn: Callable) -> Callable:
        _LIB.define(schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        _LIB.impl(name, _inference_autograd(getattr(torch.ops.fp4, name).default), "Autograd", with_keyset=True)
        torch.library.register_fake(f"fp4::{name}", fake, lib=_LIB)
        return fn
    return register


def _no_backward_fake(grad: Tensor, shape: list[int], dtype: torch.dtype, op: str) -> Tensor:
    return grad.new_empty(shape, dtype=dtype)


# The gradient of an input of ``op`` (``shape``, ``dtype``): raises when it runs (_NoBackward).
_LIB.define("_no_backward(Tensor grad, SymInt[] shape, ScalarType dtype, str op) -> Tensor")


def _no_backward(grad: Tensor, shape: list[int], dtype: torch.dtype, op: str) -> Tensor:
    raise RuntimeError(_no_backward_message(op))


_LIB.impl("_no_backward", _no_backward, "CompositeExplicitAutograd")
torch.library.register_fake("fp4::_no_backward", _no_backward_fake, lib=_LIB)


def _check_activation(x: Tensor, global_scale: Tensor) -> None:
    fmt.check_float_input(x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first), got shape {tuple(x.shape)}")
    fmt.check_global_scale(global_scale, "input_global_scale", check_value=False)
    fmt.check_same_device(x=x, input_global_scale=global_scale)


def _check_weight(weight: Tensor, weight_scale: Tensor, alpha: Tensor) -> None:
    if weight.dtype != torch.uint8:
        raise TypeError(f"weight must be packed uint8 NVFP4, got {weight.dtype}")
    if weight_scale.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"weight_scale must be float8_e4m3fn (or its uint8 view), got {weight_scale.dtype}")
    fmt.check_global_scale(alpha, "alpha", check_value=False)


def _quantize_fake(x: Tensor, global_scale: Tensor, swizzle: bool = False) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    shape = fmt.swizzled_scale_shape(m, k) if swizzle else (m, k // fmt.BLOCK_SIZE)
    return x.new_empty((m, k // 2), dtype=torch.uint8), x.new_empty(shape, dtype=torch.float8_e4m3fn)


@_define("quantize(Tensor x, Tensor global_scale, bool swizzle=False) -> (Tensor, Tensor)", _quantize_fake)
def quantize(x: Tensor, global_scale: Tensor, swizzle: bool = False) -> tuple[Tensor, Tensor]:
    """x [M, K] -> packed uint8 [M, K/2], scales fp8 (linear [M, K/16] or 128x4 swizzled)."""
    _check_activation(x, global_scale)
    if x.device.type == "cuda":
        from .gpu_quant import quantize_nvfp4_gpu

        return quantize_nvfp4_gpu(x, global_scale, swizzle)
    from .reference import quantize as quantize_reference

    return quantize_reference(x, global_scale, swizzle)


def _pad_k_fake(packed: Tensor, k_padded: int) -> Tensor:
    return packed.new_empty((packed.shape[0], k_padded // 2))


@_define("pad_k(Tensor packed, int k_padded) -> Tensor", _pad_k_fake)
def pad_k(packed: Tensor, k_padded: int) -> Tensor:
    """Zero-pad packed activations [M, K/2] to K = k_padded elements."""
    if k_padded // 2 < packed.shape[1] or k_padded % 2:
        raise ValueError(f"k_padded={k_padded} must be even and >= K={packed.shape[1] * 2}")
    padded = fmt.pad_activation_for_alignment(packed, k_padded)
    return padded.clone() if padded is packed else padded  # ops must not return an alias


def _mm_fake(a, a_scale, weight, weight_scale, alpha, out_dtype, backend):
    return a.new_empty((a.shape[0], weight.shape[0]), dtype=out_dtype)


@_define("mm(Tensor a, Tensor a_scale, Tensor weight, Tensor weight_scale, Tensor alpha, ScalarType out_dtype, "
         "str backend) -> Tensor", _mm_fake)
def mm(
    a: Tensor,
    a_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    alpha: Tensor,
    out_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    """W4A4 GEMM on quantized operands: alpha * (a . weight^T) -> [M, padded N] in out_dtype."""
    if a.dtype != torch.uint8:
        raise TypeError(f"a must be packed uint8 NVFP4, got {a.dtype}")
    _check_weight(weight, weight_scale, alpha)
    fmt.check_same_device(a=a, a_scale=a_scale, weight=weight, weight_scale=weight_scale, alpha=alpha)
    return kernels_for(backend).mm(a, a_scale, weight, weight_scale, alpha, out_dtype)


def _check_bias(x: Tensor, bias: Tensor | None, out_features: int) -> None:
    """A linear's bias: [out_features] in x's dtype (the output's: the fake kernels promise it)."""
    if bias is None:
        return
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias must have x's dtype {x.dtype} (the output's), got {bias.dtype}")


def _linear_fake(x, weight, weight_scale, input_global_scale, alpha, bias, out_features, backend):
    _check_bias(x, bias, out_features)
    return x.new_empty((x.shape[0], out_features))


_LINEAR_ARGS = ("(Tensor x, Tensor weight, Tensor weight_scale, Tensor input_global_scale, Tensor alpha, "
                "Tensor? bias, SymInt out_features, str backend) -> Tensor")


@_define("linear" + _LINEAR_ARGS, _linear_fake)
def linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_global_scale: Tensor,
    alpha: Tensor,
    bias: Tensor | None,
    out_features: int,
    backend: str,
) -> Tensor:
    """The fused NVFP4 linear: quantize x + pad + GEMM * alpha + slice + bias -> [M, out_features]."""
    _check_linear(x, weight, weight_scale, input_global_scale, alpha, bias, out_features, backend)
    out = kernels_for(backend).linear(x, weight, weight_scale, input_global_scale, alpha, bias, out_features)
    return out.contiguous()  # the fake kernel promises a contiguous [M, N] (a sliced GEMM output is not)


def _check_linear(x, weight, weight_scale, input_global_scale, alpha, bias, out_features, backend) -> None:
    _check_activation(x, input_global_scale)
    _check_weight(weight, weight_scale, alpha)
    fmt.check_same_device(x=x, weight=weight, weight_scale=weight_scale, alpha=alpha, bias=bias)
    _check_bias(x, bias, out_features)
    parse_backend(backend)


# The same implementation under a second name: on Hopper, fp4::linear's CUDA kernel may be the eager
# fast path (ops/fast_linear.py), which calls this for every call it does not replay itself.
_define("_linear_python" + _LINEAR_ARGS, _linear_fake)(linear)


def _linear_group_fake(x, weights, weight_scales, input_global_scales, alphas, biases, out_features, backend):
    for bias, n in zip(biases, out_features, strict=True):
        _check_bias(x, bias, n)
    return [x.new_empty((x.shape[0], n)) for n in out_features]


def _checked_members(x, *lists_and_backend) -> list[tuple]:
    """The per-linear argument tuples (weight, weight_scale, input_global_scale, alpha, bias, out_features) of
    a list-taking op, each checked as ``fp4::linear`` checks its arguments."""
    *lists, backend = lists_and_backend
    members = list(zip(*lists, strict=True))
    for weight, weight_scale, gs, alpha, bias, n in members:
        _check_linear(x, weight, weight_scale, gs, alpha, bias, n, backend)
    return members


# The arguments of the ops over several linears of one activation (their out_features and returns differ).
_LINEARS_ARGS = ("(Tensor x, Tensor[] weights, Tensor[] weight_scales, Tensor[] input_global_scales, "
                 "Tensor[] alphas, Tensor?[] biases, ")
_LINEAR_GROUP_ARGS = _LINEARS_ARGS + "SymInt[] out_features, str backend) -> Tensor[]"


@_define("linear_group" + _LINEAR_GROUP_ARGS, _linear_group_fake)
def linear_group(
    x: Tensor,
    weights: list[Tensor],
    weight_scales: list[Tensor],
    input_global_scales: list[Tensor],
    alphas: list[Tensor],
    biases: list[Tensor | None],
    out_features: list[int],
    backend: str,
) -> list[Tensor]:
    """``[fp4::linear(x, weights[i], ...) for i]``: several linears of the same activations (a layer's
    q/k/v or gate/up projections), which a backend may compute in one launch (``linear_group`` of its
    kernels, returning None where it can't; each member's result is then its own ``linear``). The
    ``fp4`` compile pass groups the linears of one input at decode sizes (passes/group_linear.py)."""
    members = _checked_members(x, weights, weight_scales, input_global_scales, alphas, biases, out_features, backend)
    if not members:
        raise ValueError("linear_group needs at least one linear")
    kernels = kernels_for(backend)
    group = getattr(kernels, "linear_group", None)
    outs = group(x, members) if group is not None else None
    if outs is None:
        outs = [kernels.linear(x, weight, weight_scale, gs, alpha, bias, n)
                for weight, weight_scale, gs, alpha, bias, n in members]
        _remember_members(backend, x, members, gated=False)
    return [out.contiguous() for out in outs]


def _remember_members(backend: str, x: Tensor, members: list[tuple], gated: bool) -> None:
    """An eager CUDA call of a group op ran its members as their own linears: so will the fast path's replays
    (a backend that launches the group records that itself, ops/hopper.py)."""
    if x.is_cuda:
        from .fast_linear import remember_group

        remember_group(backend, x, members, gated)


# As _linear_python: the eager fast path's CUDA kernel of fp4::linear_group replays the members one by
# one and calls this under CUDA-graph capture (where the grouped launch pays).
_define("_linear_group_python" + _LINEAR_GROUP_ARGS, _linear_group_fake)(linear_group)


def _linear_silu_mul_fake(x, weights, weight_scales, input_global_scales, alphas, biases, out_features, backend):
    for bias in biases:
        _check_bias(x, bias, out_features)
    return x.new_empty((x.shape[0], out_features))


_LINEAR_SILU_MUL_ARGS = _LINEARS_ARGS + "SymInt out_features, str backend) -> Tensor"


@_define("linear_silu_mul" + _LINEAR_SILU_MUL_ARGS, _linear_silu_mul_fake)
def linear_silu_mul(
    x: Tensor,
    weights: list[Tensor],
    weight_scales: list[Tensor],
    input_global_scales: list[Tensor],
    alphas: list[Tensor],
    biases: list[Tensor | None],
    out_features: int,
    backend: str,
) -> Tensor:
    """``F.silu(linear(x, gate)) * linear(x, up)`` (``weights`` etc. = [gate's, up's], both of ``out_features``
    outputs): a gated MLP's first half. A backend may compute it in one launch (``linear_silu_mul`` of its
    kernels, returning None where it can't); otherwise the two linears run as ``fp4::linear_group`` and
    ``silu_mul`` after them. The ``fp4`` compile pass makes it from the graph (passes/fuse_silu_mul.py)."""
    if len(weights) != 2:
        raise ValueError("linear_silu_mul takes two linears (gate, up)")
    members = _checked_members(x, weights, weight_scales, input_global_scales, alphas, biases, [out_features] * 2,
                               backend)
    fused = getattr(kernels_for(backend), "linear_silu_mul", None)
    out = fused(x, members) if fused is not None else None
    if out is None:
        from .silu_mul import silu_mul

        gate, up = torch.ops.fp4.linear_group.default(x, weights, weight_scales, input_global_scales, alphas, biases,
                                                      [out_features] * 2, backend)
        out = silu_mul(gate, up)
        _remember_members(backend, x, members, gated=True)
    return out.contiguous()


# As _linear_python: the eager fast path's CUDA kernel of fp4::linear_silu_mul calls this for every call it
# does not replay itself.
_define("_linear_silu_mul_python" + _LINEAR_SILU_MUL_ARGS, _linear_silu_mul_fake)(linear_silu_mul)


def _rms_norm_quantize_fake(x, residual, weight, eps, global_scale, unit_offset=False):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


_RMS_NORM_QUANTIZE_ARGS = ("(Tensor x, Tensor? residual, Tensor weight, float eps, Tensor global_scale, "
                           "bool unit_offset=False) -> (Tensor, Tensor)")


@_define("rms_norm_quantize" + _RMS_NORM_QUANTIZE_ARGS, _rms_norm_quantize_fake)
def rms_norm_quantize(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                      global_scale: Tensor, unit_offset: bool = False) -> tuple[Tensor, Tensor]:
    """``(values, s)``: ``s = x + residual`` (empty without a residual), ``h = (s * rsqrt(mean(s^2) + eps)).to(dtype)
    * weight`` (an RMSNorm, rounded as its eager ops round) and ``values``, the exact NVFP4 block values
    ``e2m1 * sf`` of ``h`` quantized with ``global_scale`` (without ``1/gs``), in x's dtype and shape: what the
    Hopper W4A4 GEMMs multiply. ``unit_offset``: Gemma's norm instead, ``h = (s * rsqrt(mean(s^2) + eps) *
    (1 + weight)).to(dtype)`` in float32, rounded once. One pass on the GPU (ops/rms_norm_quant.py); the
    ``fp4`` compile pass makes it from an RMSNorm before W4A4 linears (passes/fuse_rms_norm_quant.py)."""
    fmt.check_float_input(x)
    k = x.shape[-1]
    if k % fmt.BLOCK_SIZE:
        raise ValueError(f"x: K={k} must be a multiple of {fmt.BLOCK_SIZE}")
    if tuple(weight.shape) != (k,) or weight.dtype != x.dtype or (
            residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)):
        raise ValueError(f"weight must be [{k}] and residual {tuple(x.shape)}, both in {x.dtype}")
    fmt.check_global_scale(global_scale, "global_scale", check_value=False)
    fmt.check_same_device(x=x, residual=residual, weight=weight, global_scale=global_scale)
    x2 = x.reshape(-1, k)
    r2 = residual.reshape(-1, k) if residual is not None else None
    if x.device.type == "cuda":
        from .rms_norm_quant import rms_norm_quantize_gpu

        values, total = rms_norm_quantize_gpu(x2, r2, weight, eps, global_scale, unit_offset)
    else:
        total = x2 + r2 if r2 is not None else None
        s = (total if total is not None else x2).float()
        normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
        h = (normed * (1.0 + weight.float())).to(x.dtype) if unit_offset else normed.to(x.dtype) * weight
        values = fmt.block_values(*fmt.quantize_nvfp4(h, global_scale.reshape(1).float())).to(x.dtype)
    return values.reshape(x.shape), (total.reshape(x.shape) if total is not None else x.new_empty((0,)))


# As _linear_python: the eager fast path's Autograd kernel of fp4::rms_norm_quantize (csrc/hopper/fast_linear.cpp)
# calls this where an input needs a gradient, so that the outputs get the Python kernel's raising backward.
_define("_rms_norm_quantize_python" + _RMS_NORM_QUANTIZE_ARGS, _rms_norm_quantize_fake)(rms_norm_quantize)
