"""Group the ``fp4::linear`` nodes of one activation into one ``fp4::linear_group`` node (decode sizes).

A transformer layer applies several linears to the same activations: q, k and v to the normed
hidden state, gate and up to the second one. At decode sizes each GEMM is short (a few us) and
a separate launch costs each one its own launch, ramp and tail; vLLM's model definitions merge
those weights for that reason (``QKVParallelLinear``, ``MergedColumnParallelLinear``). Models
written the Hugging Face way keep them apart, so this pass groups them in the graph instead::

    q = fp4.linear(x, wq, ...); k = fp4.linear(x, wk, ...); v = fp4.linear(x, wv, ...)

becomes ``q, k, v = fp4.linear_group(x, [wq, wk, wv], ..., backend)``: the weights stay where they
are (no copy), and a backend that can (Hopper: the CUDA small-M kernel) computes the group in one
launch; others compute each member as ``fp4.linear`` would. Graphs whose M is a constant above
``MAX_M`` rows (the small-M kernel's range: a prefill's linears gain nothing from it) are left
alone; with a symbolic M (one graph for every batch size, as torch.compile makes after a second
size) the group decides per call, one launch at decode sizes and each member's own call above.
At most ``MAX_GROUP`` linears a group, placed right after the last of its members' inputs. Inputs computed
between two members (each layer's dynamic activation scale and alpha, a bias cast) are first moved before the
first member, as Hugging Face models use q's output (its view, the rotary embedding) before k's scale is
computed; a member whose inputs depend on another member's output stays apart.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fp4)
from ..ops.cuda_small_m import MAX_GROUP, MAX_M
from .fx_nodes import activation_key, node_order

logger = logging.getLogger(__name__)

LINEAR = torch.ops.fp4.linear.default
LINEAR_GROUP = torch.ops.fp4.linear_group.default


def _may_be_decode(node: torch.fx.Node) -> bool:
    """Is this 2-D activation's row count at most MAX_M, or symbolic (decided per call then)?"""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return False
    rows = val.shape[0]
    return not isinstance(rows, int) or rows <= MAX_M


def _hoist_member_inputs(members: list[torch.fx.Node], order: dict[torch.fx.Node, int]) -> bool:
    """Move the nodes that compute the members' inputs after the first member to just before it, in their
    order; False (nothing moved) where one of them depends on a member or has side effects (or draws
    random numbers: moving it would change what it draws)."""
    first = members[0]
    to_move: set[torch.fx.Node] = set()
    pending = [a for n in members[1:] for a in n.all_input_nodes]
    while pending:
        node = pending.pop()
        if order[node] < order[first] or node in to_move:
            continue
        if node in members or node.op != "call_function" or node.is_impure(impure_random=True):
            return False
        to_move.add(node)
        pending.extend(node.all_input_nodes)
    for node in sorted(to_move, key=order.__getitem__):
        first.prepend(node)
    return True


def group_linears(graph: torch.fx.Graph) -> int:
    """Rewrite the groups in ``graph``; returns how many ``fp4.linear_group`` nodes it made."""
    order = node_order(graph)
    by_input: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.find_nodes(op="call_function", target=LINEAR):
        if _may_be_decode(node.args[0]):
            by_input[(activation_key(node.args[0]), node.args[7])].append(node)
    made = 0
    for (_, backend), nodes in by_input.items():
        nodes.sort(key=order.__getitem__)
        for start in range(0, len(nodes), MAX_GROUP):
            members = nodes[start:start + MAX_GROUP]
            if len(members) < 2:
                continue
            first = members[0]
            if _hoist_member_inputs(members, order):
                order = node_order(graph)
            # (the group reads the first member's x: the others' are views of the same node)
            latest = max((first.args[0], *(a for n in members for a in n.args[1:6] if isinstance(a, torch.fx.Node))),
                         key=order.__getitem__)
            if any(order[u] < order[latest] for n in members for u in n.users):
                logger.debug("fp4 grouping: %s: a member's output is used before another member's inputs exist",
                             first.name)
                continue
            with graph.inserting_before(latest.next):
                group = graph.call_function(LINEAR_GROUP, (
                    first.args[0], *([n.args[i] for n in members] for i in range(1, 7)), backend))
                group.meta["val"] = [n.meta["val"] for n in members]
                for i, node in enumerate(members):
                    item = graph.call_function(operator.getitem, (group, i))
                    item.meta["val"] = node.meta["val"]
                    node.replace_all_uses_with(item)
            for node in members:
                graph.erase_node(node)
            order = node_order(graph)  # (a later group's x may be one of this group's outputs)
            made += 1
            logger.debug("fp4 grouping: %s <- %s", group.name, ", ".join(n.name for n in members))
    return made
