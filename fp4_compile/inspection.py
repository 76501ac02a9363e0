"""See what ``torch.compile(backend="fp4")`` did: which linears fused, to which backend.

    from fp4_compile.inspection import inspect_compiled
    report = inspect_compiled(model, x, dump_dir="depyf_out")
    print(report.format())

The model is compiled under ``depyf.prepare_debug(dump_dir)`` with Inductor's FX graph
cache off (a cache hit skips the post-grad passes and writes no graph files). For each
compiled graph the dump has ``__compiled_fn_N.AFTER_POST_GRAD.0.py``: the post-grad graph
after the fp4 pass, where each fused linear is one ``torch.ops.fp4.linear.default`` call
(``__compiled_fn_N.Forward_graph.0.py`` shows the unfused chain before the pass, and
``__compiled_fn_N.kernel_0.py`` the code Inductor generated).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .passes.manager import GraphResult, LinearInfo, record_results

FUSED_OP_TEXT = "torch.ops.fp4.linear.default"
GROUP_OP_TEXT = "torch.ops.fp4.linear_group.default"
GATED_OP_TEXT = "torch.ops.fp4.linear_silu_mul.default"


@dataclass
class GraphReport:
    """One compiled graph: the pass's result and the dumped post-grad file."""

    name: str  # depyf's name of the compiled function, e.g. "__compiled_fn_1"
    fused: list[LinearInfo]
    direct: list[LinearInfo]  # fp4.linear called directly (W4A16 backends): nothing to fuse
    unfused: list[LinearInfo]  # chains left unfused, with the reason in .note
    post_grad_file: str | None  # <dump_dir>/<name>.AFTER_POST_GRAD.*.py
    linears_in_file: int | None  # fp4.linear calls counted in that file (members of fp4.linear_group and
    # fp4.linear_silu_mul too)
    groups: int = 0  # fp4.linear_group nodes (linears of one activation, grouped at decode sizes)
    gated: int = 0  # fp4.linear_silu_mul nodes (a gated MLP's gate and up linears with their SiLU*mul)
    norms: int = 0  # fp4.rms_norm_quantize nodes (an RMSNorm with its W4A4 linears' quantization)

    @property
    def linears(self) -> int:
        return len(self.fused) + len(self.direct)


