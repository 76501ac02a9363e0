"""FX-graph tests of the fp4 fusion pass (fp4_compile/passes): node counts per variant.

Most tests trace with make_fx(tracing_mode="fake") and run FP4PostGradPass on the graph
(milliseconds); one runs the whole Inductor pipeline with a snapshot backend, as vLLM's
tests/compile do. Numerics: the rewritten graph must equal the eager layer bit for bit.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter

import pytest
import torch
from compile_helpers import (SWIZZLED, UNSWIZZLED, ExactGlue, SnapshotBackend, op_counts, patch_padded_backends,
                             trace_module)
from torch.fx.experimental.proxy_tensor import make_fx

from fp4_compile import NVFP4Linear
from fp4_compile.passes import FP4PostGradPass
from fp4_compile.passes import manager as pass_manager
from fp4_compile.passes.fuse_linear import ADD, LINEAR, MM, PAD_K, QUANTIZE, SLICE, VARIANTS, Variant, chain, pattern_pass

GETITEM = operator.getitem
LOGGER = "fp4_compile.passes"


@pytest.fixture
def padded(monkeypatch):
    patch_padded_backends(monkeypatch)




def run_pass(gm: torch.fx.GraphModule):
    before = op_counts(gm.graph)
    fp4_pass = FP4PostGradPass()
    fp4_pass(gm.graph)
    gm.recompile()
    return before, op_counts(gm.graph), fp4_pass.last


def expected_chain(*, pad: bool, slice_: bool, bias: bool) -> Counter:
    removed = Counter({QUANTIZE: 1, GETITEM: 2, MM: 1})
    removed.update({PAD_K: int(pad), SLICE: int(slice_), ADD: int(bias)})
    return +removed


# (backend, K, N): the emulation backend never pads; the padded test backends pad N and K
# to 32 (swizzled scales for 'cutlass', linear ones for 'fbgemm').
SHAPES = [
    ("emulation", 48, 40),
    (SWIZZLED, 64, 64),
    (SWIZZLED, 48, 64),
    (SWIZZLED, 64, 40),
    (SWIZZLED, 48, 40),
    (UNSWIZZLED, 48, 40),
]


@pytest.mark.parametrize("backend,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("lead", [(2, 3), (5,)], ids=["3d", "2d"])
def test_layer_chain_fuses(padded, backend, k, n, bias, static, lead):
    torch.manual_seed(k * n + bias)
    layer = NVFP4Linear.from_linear(
        torch.nn.Linear(k, n, bias=bias), backend=backend, input_global_scale=1.7 if static else None
    )
    x = torch.randn(*lead, k)
    gm, params = trace_module(layer, x)
    before, after, result = run_pass(gm)

    pad, slice_ = layer.weight.shape[1] * 2 != k, layer.weight.shape[0] != n
    removed = expected_chain(pad=pad, slice_=slice_, bias=bias)
    assert before - after == removed  # quantize/getitem/pad_k/mm/slice/add vanish ...
    assert after - before == Counter({LINEAR: 1})  # ... one fp4.linear appears ...
    for target, count in before.items():  # ... nothing else changes (views, dynamic-scale ops)
        if target not in removed:
            assert after[target] == count, target
    (info,) = result.fused
    assert (info.backend, info.out_features, info.bias, info.in_features) == (backend, n, bias, k)
    assert not result.unfused and not result.direct
    assert torch.equal(gm(params, (x,), {}), layer(x))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_registered_variant_matches(variant: Variant):
    """Each of the 16 patterns, on the chain itself (also the combinations that no real
    backend produces, e.g. padding with linear scales)."""
    backend = "cutlass" if variant.swizzle else "emulation"
    k = 48 if variant.pad else 64
    n_padded = 64
    out_features = 40 if variant.slice else n_padded
    inputs = {
        "x": torch.randn(6, k),
        "gs": torch.ones(1),
        "weight": torch.zeros(n_padded, 32, dtype=torch.uint8),
        "weight_scale": torch.zeros(n_padded, 4, dtype=torch.float8_e4m3fn),
        "alpha": torch.ones(1),
        "backend": backend,
        "k_padded": 64,
        "out_features": out_features,
        "bias": torch.randn(out_features),
    }
    args = [inputs[name] for name in variant.argnames]
    tensor_positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(tensor_positions, tensors):
            full[i] = t
        return variant.bind(chain)(*full)

    gm = make_fx(fn, tracing_mode="fake")(*[args[i] for i in tensor_positions])
    before, after, result = run_pass(gm)
    assert before - after == expected_chain(pad=variant.pad, slice_=variant.slice, bias=variant.bias)
    assert after - before == Counter({LINEAR: 1})
    (node,) = gm.graph.find_nodes(op="call_function", target=LINEAR)
    assert node.args[6] == out_features and node.args[7] == backend
    assert (node.args[5] is not None) == variant.bias


def test_patterns_registered_once():
    assert pattern_pass() is pattern_pass()
    assert sum(len(v) for v in pattern_pass().patterns.values()) == len(VARIANTS) == 16
    for _ in range(2):  # a second pass object reuses the patterns (no "Duplicate pattern")
        gm, _ = trace_module(NVFP4Linear.from_linear(torch.nn.Linear(32, 16)), torch.randn(3, 32))
        assert run_pass(gm)[2].fused


# ---------------------------------------------------------------------------------------
# negative cases: must stay (partly) unfused, run, and say why in the debug log


def _chain_inputs(k=64, n=48, dtype=torch.float32):
    torch.manual_seed(0)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(k, n), input_global_scale=2.0)
    return torch.randn(5, k, dtype=dtype), layer


def _graph(fn, *args):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    expected = fn(*args)
    before, after, result = run_pass(gm)
    out = gm(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        assert torch.equal(a, b)
    return before, after, result


def test_second_user_of_quantized_activation_blocks_fusion(caplog):
    x, layer = _chain_inputs()

    def fn(x, gs, w, ws, alpha, bias):
        a, s = torch.ops.fp4.quantize(x, gs)
        out = torch.ops.fp4.mm(a, s, w, ws, alpha, x.dtype, "emulation") + bias
        return out, a.sum(dtype=torch.int64)  # a second user of the packed activation

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        before, after, result = _graph(fn, x, layer.input_global_scale, layer.weight, layer.weight_scale, layer.alpha, layer.bias)
    assert before == after  # nothing rewritten
    (info,) = result.unfused
    assert "another user" in info.note
    assert "another user" in caplog.text


@pytest.mark.parametrize("pad", [False, True])
def test_one_quantization_of_several_chains_is_split_and_each_fuses(pad):
    """In grad mode AOT autograd's CSE merges the identical quantizations of linears of one input (q/k/v with
    one scale) into one node feeding several fp4.mm: each gets its own copy, and every chain fuses."""
    x, first = _chain_inputs()
    second = NVFP4Linear.from_linear(torch.nn.Linear(64, 24, bias=False), input_global_scale=2.0)

    def fn(x, gs, w1, ws1, alpha1, bias1, w2, ws2, alpha2):
        a, s = torch.ops.fp4.quantize(x, gs)
        if pad:  # one fp4.pad_k shared too (to the weights' K: a copy)
            a = torch.ops.fp4.pad_k(a, 64)
        return (torch.ops.fp4.mm(a, s, w1, ws1, alpha1, x.dtype, "emulation") + bias1,
                torch.ops.fp4.mm(a, s, w2, ws2, alpha2, x.dtype, "emulation"))

    _, after, result = _graph(fn, x, first.input_global_scale, first.weight, first.weight_scale, first.alpha,
                              first.bias, second.weight, second.weight_scale, second.alpha)
    assert not after[QUANTIZE] and not after[MM] and not after[PAD_K]
    assert [i.bias for i in result.fused] == [True, False] and not result.unfused
    assert result.groups == 1  # and, of one input at M=5, grouped


def test_second_user_of_scales_blocks_fusion():
    x, layer = _chain_inputs()

    def fn(x, gs, w, ws, alpha):
        a, s = torch.ops.fp4.quantize(x, gs)
        return torch.ops.fp4.mm(a, s, w, ws, alpha, x.dtype, "emulation"), s.float().sum()

    before, after, result = _graph(fn, x, layer.input_global_scale, layer.weight, layer.weight_scale, layer.alpha)
    assert before == after and len(result.unfused) == 1


def test_an_add_that_scales_its_operand_is_not_a_bias(caplog):
    """``torch.add(out, b, alpha=3)`` adds 3b: left outside the fused linear."""
    x, layer = _chain_inputs()
    bias = torch.randn(48)

    def fn(x, gs, w, ws, alpha, bias):
        a, s = torch.ops.fp4.quantize(x, gs)
        return torch.add(torch.ops.fp4.mm(a, s, w, ws, alpha, x.dtype, "emulation"), bias, alpha=3)

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        _, after, result = _graph(fn, x, layer.input_global_scale, layer.weight, layer.weight_scale, layer.alpha, bias)
    assert after[ADD] == 1 and [i.bias for i in result.fused] == [False]
    assert "alpha=3" in caplog.text


@pytest.mark.parametrize("bias_shape", [(1, 48), (5, 48)], ids=["1xN", "MxN"])
def test_broadcasting_bias_is_not_absorbed(caplog, bias_shape):
    x, layer = _chain_inputs()
    bias = torch.randn(bias_shape)

    def fn(x, gs, w, ws, alpha, bias):
        a, s = torch.ops.fp4.quantize(x, gs)
        return torch.ops.fp4.mm(a, s, w, ws, alpha, x.dtype, "emulation") + bias

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        before, after, result = _graph(fn, x, layer.input_global_scale, layer.weight, layer.weight_scale, layer.alpha, bias)
    # The quantize -> mm core fuses; the add stays outside, with its own operand.
    assert after[ADD] == before[ADD] == 1 and after[LINEAR] == 1 and after[MM] == 0
    (info,) = result.fused
    assert not info.bias
    assert "not a bias of shape (48,)" in caplog.text
    # A [1, N] operand is reported as a bias left outside; [M, N] is a plain (residual) add.
    assert ("not a bias of shape" in info.note) == (bias_shape == (1, 48))


def test_bias_of_another_dtype_is_not_absorbed(caplog):
    x, layer = _chain_inputs(dtype=torch.bfloat16)
    bias = torch.randn(48)  # float32 bias on a bfloat16 output: the add promotes

    def fn(x, gs, w, ws, alpha, bias):
        a, s = torch.ops.fp4.quantize(x, gs)
        return torch.ops.fp4.mm(a, s, w, ws, alpha, x.dtype, "emulation") + bias

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        before, after, result = _graph(fn, x, layer.input_global_scale, layer.weight, layer.weight_scale, layer.alpha, bias)
    assert after[ADD] == 1 and after[LINEAR] == 1
    assert not result.fused[0].bias
    assert "torch.float32 but the output is torch.bfloat16" in caplog.text
    assert "add left separate" in result.fused[0].note


@pytest.mark.parametrize("cut", ["start", "step", "dim0"])
def test_slice_other_than_leading_columns_is_not_absorbed(padded, cut):
    torch.manual_seed(1)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 40), backend=SWIZZLED, input_global_scale=2.0)
    x = torch.randn(5, 64)

    def fn(x, gs, w, ws, alpha):
        a, s = torch.ops.fp4.quantize(x, gs, True)
        out = torch.ops.fp4.mm(a, s, w, ws, alpha, x.dtype, SWIZZLED)
        if cut == "start":
            return out[:, 2:40]
        return out[:, 0:40:2] if cut == "step" else out[:3]

    before, after, result = _graph(fn, x, layer.input_global_scale, layer.weight, layer.weight_scale, layer.alpha)
    assert after[SLICE] == 1 and after[LINEAR] == 1 and after[MM] == 0
    (info,) = result.fused
    assert info.out_features == 64  # the whole padded GEMM output; the slice stays outside
    assert "not [:, :N]" in info.note


def test_swizzle_mismatch_and_out_dtype_mismatch_stay_unfused(padded, caplog):
    torch.manual_seed(2)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 64), backend=SWIZZLED, input_global_scale=2.0)
    x = torch.randn(5, 64)

    def wrong_layout(x, gs, w, ws, alpha):  # linear scales into a swizzled-scale backend
        a, s = torch.ops.fp4.quantize(x, gs)
        return torch.ops.fp4.mm(a, s, w, ws, alpha, x.dtype, SWIZZLED)

    def wrong_dtype(x, gs, w, ws, alpha):
        a, s = torch.ops.fp4.quantize(x, gs, True)
        return torch.ops.fp4.mm(a, s, w, ws, alpha, torch.bfloat16, SWIZZLED)

    args = (x, layer.input_global_scale, layer.weight, layer.weight_scale, layer.alpha)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        gm = make_fx(wrong_layout, tracing_mode="fake")(*args)
        before, after, result = run_pass(gm)
        assert before == after and "swizzle=False" in result.unfused[0].note
        gm = make_fx(wrong_dtype, tracing_mode="fake")(*args)
        before, after, result = run_pass(gm)
        assert before == after and "out_dtype" in result.unfused[0].note
    assert "expects swizzle=True" in caplog.text


def test_direct_linear_is_left_alone():
    """W4A16 layers call fp4.linear directly: nothing to fuse, counted as 'direct'."""
    x, layer = _chain_inputs()

    def fn(x, w, ws, gs, alpha, bias):
        return torch.ops.fp4.linear(x, w, ws, gs, alpha, bias, 48, "emulation")

    before, after, result = _graph(fn, x, layer.weight, layer.weight_scale, layer.input_global_scale, layer.alpha, layer.bias)
    assert before == after and len(result.direct) == 1 and not result.fused


# ---------------------------------------------------------------------------------------
# the whole Inductor pipeline, graphs snapshotted around the pass


def test_snapshot_backend_full_pipeline(padded):
    torch.manual_seed(3)
    model = ExactGlue(backend=SWIZZLED, k=48, n=80)  # K 48/80 and N 80/48 padded: pad_k and slice
    x = torch.randn(2, 3, 48)
    backend = SnapshotBackend()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
        expected = model(x)
    assert torch.equal(out, expected)
    (before,), (after,) = backend.before, backend.after
    b, a = op_counts(before), op_counts(after)
    removed = Counter({QUANTIZE: 3, GETITEM: 6, PAD_K: 3, MM: 3, SLICE: 3, ADD: 2})  # 2 of the 3 have a bias
    assert b - a == removed
    assert a - b == Counter({LINEAR: 3})
    assert all(a[t] == c for t, c in b.items() if t not in removed)  # residual add, relu, mul, views stay
    assert [i.module for i in backend.fp4_pass.last.fused] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------
# cache key


def test_uuid_hashes_pass_and_op_sources(tmp_path):
    uuid = FP4PostGradPass().uuid()
    assert uuid == FP4PostGradPass().uuid() and len(uuid) == 64
    names = {p.name for p in pass_manager.SOURCE_FILES}
    assert {"fuse_linear.py", "manager.py", "library.py", "backends.py"} <= names
    copies = []
    for i, path in enumerate(pass_manager.SOURCE_FILES):
        copy = tmp_path / f"{i}_{path.name}"
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    assert pass_manager.source_hash(copies) != pass_manager.source_hash(pass_manager.SOURCE_FILES)  # names count
    reference = pass_manager.source_hash(copies)
    copies[1].write_text(copies[1].read_text() + "\n# edited\n")
    assert pass_manager.source_hash(copies) != reference


def test_uuid_with_a_user_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "user-pass-v1"

    ours = FP4PostGradPass().uuid()
    chained = FP4PostGradPass(extra=UserPass()).uuid()
    assert chained and chained != ours
    assert FP4PostGradPass(extra=lambda graph: None).uuid() is None  # no uuid: no caching


def test_conversions_are_dtype_casts_on_the_same_device():
    """``fx_nodes.conversion`` reads ``x.to(dtype)`` and ``x.type_as(y)`` traced without decompositions (an
    ``aten._to_copy`` with the input's own layout and device) as dtype casts, and nothing that moves data."""
    from fp4_compile.passes.fx_nodes import conversion

    def fn(x, y):
        return x.to(torch.float32), x.type_as(y), x.to("meta", torch.float32), x.to(torch.float32, copy=True) * 2

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(3, dtype=torch.bfloat16), torch.randn(3))
    copies = list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten._to_copy.default))
    found = [conversion(node) for node in copies]
    assert len(copies) >= 3 and sum(f is not None for f in found) == len(copies) - 1
    assert all(f[1] == torch.float32 for f in found if f is not None)
    (moved,) = [node for node, f in zip(copies, found) if f is None]
    assert moved.kwargs["device"] == torch.device("meta")
    graph = torch.fx.Graph()  # what cannot be told a pure cast: an input of unknown layout, or no dtype
    x = graph.placeholder("x")
    copy_ = torch.ops.aten._to_copy.default
    assert conversion(graph.call_function(copy_, (x,), {"dtype": torch.float32})) == (x, torch.float32)
    assert conversion(graph.call_function(copy_, (x,), {"dtype": torch.float32, "layout": torch.strided})) is None
    x.meta["val"] = torch.empty(3, 3).to_sparse()
    assert conversion(graph.call_function(copy_, (x,), {"dtype": torch.float32, "layout": torch.strided})) is None
    assert conversion(graph.call_function(copy_, (x,), {"dtype": None})) is None
