"""FX-graph helpers the ``fp4`` passes share: what a node calls, its dtype, dtype conversions, views and
the activation they flatten, and the graph's node order."""

from __future__ import annotations

import torch

aten = torch.ops.aten
CONVERT = torch.ops.prims.convert_element_type.default
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def is_call(node: object, target: object) -> bool:
    """Is ``node`` an FX node calling ``target``?"""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def dtype_of(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype of the tensor ``node`` computes (None where its meta holds no tensor)."""
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def conversion(node: object) -> tuple[torch.fx.Node, torch.dtype] | None:
    """(input, dtype) of a dtype conversion: ``prims.convert_element_type`` (Inductor's post-grad graphs)
    or ``aten._to_copy`` with a dtype and nothing else but the input's own layout and device (graphs traced
    without decompositions: ``x.to(dtype)``, ``x.type_as(y)``)."""
    if is_call(node, CONVERT):
        return node.args[0], node.args[1]
    if not (is_call(node, aten._to_copy.default) and len(node.args) == 1 and "dtype" in node.kwargs):
        return None
    source = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if node.kwargs["dtype"] is None or (set(node.kwargs) != {"dtype"} and not isinstance(source, torch.Tensor)):
        return None
    same = {"dtype": lambda _: True, "layout": lambda layout: layout == source.layout == torch.strided,
            "device": lambda device: torch.device(device) == source.device}
    if all(key in same and same[key](value) for key, value in node.kwargs.items()):
        return node.args[0], node.kwargs["dtype"]
    return None


def size_key(size: int | torch.SymInt) -> object:
    """A hashable stand-in for a view's size: a SymInt by its expression."""
    return size.node.expr if isinstance(size, torch.SymInt) else size


def activation_key(x: torch.fx.Node) -> object:
    """One key for an activation and every flattening view of the same node (each layer call's
    ``x.reshape(-1, K)`` is a view node of its own where CSE has not merged them)."""
    if x.op == "call_function" and x.target in VIEWS:
        key = ("view", x.args[0], tuple(size_key(size) for size in x.args[1]))
        try:
            hash(key)
        except TypeError:  # a size we cannot key: no merging of views then
            return x
        return key
    return x


def node_order(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Each node's position in ``graph`` (nodes inserted later are not in it)."""
    return {node: i for i, node in enumerate(graph.nodes)}
