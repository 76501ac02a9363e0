"""Fuse a gated MLP's ``silu(gate(x)) * up(x)`` into one ``fp4::linear_silu_mul`` node.

Llama-style MLPs compute ``down(F.silu(gate(x)) * up(x))``. After ``fuse_linear`` the post-grad graph
holds two ``fp4.linear`` nodes of one activation and the SiLU*mul in Inductor's decomposition::

    g = fp4.linear(x, wg, ...); u = fp4.linear(x, wu, ...)
    c = convert_element_type(g, float32)          # (16-bit g only)
    s = convert_element_type(c / (1 + exp(-c)), bf16)   # or aten.silu(g), or c * sigmoid(c)
    y = s * u

which becomes ``y = fp4.linear_silu_mul(x, [wg, wu], ..., out_features, backend)``. At decode sizes the
Hopper backends compute it in one launch whose epilogue applies the SiLU*mul (gate and up never leave
the CTA, and the pointwise kernel after the GEMMs is gone); elsewhere the op runs the two linears as a
group and one SiLU*mul kernel, as the graph did. The result is the graph's: each linear's output and
the SiLU rounded to the activation dtype, as the eager ops round them.

Left alone: a gate or up output (or the SiLU) with a user outside the pattern (the GEMM would run
twice), linears of different activations, backends or sizes, and a SiLU rounded to another dtype.
"""

from __future__ import annotations

import logging

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fp4)
from .group_linear import _VIEWS, _size_key, _source

logger = logging.getLogger(__name__)

aten = torch.ops.aten
LINEAR = torch.ops.fp4.linear.default
LINEAR_SILU_MUL = torch.ops.fp4.linear_silu_mul.default
CONVERT = torch.ops.prims.convert_element_type.default
MUL = aten.mul.Tensor


def _call(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _dtype(node: torch.fx.Node):
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _float_silu_input(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(c, nodes) where ``node`` computes silu(c) as ``c / (1 + exp(-c))``, ``c * sigmoid(c)`` or
    ``aten.silu(c)``; ``nodes``: those computing it, ``node`` included."""
    if _call(node, aten.silu.default):
        return node.args[0], [node]
    if _call(node, aten.div.Tensor):
        c, add = node.args
        if _call(add, aten.add.Tensor) and 1 in add.args:
            exp = add.args[0] if add.args[1] == 1 else add.args[1]
            if _call(exp, aten.exp.default) and _call(exp.args[0], aten.neg.default) and exp.args[0].args[0] is c:
                return c, [node, add, exp, exp.args[0]]
    if _call(node, aten.mul.Tensor):
        for c, sig in (node.args, node.args[::-1]):
            if _call(sig, aten.sigmoid.default) and sig.args[0] is c:
                return c, [node, sig]
    return None


def _cast(node) -> tuple[torch.fx.Node, torch.dtype] | None:
    """(input, dtype) of a dtype conversion: ``prims.convert_element_type`` (Inductor's post-grad graphs)
    or ``aten._to_copy`` with only a dtype (graphs traced without decompositions)."""
    if _call(node, CONVERT):
        return node.args[0], node.args[1]
    if _call(node, aten._to_copy.default) and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        return node.args[0], node.kwargs["dtype"]
    return None


def silu_input(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(g, nodes) where ``node`` is ``F.silu(g)`` in g's dtype: for a 16-bit g computed in float32 and
    rounded back (a conversion on both sides); ``nodes``: those between g and ``node``."""
    out_cast = _cast(node)
    if out_cast is None:
        return _float_silu_input(node)
    inner = _float_silu_input(out_cast[0])
    in_cast = _cast(inner[0]) if inner is not None else None
    if in_cast is None or in_cast[1] != torch.float32:
        return None
    g = in_cast[0]
    return (g, [node, *inner[1], inner[0]]) if isinstance(g, torch.fx.Node) and _dtype(g) == out_cast[1] else None


def _unview(node):
    """(base, view) for ``node = view(base, size)`` (a layer's output unflattened to [batch, seq, N]),
    else (node, None)."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        return node.args[0], node
    return node, None


def _match(mul: torch.fx.Node):
    """(gate, up, nodes, view) of ``mul = silu(gate) * up`` with gate and up fusable ``fp4.linear`` nodes,
    both seen directly or through views of one size (``view``: the gate's, else None); ``nodes``: those
    between the linears and ``mul``."""
    for s, up_seen in (mul.args, mul.args[::-1]):
        found = silu_input(s) if isinstance(s, torch.fx.Node) else None
        if found is None:
            continue
        (gate, gate_view), (up, up_view) = _unview(found[0]), _unview(up_seen)
        nodes = found[1] + [v for v in (gate_view, up_view) if v is not None]
        if (gate_view is None) != (up_view is None) or gate_view is not None and (
                [_size_key(d) for d in gate_view.args[1]] != [_size_key(d) for d in up_view.args[1]]):
            continue
        if not (_call(gate, LINEAR) and _call(up, LINEAR)) or gate is up:
            continue
        if _source(gate.args[0]) != _source(up.args[0]) or gate.args[7] != up.args[7] or gate.args[6] != up.args[6]:
            continue
        if not (_dtype(gate) == _dtype(up) == _dtype(mul) == _dtype(gate.args[0])):
            continue
        inside = set(nodes)
        if any(set(n.users) - inside - {mul} for n in (gate, up, *nodes)):
            continue
        return gate, up, nodes, gate_view
    return None


def _position(graph: torch.fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


def fuse_silu_mul(graph: torch.fx.Graph) -> int:
    """Rewrite every match in ``graph``; returns how many ``fp4.linear_silu_mul`` nodes it made."""
    made = 0
    for mul in list(graph.find_nodes(op="call_function", target=MUL)):
        found = _match(mul)
        if found is None:
            continue
        gate, up, nodes, view = found
        with graph.inserting_before(mul):
            fused = graph.call_function(LINEAR_SILU_MUL, (
                gate.args[0], *([gate.args[i], up.args[i]] for i in range(1, 6)), gate.args[6], gate.args[7]))
            fused.meta["val"] = gate.meta["val"]
            result = fused
            if view is not None:  # the product had the views' shape
                result = graph.call_function(view.target, (fused, view.args[1]))
                result.meta["val"] = mul.meta["val"]
        mul.replace_all_uses_with(result)
        graph.erase_node(mul)
        for node in sorted(nodes, key=_position(graph), reverse=True) + [up, gate]:  # users before inputs
            graph.erase_node(node)
        made += 1
        logger.debug("fp4 fusion: %s <- silu(%s) * %s", fused.name, gate.name, up.name)
    return made
