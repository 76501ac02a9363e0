"""fp4::linear_group and the pass that groups the linears of one activation (passes/group_linear.py).

CPU: the op equals its members' fp4::linear calls bit for bit (emulation), its fake kernel and
opcheck, the pass on FX graphs (what groups, what stays apart) and through torch.compile. The GPU
tests of the grouped CUDA launch are in test_cuda_small_m.py.
"""

from __future__ import annotations

import operator

import pytest
import torch
from compile_helpers import op_counts, trace_module
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fp4_compile import NVFP4Linear
from fp4_compile.passes import FP4PostGradPass
from fp4_compile.passes import group_linear
from fp4_compile.passes.group_linear import LINEAR, LINEAR_GROUP

K = 64


def _layers(n_features=(48, 32, 32), bias=(True, False, True), seed=0, backend="emulation"):
    torch.manual_seed(seed)
    return [NVFP4Linear.from_linear(nn.Linear(K, n, bias=b), backend=backend, input_global_scale=1.0 + i / 4)
            for i, (n, b) in enumerate(zip(n_features, bias))]


def _args(layers):
    return ([la.weight for la in layers], [la.weight_scale for la in layers],
            [la.input_global_scale for la in layers], [la.alpha for la in layers], [la.bias for la in layers],
            [la.out_features for la in layers])


@pytest.mark.parametrize("m", [1, 3, 8])
def test_op_equals_its_members_linears(m):
    layers = _layers()
    x = torch.randn(m, K)
    outs = torch.ops.fp4.linear_group(x, *_args(layers), "emulation")
    for out, la in zip(outs, layers):
        expected = torch.ops.fp4.linear(x, la.weight, la.weight_scale, la.input_global_scale, la.alpha, la.bias,
                                        la.out_features, "emulation")
        assert out.is_contiguous() and torch.equal(out, expected)


def test_op_fake_kernel_and_opcheck():
    layers = _layers()
    x = torch.randn(2, K)
    args = (x, *_args(layers), "emulation")
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        fakes = torch.ops.fp4.linear_group(*args)
    assert [tuple(f.shape) for f in fakes] == [(2, 48), (2, 32), (2, 32)]
    torch.library.opcheck(torch.ops.fp4.linear_group.default, args,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_op_errors():
    layers = _layers()
    x = torch.randn(2, K)
    weights, scales, gss, alphas, biases, ns = _args(layers)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fp4.linear_group(x, weights, scales, gss, alphas, biases, [48, 32, 48], "emulation")
    with pytest.raises(RuntimeError, match="linear_group has no backward"):
        torch.ops.fp4.linear_group(x.requires_grad_(), weights, scales, gss, alphas, biases, ns, "emulation")
    with pytest.raises(Exception, match="unknown backend|no-such"):
        torch.ops.fp4.linear_group(torch.randn(2, K), weights, scales, gss, alphas, biases, ns, "no-such")


# ---------------------------------------------------------------------------------------
# the pass on FX graphs


def _fx(m: int, layers, between_scales: bool = False, chained: bool = False):
    """make_fx of each layer's fp4.linear of one x (as NVFP4Linear's direct call emits it), plus the
    first layer's of another input. ``between_scales``: each scale computed just before its linear;
    ``chained``: from the linear before's output too."""
    names = ("weight", "weight_scale", "input_global_scale", "alpha", "bias")

    def fn(x, other, *flat):
        outs = []
        for i, la in enumerate(layers):
            w, ws, gs, alpha, bias = flat[5 * i:5 * i + 5]
            gs = gs * 1.0 if between_scales else gs  # a scale computed between members
            gs = gs + outs[-1].sum() * 0 if chained and outs else gs  # ... from the member before's output
            outs.append(torch.ops.fp4.linear(x, w, ws, gs, alpha, bias, la.out_features, "emulation"))
        outs.append(torch.ops.fp4.linear(other, *flat[:5], layers[0].out_features, "emulation"))
        return [o * 2 for o in outs]

    flat = [getattr(la, name) for la in layers for name in names]
    args = (torch.randn(m, K), torch.randn(m, K), *flat)
    return make_fx(fn, tracing_mode="fake")(*args), args, fn


@pytest.mark.parametrize("m", [1, 8, 16])
def test_linears_of_one_activation_become_one_group(m):
    layers = _layers()
    gm, args, fn = _fx(m, layers)
    fp4_pass = FP4PostGradPass()
    fp4_pass(gm.graph)
    gm.recompile()
    counts = op_counts(gm.graph)
    assert counts[LINEAR_GROUP] == 1 and counts[LINEAR] == 1 and fp4_pass.last.groups == 1
    (group,) = gm.graph.find_nodes(op="call_function", target=LINEAR_GROUP)
    assert group.args[6] == [48, 32, 32] and [u.target for u in group.users] == [operator.getitem] * 3
    expected = fn(*args)
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), expected))


