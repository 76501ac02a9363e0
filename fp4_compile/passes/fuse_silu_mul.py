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
from .fx_nodes import VIEWS, activation_key, conversion, dtype_of, is_call, node_order, size_key

logger = logging.getLogger(__name__)

aten = torch.ops.aten
LINEAR = torch.ops.fp4.linear.default
LINEAR_SILU_MUL = torch.ops.fp4.linear_silu_mul.default
MUL = aten.mul.Tensor


def _float_silu_input(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(c, nodes) where ``node`` computes silu(c) as ``c / (1 + exp(-c))``, ``c * sigmoid(c)`` or
    ``aten.silu(c)``; ``nodes``: those computing it, ``node`` included."""
    if is_call(node, aten.silu.default):
        return node.args[0], [node]
    if is_call(node, aten.div.Tensor):
        c, add = node.args
        if is_call(add, aten.add.Tensor) and 1 in add.args and add.kwargs.get("alpha", 1) == 1:
            exp = add.args[0] if add.args[1] == 1 else add.args[1]
            neg = exp.args[0] if is_call(exp, aten.exp.default) else None
            if is_call(neg, aten.neg.default) and neg.args[0] is c:
                return c, [node, add, exp, neg]
    if is_call(node, aten.mul.Tensor):
        for c, sig in (node.args, node.args[::-1]):
            if is_call(sig, aten.sigmoid.default) and sig.args[0] is c:
                return c, [node, sig]
    return None


def silu_input(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(g, nodes) where ``node`` is ``F.silu(g)`` in g's dtype: for a 16-bit g computed in float32 and
    rounded back (a conversion on both sides); ``nodes``: those between g and ``node``."""
    out_cast = conversion(node)
    if out_cast is None:
        return _float_silu_input(node)
    inner = _float_silu_input(out_cast[0])
    in_cast = conversion(inner[0]) if inner is not None else None
    if in_cast is None or in_cast[1] != torch.float32:
        return None
    g = in_cast[0]
    return (g, [node, *inner[1], inner[0]]) if isinstance(g, torch.fx.Node) and dtype_of(g) == out_cast[1] else None


def _unview(node):
    """(base, view) for ``node = view(base, size)`` (a layer's output unflattened to [batch, seq, N]),
    else (node, None)."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in VIEWS:
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
                [size_key(d) for d in gate_view.args[1]] != [size_key(d) for d in up_view.args[1]]):
            continue
        if not (is_call(gate, LINEAR) and is_call(up, LINEAR)) or gate is up:
            continue
        if (activation_key(gate.args[0]) != activation_key(up.args[0]) or gate.args[7] != up.args[7]
                or gate.args[6] != up.args[6]):
            continue
        if not (dtype_of(gate) == dtype_of(up) == dtype_of(mul) == dtype_of(gate.args[0])):
            continue
        inside = set(nodes)
        if any(set(n.users) - inside - {mul} for n in (gate, up, *nodes)):
            continue
        return gate, up, nodes, gate_view
    return None


def fuse_silu_mul(graph: torch.fx.Graph) -> int:
    """Rewrite every match in ``graph``; returns how many ``fp4.linear_silu_mul`` nodes it made."""
    made = 0
    order = node_order(graph)  # (a match sorts only nodes that were in the graph before the first match)
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
        for node in sorted(nodes, key=order.__getitem__, reverse=True) + [up, gate]:  # users before inputs
            graph.erase_node(node)
        made += 1
        logger.debug("fp4 fusion: %s <- silu(%s) * %s", fused.name, gate.name, up.name)
    return made
