"""Fuse the eager NVFP4Linear chain into one ``fp4::linear`` node (Inductor post-grad).

The chain (``NVFP4Linear.forward`` for W4A4 backends, on ``x2 = x.reshape(-1, K)``)::

    a, s = fp4.quantize(x2, gs[, swizzle])     # gs: a buffer (static) or plain torch ops (dynamic)
    a    = fp4.pad_k(a, k_padded)              # only if the weight's K is padded
    out  = fp4.mm(a, s, weight, weight_scale, alpha, x.dtype, backend)
    out  = out[:, :out_features]               # only if the weight's N is padded
    out  = out + bias                          # only with a bias

becomes ``fp4.linear(x2, weight, weight_scale, gs, alpha, bias, out_features, backend)``.
The ops that compute a dynamic ``gs``/``alpha`` and the views that flatten the leading
batch dims are not part of the pattern: they stay, only the chain fuses.

What is not fused (each case logged at DEBUG on this module's logger, and listed by
:func:`fp4_compile.inspection.inspect_compiled`):

- the packed activation or its scales have a user outside the chain: nothing fuses (another chain's
  fp4.mm is not such a user: :func:`split_shared_quantizations` gives it a quantization of its own first);
- ``out_dtype`` is not the activation's dtype, ``swizzle`` is not the backend's scale
  layout, or the backend is unknown or W4A16: nothing fuses;
- the add's operand is not a bias of shape ``(N,)`` and of the output's dtype (it
  broadcasts differently, or promotes), or the slice is not exactly ``[:, :N]``: that
  step stays outside, and the shorter chain before it fuses (``fp4.linear`` then returns
  all the GEMM's columns, ``out_features = weight.shape[0]``, when the slice stays).

The graph traversal visits a chain's last node first, so the longest variant wins.

How the non-tensor arguments are matched
----------------------------------------
``register_replacement`` builds a pattern by tracing a search function and turns every
constant of the traced graph into either a wildcard (ints, floats, dtypes: re-checked
later by re-tracing with the matched values) or a literal that must be equal (strings,
bools). A literal ``backend`` string would need one pattern per backend name (9 x 16
variants), and the re-trace cannot recover ints that are not derived from tensor shapes
(``out_features``, ``k_padded``). ``scalar_workaround`` solves this for ints and floats
only, by value.

So the patterns here are built the way ``scalar_workaround`` works, extended to strings:
each search function is traced once (``fwd_only`` under a FakeTensorMode, so no kernel
runs) with a *sentinel* value for every non-tensor input (``backend``, ``k_padded``,
``out_features``); every constant equal to a sentinel is then rewired to the placeholder
of its input, and ``fx_to_pattern`` turns those placeholders into ``KeywordArg``s. The
resulting pattern is handed to ``register_replacement(search_fn_pattern=...)``, which
does the rest (match, ``extra_check``, tracing the replacement with the matched values).
Ints that are not inputs stay literal in the pattern: the slice must be exactly
``aten.slice(out, 1, 0, out_features)``. ``out_dtype`` is a wildcard and checked in
:func:`_extra_check`, with the bias shape and dtype, the pad target and the backend.

The ``swizzle`` flag of ``fp4.quantize`` is a bool literal that tracing drops when it is
False (the default), so the two layouts are two sets of patterns: 2 x 8 variants
(pad / slice / bias), registered once per process (:func:`pattern_pass`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fwd_only,
    fx_to_pattern,
    register_replacement,
)

from .. import ops  # noqa: F401  (registers torch.ops.fp4)
from ..backends import SPECS, BackendError, parse_backend

logger = logging.getLogger(__name__)

QUANTIZE = torch.ops.fp4.quantize.default
PAD_K = torch.ops.fp4.pad_k.default
MM = torch.ops.fp4.mm.default
LINEAR = torch.ops.fp4.linear.default
SLICE = torch.ops.aten.slice.Tensor
ADD = torch.ops.aten.add.Tensor


# ---------------------------------------------------------------------------------------
# the search and replacement functions


def chain(x: torch.Tensor, gs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor,
          backend: str, *, swizzle: bool, k_padded: int | None = None, out_features: int | None = None,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's unfused chain (see the module docstring): what the pass searches for."""
    a, a_scale = QUANTIZE(x, gs, swizzle)
    if k_padded is not None:
        a = PAD_K(a, k_padded)
    out = MM(a, a_scale, weight, weight_scale, alpha, x.dtype, backend)
    if out_features is not None:
        out = out[:, :out_features]
    if bias is not None:
        out = out + bias
    return out


