"""Fuse an RMSNorm (and the residual add before it) with the activation quantization of the W4A4 linears
it feeds: one ``fp4::rms_norm_quantize`` node (vLLM's ``RMSNormQuantFusionPass`` for NVFP4).

In a Llama layer the q/k/v and gate/up projections read ``h = rmsnorm(x + residual)``. Unfused, a W4A4
step runs Inductor's add+norm kernel, then a quantization kernel inside each ``fp4.linear`` /
``fp4.linear_group`` / ``fp4.linear_silu_mul``, then the GEMM. Post-grad, the norm reads::

    s = x + r                                   # (optional) the residual stream, used later too
    c = convert_element_type(s, float32)        # (16-bit s only)
    n = convert_element_type(c * rsqrt(mean(c ** 2, [-1], True) + eps), bf16)
    h = n * weight
    ... fp4.linear_group(view(h, [-1, K]), ..., gs, ..., "triton-w4a4") ...

which becomes ``values, s = fp4.rms_norm_quantize(x, r, weight, eps, gs)``: ``s`` replaces the add for its
other users, and the linears read ``values``, the exact NVFP4 block values of ``h`` (``e2m1 * sf``). A
W4A4 GEMM on block values is the W4A16 GEMM on them with W4A4's alpha (the values are exact in bf16 and
fp16): the Hopper ``marlin`` kernels, which share ``triton-w4a4``'s weight layout. So those linears run
with backend ``marlin``, and the step loses one launch per norm. Results are the W4A4 layers' own (up to
fp32 summation order).

Gemma's norm, ``h = convert_element_type(c * rsqrt(...) * (convert_element_type(weight, float32) + 1.0),
bf16)`` (float32 throughout, rounded once), becomes ``fp4.rms_norm_quantize(x, r, weight, eps, gs, True)``.

Only where every user of ``h`` is such a linear of backend ``triton-w4a4``, all with one activation scale
that is a graph input (static, calibrated); dynamic scales, other backends (Blackwell's take codes, not
values) and norms with other users are left alone.
"""

from __future__ import annotations

import logging
import operator

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fp4)
from .fx_nodes import VIEWS, conversion, dtype_of, is_call, node_order

logger = logging.getLogger(__name__)

aten = torch.ops.aten
RMS_NORM_QUANTIZE = torch.ops.fp4.rms_norm_quantize.default
CONSUMERS = (torch.ops.fp4.linear.default, torch.ops.fp4.linear_group.default, torch.ops.fp4.linear_silu_mul.default)
W4A4 = "triton-w4a4"
VALUES_BACKEND = "marlin"  # the W4A16 kernels of the same weight layout, fed the W4A4 block values


def _two(node, target):
    """The two arguments of a binary ``target`` node, or None."""
    return tuple(node.args[:2]) if is_call(node, target) and len(node.args) == 2 and not node.kwargs else None


def _normalized(prod: torch.fx.Node, dtype: torch.dtype | None):
    """(s, eps, nodes) where ``prod = c * rsqrt(mean(c ** 2, [-1], True) + eps)`` with ``c = s`` cast to float32
    (or s itself, float32) and s of ``dtype``; ``nodes``: those from prod to c."""
    two = _two(prod, aten.mul.Tensor)
    for c, rsqrt in (two, two[::-1]) if two is not None else ():
        if not is_call(rsqrt, aten.rsqrt.default):
            continue
        add_eps = _two(rsqrt.args[0], aten.add.Tensor)
        if add_eps is None or not isinstance(add_eps[1], float):
            continue
        mean = add_eps[0]
        if not is_call(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1], [_rank(c) - 1]) or \
                not (len(mean.args) > 2 and mean.args[2]):
            continue
        if _two(mean.args[0], aten.pow.Tensor_Scalar) != (c, 2):
            continue
        c_cast = conversion(c)
        s = c_cast[0] if c_cast is not None and c_cast[1] == torch.float32 else c
        if dtype_of(s) != dtype:
            continue
        return s, add_eps[1], [prod, rsqrt, rsqrt.args[0], mean, mean.args[0]] + ([c] if c is not s else [])
    return None


def _llama_rms_norm(h: torch.fx.Node):
    """(s, weight, eps, nodes) where ``h = prod.to(dtype) * weight``, ``prod`` as ``_normalized`` reads it
    (Hugging Face's LlamaRMSNorm); ``nodes``: those from h to c."""
    mul_w = _two(h, aten.mul.Tensor)
    for n, weight in (mul_w, mul_w[::-1]) if mul_w is not None else ():
        cast = conversion(n)
        prod = cast[0] if cast is not None and cast[1] == dtype_of(h) else n
        if (norm := _normalized(prod, dtype_of(h))) is None or not _is_norm_weight(weight, h):
            continue
        s, eps, nodes = norm
        return s, weight, eps, [h] + ([n] if prod is not n else []) + nodes
    return None