def test_no_group_above_decode_sizes_nor_where_a_member_feeds_another():
    layers = _layers()
    gm, _, _ = _fx(group_linear.MAX_M + 1, layers)
    assert group_linear.group_linears(gm.graph) == 0
    gm, _, _ = _fx(1, layers, chained=True)
    assert group_linear.group_linears(gm.graph) == 0


def test_a_group_on_another_groups_output():
    """Linears of one activation that is itself a grouped linear's output: both groups made."""
    first, second = _layers(n_features=(K, 32)), _layers(n_features=(48, 16), seed=1)

    def fn(x, *flat):
        outs = [torch.ops.fp4.linear(x, *flat[5 * i:5 * i + 5], la.out_features, "emulation")
                for i, la in enumerate(first)]
        h = outs[0]
        outs += [torch.ops.fp4.linear(h, *flat[10 + 5 * i:15 + 5 * i], la.out_features, "emulation")
                 for i, la in enumerate(second)]
        return [o * 2 for o in outs]

    names = ("weight", "weight_scale", "input_global_scale", "alpha", "bias")
    args = (torch.randn(2, K), *(getattr(la, name) for la in first + second for name in names))
    gm = make_fx(fn, tracing_mode="fake")(*args)
    assert group_linear.group_linears(gm.graph) == 2
    gm.recompile()
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), fn(*args)))


def test_a_scale_computed_between_members_moves_the_group_after_it():
    """Dynamic activation scales (each layer computes its own) or a bias cast come between the members: the
    group goes after the last of them."""
    layers = _layers()
    gm, args, fn = _fx(1, layers, between_scales=True)
    assert group_linear.group_linears(gm.graph) == 1
    gm.recompile()
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), fn(*args)))


def test_groups_hold_at_most_max_group():
    layers = _layers(n_features=(32,) * 6, bias=(False,) * 6)
    gm, args, fn = _fx(1, layers)
    assert group_linear.group_linears(gm.graph) == 2  # 6 linears of x: groups of 4 and 2
    gm.recompile()
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), fn(*args)))


# ---------------------------------------------------------------------------------------
# through torch.compile


class QKV(nn.Module):
    """A layer's q/k/v and an MLP's gate/up: the linears of one activation, Hugging Face style."""

    def __init__(self, backend: str, device: str = "cpu") -> None:
        super().__init__()
        make = lambda k, n, gs: NVFP4Linear.from_linear(  # noqa: E731
            nn.Linear(k, n, bias=False, device=device), backend=backend, input_global_scale=gs)
        self.q, self.k, self.v = make(K, 64, 1.0), make(K, 32, 1.5), make(K, 32, 2.0)
        self.gate, self.up = make(K, 96, 0.5), make(K, 96, 0.75)
        self.down = make(96, K, 1.25)

    def forward(self, x):
        h = torch.relu(self.q(x) + torch.cat([self.k(x), self.v(x)], -1))
        return self.down(torch.relu(self.gate(h)) * self.up(h))


def _compile_and_run(model: nn.Module, x: torch.Tensor, **compile_args):
    """(compiled output, eager output, the pass's GraphResults); no FX graph cache (a hit skips the pass),
    and no automatic dynamic shapes carried over from an earlier test's compile of the same forward."""
    from fp4_compile.passes.manager import record_results

    torch._dynamo.reset()

    with torch.no_grad(), record_results() as results:
        out = torch.compile(model, backend="fp4", options={"fx_graph_cache": False}, **compile_args)(x)
        expected = model(x)
    return out, expected, results