def fused(x: torch.Tensor, gs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor,
          backend: str, *, swizzle: bool, k_padded: int | None = None, out_features: int | None = None,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the chain becomes: one fp4::linear (it pads, slices and adds the bias itself)."""
    n = weight.shape[0] if out_features is None else out_features
    return LINEAR(x, weight, weight_scale, gs, alpha, bias, n, backend)


@dataclass(frozen=True)
class Variant:
    """One registered pattern: which optional steps of the chain are present."""

    swizzle: bool
    pad: bool
    slice: bool
    bias: bool

    @property
    def argnames(self) -> list[str]:
        names = ["x", "gs", "weight", "weight_scale", "alpha", "backend"]
        names += ["k_padded"] * self.pad + ["out_features"] * self.slice + ["bias"] * self.bias
        return names

    @property
    def name(self) -> str:
        parts = ["quantize" + ("(swizzled)" if self.swizzle else ""), "pad_k" * self.pad, "mm"]
        parts += ["slice"] * self.slice + ["add_bias"] * self.bias
        return " -> ".join(p for p in parts if p)

    def bind(self, fn: Callable) -> Callable:
        """``fn`` (chain or fused) as a function of exactly this variant's inputs, positionally."""
        names = self.argnames

        def bound(*args):
            kwargs = dict(zip(names, args))
            leading = [kwargs.pop(n) for n in names[:6]]
            return fn(*leading, swizzle=self.swizzle, **kwargs)

        bound.__name__ = f"{fn.__name__}__{self.name.replace(' -> ', '__').replace('(', '_').replace(')', '')}"
        bound.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        )
        return bound


VARIANTS = tuple(
    Variant(swizzle, pad, slc, bias)
    for swizzle in (False, True)
    for pad in (False, True)
    for slc in (False, True)
    for bias in (False, True)
)

# Sentinels for the non-tensor inputs while tracing; distinct from every other constant
# of the traced chain (the slice's 1 and 0).
_SENTINELS = {"backend": "<fp4-pattern:backend>", "k_padded": 96, "out_features": 40}


def _example_inputs(variant: Variant) -> list:
    """Fake-mode example inputs (shapes only fix ranks; no kernel runs)."""
    k = 80 if variant.pad else 96  # activation K; the weight's K is 96 (k_padded)
    values = {
        "x": torch.empty(8, k),
        "gs": torch.empty(1),
        "weight": torch.empty(48, 48, dtype=torch.uint8),  # padded N = 48 > out_features
        "weight_scale": torch.empty(48, 6, dtype=torch.float8_e4m3fn),
        "alpha": torch.empty(1),
        "bias": torch.empty(_SENTINELS["out_features"] if variant.slice else 48),
        **_SENTINELS,
    }
    return [values[n] for n in variant.argnames]


def _rewire_sentinels(gm: torch.fx.GraphModule, argnames: list[str]) -> None:
    """Replace each constant equal to a sentinel by the placeholder of its input."""
    placeholders = dict(zip(argnames, (n for n in gm.graph.nodes if n.op == "placeholder")))
    by_value = {(type(v), v): placeholders[k] for k, v in _SENTINELS.items() if k in placeholders}
    used = set()

    def rewire(a):
        key = (type(a), a)
        if isinstance(a, (str, int)) and not isinstance(a, bool) and key in by_value:
            used.add(key)
            return by_value[key]
        return a

    for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
        node.args = torch.fx.node.map_aggregate(node.args, rewire)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, rewire)
    if used != set(by_value):
        raise AssertionError(f"pattern tracing lost a non-tensor input: {set(by_value) - used}")
    gm.recompile()


def _trace_pattern(search: Callable, variant: Variant):
    gm = fwd_only(search, _example_inputs(variant))
    _rewire_sentinels(gm, variant.argnames)
    # Ints stay literal (the slice must be [:, :N] exactly); float/list/dtype/device are
    # wildcards as in register_replacement; out_dtype is checked in _extra_check.
    return fx_to_pattern(
        gm, ignore_types=(float, list, torch.device, torch.dtype), argnames=variant.argnames
    )


# ---------------------------------------------------------------------------------------
# checks on a candidate match


def _val(node):
    """A node's (fake) value; a literal argument (say the Python float of ``out + 1.0``) is its own value."""
    if not isinstance(node, torch.fx.Node):
        return node
    return node.meta["val"] if "val" in node.meta else node.meta.get("example_value")


def _first(match: Match, target) -> torch.fx.Node | None:
    return next((n for n in match.nodes if n.target is target), None)


def _quantize_swizzle(node: torch.fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("swizzle", False))