@dataclass
class InspectReport:
    dump_dir: str
    graphs: list[GraphReport] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # everything depyf wrote, relative to dump_dir

    @property
    def fused(self) -> int:
        return sum(len(g.fused) for g in self.graphs)

    @property
    def unfused(self) -> int:
        return sum(len(g.unfused) for g in self.graphs)

    @property
    def backends(self) -> dict[str, int]:
        """Fused (and direct) fp4.linear nodes per backend."""
        counts: dict[str, int] = {}
        for g in self.graphs:
            for info in g.fused + g.direct:
                counts[info.backend] = counts.get(info.backend, 0) + 1
        return counts

    def format(self) -> str:
        lines = [
            f"{len(self.graphs)} compiled graph(s): {self.fused} linear(s) fused into fp4.linear, "
            f"{self.unfused} left unfused; backends: "
            + (", ".join(f"{b} x{n}" for b, n in sorted(self.backends.items())) or "none"),
            f"depyf dump: {self.dump_dir}",
        ]
        for g in self.graphs:
            where = os.path.relpath(g.post_grad_file, self.dump_dir) if g.post_grad_file else "(no post-grad file)"
            check = "" if g.linears_in_file in (None, g.linears) else f" (the file has {g.linears_in_file})"
            made = [f"{n} fp4.{op}" for n, op in ((g.groups, "linear_group"), (g.gated, "linear_silu_mul"),
                                                   (g.norms, "rms_norm_quantize")) if n]
            grouped = f" ({', '.join(made)})" if made else ""
            lines.append(f"{g.name or 'graph'}: {g.linears} fp4.linear{check}{grouped}, {len(g.unfused)} unfused   "
                         f"[{where}]")
            rows = [("fused", i) for i in g.fused] + [("direct", i) for i in g.direct] + [("unfused", i) for i in g.unfused]
            width = max((len(info.module or info.node) for _, info in rows), default=0)
            for kind, info in rows:
                shape = f"{info.in_features or '?'}->{info.out_features or '?'}"
                bias = "+bias" if info.bias else ""
                note = f"  ({info.note})" if info.note else ""
                lines.append(f"  {kind:<8}{info.module or info.node:<{width}} {shape:>11} {bias:<6}{info.backend}{note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


@contextlib.contextmanager
def depyf_compat() -> Iterator[None]:
    """Make ``depyf.prepare_debug`` work on torch >= 2.13 (enter this first).

    depyf 0.20's hook of ``PyCodeCache.load_by_key_path`` lacks the ``set_sys_modules``
    keyword that torch 2.13 passes, so every Triton kernel load inside ``prepare_debug``
    raises TypeError. This widens the hook for the duration; on torch 2.11 it does nothing.
    """
    from torch._inductor.codecache import PyCodeCache

    import depyf.explain.enable_debugging as ed

    original = ed.patched_load_by_key_path
    if "set_sys_modules" in inspect.signature(original).parameters or (
        "set_sys_modules" not in inspect.signature(PyCodeCache.load_by_key_path).parameters
    ):
        yield
        return
    from depyf.explain.global_variables import data
    from depyf.explain.utils import get_current_compiled_fn_name, write_code_to_file_template

    def load_by_key_path(key, path, linemap=None, attrs=None, **kwargs):
        with open(path) as f:
            src = f.read()
        path = write_code_to_file_template(
            src, os.path.join(data["dump_src_dir"], get_current_compiled_fn_name() + ".kernel_%s.py")
        )
        return data["unpatched_load_by_key_path"](key, path, linemap, attrs, **kwargs)

    ed.patched_load_by_key_path = load_by_key_path
    try:
        yield
    finally:
        ed.patched_load_by_key_path = original


def _call(model, example_inputs) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def count_linear_calls(text: str, prefix: str = "") -> int:
    """The NVFP4 linears that calls in ``text`` compute: one per ``fp4.linear`` call, one per member of an
    ``fp4.linear_group`` or ``fp4.linear_silu_mul`` call. ``prefix``: what precedes a counted call (``"= "``
    in Inductor's output code, whose comments also name ops)."""
    # a group's (or gated pair's) weights are its second argument, the call's first list (the activation
    # before it may be a reinterpret_tensor(...) with commas): one member per weight
    members = re.findall(re.escape(prefix) + "(?:" + re.escape(GROUP_OP_TEXT) + "|" + re.escape(GATED_OP_TEXT)
                         + r")\([^\[\n]*?, \[([^\]]*)\]", text)
    return text.count(prefix + FUSED_OP_TEXT + "(") + sum(m.count(",") + 1 for m in members)


def _count_in_file(path: str | None) -> int | None:
    if path is None:
        return None
    with open(path) as f:
        return count_linear_calls(f.read())


def inspect_compiled(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dump_dir: str | os.PathLike,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> InspectReport:
    """Compile ``model`` with the fp4 backend under ``depyf.prepare_debug(dump_dir)``, run it
    once on ``example_inputs`` (a tensor, a tuple/list of arguments or a dict of keyword
    arguments; under ``torch.no_grad()``) and report, per compiled graph, the fp4.linear
    nodes (fused, and to which backend) and the chains left unfused (with the reason).

    Every call compiles afresh (a new backend object, FX graph cache off), whether or not
    the model was compiled before in this process.
    """
    import depyf

    from .compile import fp4_backend

    dump_dir = os.path.abspath(os.fspath(dump_dir))
    os.makedirs(dump_dir, exist_ok=True)
    options = {**(options or {}), "fx_graph_cache": False}
    # A new backend object per call: Dynamo's cache entries are per backend, so the
    # model is compiled again even if it was compiled with backend="fp4" before.
    backend = functools.partial(fp4_backend, mode=mode, options=options)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)

    from depyf.explain.utils import get_current_compiled_fn_name

    with (
        torch.no_grad(),
        torch._inductor.config.patch(fx_graph_cache=False),
        depyf_compat(),
        record_results(namer=get_current_compiled_fn_name) as results,
        depyf.prepare_debug(dump_dir),
    ):
        _call(compiled, example_inputs)

    report = InspectReport(dump_dir)
    report.files = sorted(os.path.relpath(p, dump_dir) for p in glob.glob(os.path.join(dump_dir, "**", "*"), recursive=True) if os.path.isfile(p))
    for result in results:
        report.graphs.append(_graph_report(result, dump_dir))
    return report


def _graph_report(result: GraphResult, dump_dir: str) -> GraphReport:
    files = sorted(glob.glob(os.path.join(dump_dir, f"{glob.escape(result.name)}.AFTER_POST_GRAD*.py")))
    post_grad = files[-1] if files else None
    return GraphReport(
        result.name, result.fused, result.direct, result.unfused, post_grad, _count_in_file(post_grad), result.groups,
        result.gated, result.norms,
    )