@pytest.mark.parametrize("backend", ["emulation", pytest.param("marlin", marks=pytest.mark.gpu)])
def test_compiled_decode_groups_and_equals_eager(backend):
    if backend == "marlin":  # W4A16 layers emit fp4.linear directly; the Hopper kernels need a GPU
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    torch.manual_seed(1)
    device = "cuda" if backend == "marlin" else "cpu"
    model = QKV(backend, device).eval()
    out, expected, results = _compile_and_run(model, torch.randn(1, 2, K, device=device), fullgraph=True)
    assert sum(r.groups for r in results) == 2
    assert torch.equal(out, expected) if device == "cpu" else torch.allclose(out, expected, rtol=1e-3, atol=1e-3)


def test_compiled_prefill_is_not_grouped():
    torch.manual_seed(1)
    out, expected, results = _compile_and_run(QKV("emulation").eval(), torch.randn(2, 16, K), fullgraph=True)
    assert sum(r.groups for r in results) == 0 and torch.equal(out, expected)


def test_calibrated_linears_of_one_input_share_one_activation_scale():
    """quantize_model gives equal calibrated activation scales one tensor (q/k/v and gate/up see the same
    input), so that a group quantizes once; the compiled group then takes one scale node, and the
    results do not change."""
    from fp4_compile import quantize_model

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(K, 64), nn.Linear(K, 32), nn.Linear(K, 32)
            self.o = nn.Linear(K, K)

        def forward(self, x):
            return self.o(torch.relu(self.q(x) + torch.cat([self.k(x), self.v(x)], -1)))

    torch.manual_seed(2)
    model = Plain().eval()
    x = torch.randn(1, 3, K)
    quantize_model(model, calibration_data=[x, x * 3], progress=False)
    assert model.q.input_global_scale is model.k.input_global_scale is model.v.input_global_scale
    assert model.o.input_global_scale is not model.q.input_global_scale
    out, expected, results = _compile_and_run(model, x, fullgraph=True)
    assert torch.equal(out, expected)
    assert sum(g.groups for g in results) == 1
    (scales,) = [line for g in results for line in g.graph_code.splitlines() if "linear_group.default(" in line]
    scale_args = scales.split("[")[3].split("]")[0].split(", ")
    assert len(scale_args) == 3 and len(set(scale_args)) == 1


def test_dynamic_m_is_grouped_and_decided_per_call():
    """With a symbolic M (one graph for every batch size) the pass groups, and each call decides: the
    compiled graph equals eager at decode and at prefill sizes."""
    from fp4_compile.passes.manager import record_results

    torch.manual_seed(3)
    torch._dynamo.reset()
    model = QKV("emulation").eval()
    compiled = torch.compile(model, backend="fp4", options={"fx_graph_cache": False}, dynamic=True)
    with torch.no_grad(), record_results() as results:
        for x in (torch.randn(1, 4, K), torch.randn(3, 40, K)):
            assert torch.equal(compiled(x), model(x))
    assert results and all(r.groups == 2 for r in results)


# ---------------------------------------------------------------------------------------
# inputs computed between members (Hugging Face models with dynamic scales: tests/test_model_families.py)


class QThenKV(nn.Module):
    """q's output is used (Hugging Face's view and rotary embedding) before k and v are called."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (NVFP4Linear.from_linear(nn.Linear(64, n)) for n in (64, 32, 32))  # dynamic scales

    def forward(self, x):
        q = self.q(x) * 2
        return q, self.k(x), self.v(x)


class KScaledByQ(QThenKV):
    """k's activation scale depends on q's output: k must wait for q."""

    def forward(self, x):
        q, k = self.q(x), self.k
        gs = q.abs().amax().reshape(1) + 1  # (k reads the same view of x as q's fp4.linear: one activation)
        return q, torch.ops.fp4.linear(x.reshape(-1, 64), k.weight, k.weight_scale, gs, k.weight_global_scale, None,
                                       k.out_features, "emulation")


@pytest.mark.parametrize("model_class,groups", [(QThenKV, 1), (KScaledByQ, 0)])
def test_inputs_computed_between_members_move_before_the_group_unless_they_need_a_member(seed, model_class, groups):
    model, x = model_class().eval(), torch.randn(3, 64)
    gm, params = trace_module(model, x)
    fp4_pass = FP4PostGradPass()
    fp4_pass(gm.graph)
    gm.recompile()
    assert fp4_pass.last.groups == op_counts(gm.graph)[LINEAR_GROUP] == groups
    gm.graph.lint()  # (every node after its inputs)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(gm(params, (x,), {}), model(x)))