def match_problems(match: Match) -> list[str]:
    """Why a structurally matching chain must not be fused (empty: fuse it)."""
    kw = match.kwargs
    x, weight = _val(kw["x"]), _val(kw["weight"])
    quant, mm = _first(match, QUANTIZE), _first(match, MM)
    problems = []
    try:
        spec = SPECS[parse_backend(kw["backend"])]
    except BackendError:
        return [f"unknown backend {kw['backend']!r}"]
    if spec.semantics != "W4A4":
        problems.append(f"backend {spec.backend.value} is {spec.semantics}: fp4.mm is W4A4 only")
    if quant is not None and _quantize_swizzle(quant) != spec.swizzled_scales:
        problems.append(
            f"fp4.quantize swizzle={_quantize_swizzle(quant)} but backend {spec.backend.value} "
            f"expects swizzle={spec.swizzled_scales}"
        )
    if mm is not None and mm.args[5] != x.dtype:
        problems.append(f"fp4.mm out_dtype {mm.args[5]} differs from the activation dtype {x.dtype}")
    k_weight = weight.shape[1] * 2
    if "k_padded" in kw and kw["k_padded"] != k_weight:
        problems.append(f"fp4.pad_k pads to K={kw['k_padded']} but the weight has K={k_weight}")
    n = kw.get("out_features", weight.shape[0])
    if "out_features" in kw and not 0 < n <= weight.shape[0]:
        problems.append(f"slice [:, :{n}] is outside the GEMM's {weight.shape[0]} columns")
    add = _first(match, ADD)
    if add is not None and add.kwargs.get("alpha", 1) != 1:  # out + alpha * b is not a bias add
        problems.append(f"the add scales its operand (alpha={add.kwargs['alpha']})")
    if "bias" in kw:
        bias = _val(kw["bias"])
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            what = f"shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else f"value {bias!r}"
            problems.append(f"the add's operand has {what}, not a bias of shape ({n},)")
        elif bias.dtype != x.dtype:
            problems.append(f"the bias is {bias.dtype} but the output is {x.dtype}")
    return problems


def _extra_check(variant: Variant) -> Callable[[Match], bool]:
    def check(match: Match) -> bool:
        problems = match_problems(match)
        if problems:
            logger.debug(
                "fp4 fusion: not fusing %s at %s: %s", variant.name, match.output_node(), "; ".join(problems)
            )
        return not problems

    return check


# ---------------------------------------------------------------------------------------
# registration (once per process)


