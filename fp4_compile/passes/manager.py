"""The one Inductor ``post_grad_custom_post_pass`` of the ``fp4`` backend.

:class:`FP4PostGradPass` is a ``CustomGraphPass``: Inductor calls it on every post-grad
graph and puts its :meth:`~FP4PostGradPass.uuid` into the FX-graph-cache key. The uuid
hashes the source of everything the rewrite depends on (the passes, the op schemas, the
backend specs), so an edit to any of them is a cache miss, never a stale graph. On a
cache hit the pass does not run at all (the cached graph is already rewritten).

One pass object runs the sub-passes itself, because torch 2.11 accepts only a single
custom pass per hook (2.13 also accepts a list).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import fuse_linear, fuse_rms_norm_quant, fuse_silu_mul, group_linear
from .fuse_linear import LINEAR, MM

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent.parent
# Everything the rewrite depends on: the patterns and this manager, the op schemas and
# fake kernels (the replacement is traced through them), the backend specs (extra_check
# reads SPECS).
SOURCE_FILES = (
    _PACKAGE / "passes" / "__init__.py",
    _PACKAGE / "passes" / "fuse_linear.py",
    _PACKAGE / "passes" / "fuse_silu_mul.py",
    _PACKAGE / "passes" / "fuse_rms_norm_quant.py",
    _PACKAGE / "passes" / "fx_nodes.py",
    _PACKAGE / "passes" / "group_linear.py",
    _PACKAGE / "passes" / "manager.py",
    _PACKAGE / "ops" / "library.py",
    _PACKAGE / "ops" / "cuda_small_m.py",  # the grouping's M and size limits (group_linear.py)
    _PACKAGE / "backends.py",
)


def source_hash(paths: Iterable[str | Path] = SOURCE_FILES) -> str:
    """sha256 over the names and contents of ``paths``."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# per-graph results (kept by the pass, read by fp4_compile.inspection)


@dataclass
class LinearInfo:
    """One fp4.linear (or unfused fp4.mm) node of a post-grad graph."""

    node: str
    module: str | None  # the NVFP4Linear's path in the model, when Dynamo recorded it
    backend: str
    in_features: int | None
    out_features: int | None
    bias: bool
    note: str = ""  # why it is unfused, or which chain step stayed outside the fused node


@dataclass
class GraphResult:
    """What the pass did to one post-grad graph."""

    fused: list[LinearInfo] = field(default_factory=list)  # chains rewritten into fp4.linear
    direct: list[LinearInfo] = field(default_factory=list)  # fp4.linear already there (W4A16)
    unfused: list[LinearInfo] = field(default_factory=list)  # fp4.mm chains left, with the reason
    gated: int = 0  # fp4.linear_silu_mul nodes, each made of two of those fp4.linear nodes (fuse_silu_mul.py)
    norms: int = 0  # fp4.rms_norm_quantize nodes: RMSNorms fused with their W4A4 linears' quantization
    groups: int = 0  # fp4.linear_group nodes made of those fp4.linear nodes (group_linear.py)
    graph_code: str = ""  # the post-grad graph after the pass (readable FX code)
    name: str = ""  # set by whoever records (e.g. depyf's __compiled_fn_N)

    @property
    def linears(self) -> int:
        """fp4.linear nodes in the graph after the pass."""
        return len(self.fused) + len(self.direct)


_recorders = threading.local()


@contextlib.contextmanager
def record_results(namer: Callable[[], str] | None = None) -> Iterator[list[GraphResult]]:
    """Collect a :class:`GraphResult` for every graph the pass runs on inside the block."""
    results: list[GraphResult] = []
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    stack.append((results, namer))
    try:
        yield results
    finally:
        stack.remove((results, namer))


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # "L['self'].blocks.0.fc" (or "L['args'][0].model..." through wrapped forwards) -> "blocks.0.fc"
    return re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", str(path)) or None


def _shape(node, dim: int) -> int | None:
    val = fuse_linear._val(node) if isinstance(node, torch.fx.Node) else None
    if val is None:
        return None
    size = val.shape[dim]
    return int(size) if isinstance(size, int) else None


def _linear_info(node: torch.fx.Node, module: str | None, note: str = "") -> LinearInfo:
    x, bias, n, backend = node.args[0], node.args[5], node.args[6], node.args[7]
    return LinearInfo(node.name, module, str(backend), _shape(x, -1), int(n), bias is not None, note)


def _mm_info(node: torch.fx.Node, module: str | None, note: str) -> LinearInfo:
    return LinearInfo(
        node.name, module, str(node.args[6]), None, _shape(node.args[2], 0), False, note
    )


class FP4PostGradPass(CustomGraphPass):
    """Fuses every NVFP4 linear chain into ``fp4.linear``, a gated MLP's gate/up linears and their
    SiLU*mul into ``fp4.linear_silu_mul``, an RMSNorm with the quantization of the W4A4 linears it feeds
    (``fp4.rms_norm_quantize``), groups the linears of one activation at decode sizes
    (``fp4.linear_group``); optionally runs a user pass after.

    ``extra`` is a post-grad pass the user gave in ``options`` under
    ``post_grad_custom_post_pass``; its uuid (if any) joins ours.
    """

    def __init__(self, extra: Callable[[torch.fx.Graph], None] | None = None) -> None:
        self.extra = extra
        self.last: GraphResult | None = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        modules = {mm.args[2]: _module_path(mm) for mm in graph.find_nodes(op="call_function", target=MM)}
        before = set(graph.find_nodes(op="call_function", target=LINEAR))
        fuse_linear.split_shared_quantizations(graph)
        matched = fuse_linear.pattern_pass().apply(graph)
        result = GraphResult()
        for node in graph.find_nodes(op="call_function", target=LINEAR):
            if node in before:
                result.direct.append(_linear_info(node, _module_path(node)))
            else:
                note = fuse_linear.explain_partial(node) or ""
                if note:
                    logger.debug("fp4 fusion: %s: %s", node.name, note)
                result.fused.append(_linear_info(node, modules.get(node.args[1]), note))
        for mm in graph.find_nodes(op="call_function", target=MM):
            reason = fuse_linear.explain_unfused_mm(mm)
            logger.debug("fp4 fusion: left %s (%s) unfused: %s", mm.name, _module_path(mm) or "?", reason)
            result.unfused.append(_mm_info(mm, _module_path(mm), reason))
        logger.debug("fp4 fusion: %d chain(s) fused, %d left", matched, len(result.unfused))
        result.gated = fuse_silu_mul.fuse_silu_mul(graph)
        result.norms = fuse_rms_norm_quant.fuse_rms_norm_quant(graph)
        result.groups = group_linear.group_linears(graph)
        if self.extra is not None:
            self.extra(graph)
        self.last = result
        stack = getattr(_recorders, "stack", None)
        if stack:
            result.graph_code = graph.python_code("self").src
            for results, namer in stack:
                results.append(result if namer is None else _named(result, namer()))

    def uuid(self) -> str | None:
        """Cache key part; None (no FX-graph caching) if a user pass without uuid is chained."""
        parts = [_source_hash_cached()]
        if self.extra is not None:
            extra_uuid = self.extra.uuid() if isinstance(self.extra, CustomGraphPass) else None
            if not extra_uuid:
                return None
            parts.append(str(extra_uuid))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


@functools.cache
def _source_hash_cached() -> str:
    return source_hash()


def _named(result: GraphResult, name: str) -> GraphResult:
    result.name = name
    return result