def _unit_offset_rms_norm(h: torch.fx.Node):
    """(s, weight, eps, nodes) where ``h = (prod * (1 + weight.float())).to(dtype)``, ``prod`` as
    ``_normalized`` reads it (Gemma's RMSNorm: float32 throughout, rounded once); ``nodes``: those from h
    to c."""
    cast = conversion(h)
    scaled = cast[0] if cast is not None and cast[1] == dtype_of(h) else h
    mul_w = _two(scaled, aten.mul.Tensor)
    for prod, offset in (mul_w, mul_w[::-1]) if mul_w is not None else ():
        add_one = _two(offset, aten.add.Tensor)
        if add_one is None or 1.0 not in add_one or not any(isinstance(a, torch.fx.Node) for a in add_one):
            continue
        w32 = next(a for a in add_one if isinstance(a, torch.fx.Node))
        w_cast = conversion(w32)
        weight = w_cast[0] if w_cast is not None and w_cast[1] == torch.float32 else w32
        if dtype_of(w32) != torch.float32 or (norm := _normalized(prod, dtype_of(h))) is None or \
                not _is_norm_weight(weight, h):
            continue
        s, eps, nodes = norm
        return s, weight, eps, ([h] if scaled is not h else []) + [scaled, offset] + \
            ([w32] if w32 is not weight else []) + nodes
    return None


def _is_norm_weight(weight, h: torch.fx.Node) -> bool:
    return isinstance(weight, torch.fx.Node) and dtype_of(weight) == dtype_of(h) and \
        _shape(weight) == (_shape(h)[-1],)


def _rank(node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _shape(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _consumers(h: torch.fx.Node):
    """(consumer nodes, their one activation-scale node) when every user of ``h`` (directly or through
    views) is a W4A4 fp4 linear op taking it as its activations; else None."""
    consumers, scales = [], set()
    for user in h.users:
        is_view = user.op == "call_function" and user.target in VIEWS
        readers, source = (list(user.users), user) if is_view else ([user], h)
        for reader in readers:
            if not (reader.op == "call_function" and reader.target in CONSUMERS and reader.args[0] is source
                    and reader.args[7] == W4A4):
                return None
            gs = reader.args[3]
            scales.update(gs if isinstance(gs, (list, tuple)) else [gs])
            consumers.append(reader)
    if len(scales) != 1:
        return None
    (gs,) = scales
    if not isinstance(gs, torch.fx.Node) or gs.op not in ("placeholder", "get_attr"):
        return None  # a dynamic scale: computed from h, after it
    return consumers, gs


def fuse_rms_norm_quant(graph: torch.fx.Graph) -> int:
    """Rewrite every match in ``graph``; returns how many ``fp4.rms_norm_quantize`` nodes it made."""
    made = 0
    order = node_order(graph)
    erased: set[torch.fx.Node] = set()  # a match erases h (tried by both forms) and nodes before it
    # (Gemma's form first: in float32 Llama's would also read it, with the in-graph 1 + weight as its weight)
    candidates = [(h, match, unit_offset) for h in graph.nodes
                  for match, unit_offset in ((_unit_offset_rms_norm, True), (_llama_rms_norm, False))]
    for h, match, unit_offset in candidates:
        if h in erased or (norm := match(h)) is None or (found := _consumers(h)) is None:
            continue
        s, weight, eps, nodes = norm
        consumers, gs = found
        inside = set(nodes)
        if any(set(n.users) - inside for n in nodes[1:]):
            continue  # a step of the norm is used elsewhere too
        add = _two(s, aten.add.Tensor)
        residual = add is not None and all(
            isinstance(a, torch.fx.Node) and _shape(a) == _shape(s) and dtype_of(a) == dtype_of(s) for a in add)
        # before the first node of the norm that reads s (Gemma's 1 + weight may come before s itself)
        anchor = s if residual else min((n for n in nodes if order[n] > order[s]), key=order.__getitem__)
        if any(not isinstance(a, torch.fx.Node) or order[a] > order[anchor] for a in (weight, gs)):
            continue
        x, r = add if residual else (s, None)
        with graph.inserting_before(anchor):
            fused = graph.call_function(RMS_NORM_QUANTIZE, (x, r, weight, eps, gs) + ((True,) if unit_offset else ()))
            values = graph.call_function(operator.getitem, (fused, 0))
            total = graph.call_function(operator.getitem, (fused, 1)) if residual else None
        values.meta["val"] = h.meta["val"]
        fused.meta["val"] = (values.meta["val"], s.meta["val"] if residual else h.meta["val"].new_empty((0,)))
        h.replace_all_uses_with(values)
        for node in nodes:  # users before their inputs
            graph.erase_node(node)
        erased.update(nodes)
        if residual:
            total.meta["val"] = s.meta["val"]
            s.replace_all_uses_with(total)
            graph.erase_node(s)
            erased.add(s)
        for consumer in consumers:
            consumer.update_arg(7, VALUES_BACKEND)
        made += 1
        logger.debug("fp4 fusion: %s <- rmsnorm(%s) for %s", fused.name, s.name, ", ".join(c.name for c in consumers))
    return made