@functools.cache
def pattern_pass() -> PatternMatcherPass:
    """The PatternMatcherPass holding every variant (patterns may be registered only once)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    pm_pass = PatternMatcherPass(pass_name="fp4_fuse_linear")
    with torch._guards.tracing(None), unset_fake_temporarily(), FakeTensorMode():
        for variant in VARIANTS:
            search, replace = variant.bind(chain), variant.bind(fused)
            register_replacement(
                search,
                replace,
                _example_inputs(variant),
                fwd_only,
                pm_pass,
                extra_check=_extra_check(variant),
                search_fn_pattern=_trace_pattern(search, variant),
            )
    return pm_pass


# ---------------------------------------------------------------------------------------
# what is left unfused, and why


def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.users)


def _quantize_of(mm: torch.fx.Node) -> torch.fx.Node | None:
    a, s = mm.args[0], mm.args[1]
    if isinstance(a, torch.fx.Node) and a.target is PAD_K:
        a = a.args[0]
    for item in (a, s):
        if not (isinstance(item, torch.fx.Node) and item.target is operator.getitem):
            return None
    if a.args[0] is not s.args[0] or a.args[0].target is not QUANTIZE:
        return None
    return a.args[0]


def split_shared_quantizations(graph: torch.fx.Graph) -> int:
    """Give each fp4.mm its own fp4.quantize (and fp4.pad_k) where several share one; returns the copies made.

    The linears of one activation with one global scale (q/k/v, gate/up) quantize it identically, and in grad
    mode AOT autograd's CSE of the joint graph merges those calls into one node feeding several fp4.mm: no chain
    would then fuse (its quantized activation has other users). Each fused fp4.linear quantizes inside, and
    ``group_linear`` quantizes a group once again."""
    copies = 0
    for quant in list(graph.find_nodes(op="call_function", target=QUANTIZE)):
        for mm in _sharing_mms(quant)[1:]:
            _own_quantization(graph, quant, mm)
            copies += 1
    return copies


def _sharing_mms(quant: torch.fx.Node) -> list[torch.fx.Node]:
    """The fp4.mm nodes that read ``quant``'s codes (directly or through an fp4.pad_k) and scales, where its
    outputs feed nothing else; [] otherwise."""
    items = _users(quant)
    if len(items) != 2 or any(i.target is not operator.getitem for i in items):
        return []
    codes, scales = sorted(items, key=lambda i: i.args[1])
    mms = _users(scales)
    if len(mms) < 2 or any(m.target is not MM or m.args[1] is not scales for m in mms):
        return []
    pads = [u for u in _users(codes) if u.target is PAD_K]
    if any(u not in mms and u not in pads for u in _users(codes)):
        return []
    if any(u not in mms for p in pads for u in _users(p)) or any(m.args[0] not in (codes, *pads) for m in mms):
        return []
    return mms


def _own_quantization(graph: torch.fx.Graph, quant: torch.fx.Node, mm: torch.fx.Node) -> None:
    """Point ``mm`` at a copy of ``quant``, its two getitems and the fp4.pad_k between (if any)."""
    codes, scales = sorted(_users(quant), key=lambda i: i.args[1])
    a = mm.args[0]
    with graph.inserting_before(mm):
        copy = graph.call_function(QUANTIZE, quant.args, dict(quant.kwargs))
        new_codes = graph.call_function(operator.getitem, (copy, 0))
        new_scales = graph.call_function(operator.getitem, (copy, 1))
        new_a = new_codes if a is codes else graph.call_function(PAD_K, (new_codes, *a.args[1:]), dict(a.kwargs))
    for new, old in ((copy, quant), (new_codes, codes), (new_scales, scales), (new_a, a)):
        new.meta = dict(old.meta)
    mm.replace_input_with(a, new_a)
    mm.replace_input_with(scales, new_scales)
    if not a.users:
        graph.erase_node(a)


def explain_unfused_mm(mm: torch.fx.Node) -> str:
    """A reason, for people, why an fp4.mm node left in a graph was not fused."""
    quant = _quantize_of(mm)
    if quant is None:
        return "its operands do not come from one fp4.quantize (and an optional fp4.pad_k)"
    chain_nodes = {mm}
    a = mm.args[0]
    if a.target is PAD_K:
        chain_nodes.add(a)
    for item in _users(quant):
        extra = [u for u in _users(item) if u not in chain_nodes]
        if extra:
            return f"the quantized activation ({quant.name}) has another user: {', '.join(u.name for u in extra)}"
    if a.target is PAD_K and len(a.users) != 1:
        return f"the padded activation ({a.name}) has another user"
    if len(quant.users) != 2:
        return f"{quant.name} has {len(quant.users)} users, expected its two getitems"
    backend = mm.args[6] if len(mm.args) > 6 else mm.kwargs.get("backend")
    x = _val(quant.args[0])
    try:
        spec = SPECS[parse_backend(backend)]
    except BackendError:
        return f"unknown backend {backend!r}"
    if _quantize_swizzle(quant) != spec.swizzled_scales:
        return f"fp4.quantize swizzle={_quantize_swizzle(quant)} does not match backend {spec.backend.value}"
    if x is not None and mm.args[5] != x.dtype:
        return f"fp4.mm out_dtype {mm.args[5]} differs from the activation dtype {x.dtype}"
    return "no pattern matched (see the debug log of fp4_compile.passes.fuse_linear)"


def explain_partial(linear: torch.fx.Node) -> str | None:
    """For a fused fp4.linear whose output still goes through a slice or a bias-like add:
    why that step was not absorbed (None when nothing looks like a left-over chain step)."""
    users = _users(linear)
    if len(users) != 1:
        return None
    user = users[0]
    if user.target is SLICE:
        dim, start = (list(user.args[1:3]) + [0, 0])[:2]
        end = user.args[3] if len(user.args) > 3 else None
        step = user.args[4] if len(user.args) > 4 else 1
        return f"the output slice is [{'dim %s' % dim}, {start}:{end}:{step}], not [:, :N]: left as a separate slice"
    if user.target is ADD and user.args[0] is linear and isinstance(user.args[1], torch.fx.Node):
        other, out = _val(user.args[1]), _val(linear)
        if other is None or out is None or not all(isinstance(d, int) for d in other.shape):
            return None
        n = out.shape[-1]
        if tuple(other.shape) == (n,) and other.dtype != out.dtype:
            return f"the bias is {other.dtype} but the output is {out.dtype}: add left separate"
        if other.numel() == n and other.dim() > 1:
            return f"the add's operand has shape {tuple(other.shape)}, not a bias of shape ({n},): add left separate"
    return None
