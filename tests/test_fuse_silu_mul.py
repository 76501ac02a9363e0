"""fp4::linear_silu_mul and the pass that makes it (passes/fuse_silu_mul.py).

CPU: the op equals ``F.silu(linear(gate)) * linear(up)`` bit for bit (emulation), its fake kernel and
opcheck, the pass on FX graphs in each form the SiLU takes there (``aten.silu``, Inductor's
decomposition, ``x * sigmoid(x)``; 16-bit and fp32), what it leaves alone, and a gated MLP through
torch.compile. The GPU tests of the gated CUDA launch are in test_gpu_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from compile_helpers import op_counts
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fp4_compile import NVFP4Linear
from fp4_compile.layer import share_equal_activation_scales
from fp4_compile.passes import FP4PostGradPass, fuse_silu_mul
from fp4_compile.passes.fuse_silu_mul import LINEAR, LINEAR_SILU_MUL

K, N = 64, 96


def _pair(bias=(False, True), n=(N, N), shared_scale=True, dtype=torch.float32):
    gs = torch.tensor(0.75)
    layers = [NVFP4Linear.from_linear(nn.Linear(K, n_i, bias=b).to(dtype), backend="emulation",
                                      input_global_scale=gs if shared_scale else 0.5 + i)
              for i, (n_i, b) in enumerate(zip(n, bias))]
    return layers


def _args(layers):
    return ([la.weight for la in layers], [la.weight_scale for la in layers],
            [la.input_global_scale for la in layers], [la.alpha for la in layers], [la.bias for la in layers])


def _linear(x, la):
    return torch.ops.fp4.linear(x, la.weight, la.weight_scale, la.input_global_scale, la.alpha, la.bias,
                                la.out_features, "emulation")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
def test_op_equals_silu_of_gate_times_up(m, dtype):
    torch.manual_seed(m)
    layers = _pair(dtype=dtype)
    x = torch.randn(m, K, dtype=dtype)
    out = torch.ops.fp4.linear_silu_mul(x, *_args(layers), N, "emulation")
    expected = Fn.silu(_linear(x, layers[0])) * _linear(x, layers[1])
    assert out.dtype == dtype and out.is_contiguous() and torch.equal(out, expected)


def test_op_fake_kernel_and_opcheck():
    torch.manual_seed(0)
    args = (torch.randn(3, K), *_args(_pair()), N, "emulation")
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        assert tuple(torch.ops.fp4.linear_silu_mul(*args).shape) == (3, N)
    torch.library.opcheck(torch.ops.fp4.linear_silu_mul.default, args,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_op_errors():
    torch.manual_seed(0)
    weights, scales, gss, alphas, biases = _args(_pair())
    x = torch.randn(2, K)
    with pytest.raises(ValueError, match="two linears"):
        torch.ops.fp4.linear_silu_mul(x, weights * 2, scales * 2, gss * 2, alphas * 2, biases * 2, N, "emulation")
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fp4.linear_silu_mul(x, weights, scales, gss, alphas, biases, N - 16, "emulation")
    with pytest.raises(RuntimeError, match="linear_silu_mul has no backward"):
        torch.ops.fp4.linear_silu_mul(x.requires_grad_(), weights, scales, gss, alphas, biases, N, "emulation")


# ---------------------------------------------------------------------------------------
# the pass on FX graphs

def _silu_forms():
    return {
        "aten.silu": Fn.silu,
        "sigmoid": lambda g: g * torch.sigmoid(g),
        "decomposed": _decomposed_silu,
    }


def _decomposed_silu(g):
    c = g.float()  # (a no-op for fp32)
    return (c / (1 + torch.exp(-c))).to(g.dtype)


def _fx(layers, silu, m=2, dtype=torch.float32, gate_used=False, silu_used=False, other_x=False):
    def fn(x, x2, *flat):
        (wg, sg, gsg, ag, bg), (wu, su, gsu, au, bu) = flat[:5], flat[5:]
        gate = torch.ops.fp4.linear(x, wg, sg, gsg, ag, bg, layers[0].out_features, "emulation")
        up = torch.ops.fp4.linear(x2 if other_x else x, wu, su, gsu, au, bu, layers[1].out_features, "emulation")
        act = silu(gate)
        outs = [act * up]
        if gate_used:
            outs.append(gate + 1)
        if silu_used:
            outs.append(act + 1)
        return outs

    flat = [t for la in layers for t in (la.weight, la.weight_scale, la.input_global_scale, la.alpha, la.bias)]
    args = (torch.randn(m, K, dtype=dtype), torch.randn(m, K, dtype=dtype), *flat)
    return make_fx(fn, tracing_mode="fake")(*args), args, fn


@pytest.mark.parametrize("form", list(_silu_forms()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_and_silu_mul_become_one_node(form, dtype):
    torch.manual_seed(1)
    layers = _pair(dtype=dtype)
    gm, args, fn = _fx(layers, _silu_forms()[form], dtype=dtype)
    fp4_pass = FP4PostGradPass()
    fp4_pass(gm.graph)
    gm.recompile()
    counts = op_counts(gm.graph)
    assert counts[LINEAR_SILU_MUL] == 1 and counts[LINEAR] == 0 and fp4_pass.last.gated == 1
    assert len(gm.graph.nodes) == len(args) + 2  # placeholders, the fused node, the output
    (out,), (expected,) = gm(*args), fn(*args)
    assert out.dtype == dtype
    if form == "aten.silu":
        assert torch.equal(out, expected)
    else:  # the op computes F.silu: another formula's last bits
        torch.testing.assert_close(out, expected, rtol=1e-6 if dtype == torch.float32 else 2 ** -6, atol=1e-6)


def test_inductor_decomposition_of_silu_is_matched():
    """The form Inductor's post-grad graph holds (silu decomposed by its decomposition table)."""
    from torch._inductor.decomposition import select_decomp_table

    torch.manual_seed(2)
    layers = _pair(dtype=torch.bfloat16)
    _, args, fn = _fx(layers, Fn.silu, dtype=torch.bfloat16)
    gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)
    assert not op_counts(gm.graph)[torch.ops.aten.silu.default]
    assert fuse_silu_mul.fuse_silu_mul(gm.graph) == 1
    gm.recompile()
    torch.testing.assert_close(gm(*args)[0], fn(*args)[0], rtol=2 ** -6, atol=1e-6)


@pytest.mark.parametrize("case", ["gate_used", "silu_used", "other_x", "other_n", "relu", "add_alpha"])
def test_left_alone(case):
    torch.manual_seed(3)
    layers = _pair(n=(N, N - 16) if case == "other_n" else (N, N))
    silu = torch.relu if case == "relu" else Fn.silu
    if case == "add_alpha":  # g / (2 * exp(-g) + 1): the division form's look-alike, not silu
        silu = lambda g: g / torch.add(1, torch.exp(-g), alpha=2)  # noqa: E731
    if case == "other_n":  # the product would not broadcast: compare gate[:, :N-16] instead
        silu = lambda g: Fn.silu(g[:, :N - 16])  # noqa: E731
    flags = {k: True for k in ("gate_used", "silu_used", "other_x") if k == case}
    gm, args, fn = _fx(layers, silu, **flags)
    assert fuse_silu_mul.fuse_silu_mul(gm.graph) == 0
    assert not op_counts(gm.graph)[LINEAR_SILU_MUL]


# ---------------------------------------------------------------------------------------
# through torch.compile

class GatedMLP(nn.Module):
    def __init__(self, backend: str = "emulation", device: str = "cpu", dtype=torch.float32, n: int = N) -> None:
        super().__init__()
        gs = torch.tensor(0.5, device=device)
        make = lambda k, n: NVFP4Linear.from_linear(  # noqa: E731
            nn.Linear(k, n, bias=False, device=device, dtype=dtype), backend=backend, input_global_scale=gs)
        self.gate, self.up, self.down = make(K, n), make(K, n), make(n, K)
        share_equal_activation_scales(self)  # as quantize_model does: gate and up quantize x once

    def forward(self, x):
        return x + self.down(Fn.silu(self.gate(x)) * self.up(x))


def _compile_and_run(model, xs, **compile_args):
    from fp4_compile.passes.manager import record_results

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fp4", options={"fx_graph_cache": False}, **compile_args)
    with torch.no_grad(), record_results() as results:
        pairs = [(compiled(x), model(x)) for x in xs]
    return pairs, results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gated_mlp_equals_eager(dtype):
    torch.manual_seed(4)
    pairs, results = _compile_and_run(GatedMLP(dtype=dtype).eval(), [torch.randn(2, 3, K, dtype=dtype)],
                                      fullgraph=True)
    assert [r.gated for r in results] == [1] and all(r.groups == 0 for r in results)
    assert all(torch.equal(out, expected) for out, expected in pairs)


@pytest.mark.parametrize("backend", ["cutlass", "fbgemm"])
def test_compiled_gated_mlp_with_padded_weights(monkeypatch, backend):
    """Blackwell-like layouts (N and K padded to 32, swizzled or linear scales; exact emulations on the CPU)
    with N = 80: the fused op's members slice their padded GEMM outputs as fp4.linear does."""
    from compile_helpers import patch_padded_backends

    patch_padded_backends(monkeypatch)
    torch.manual_seed(7)
    pairs, results = _compile_and_run(GatedMLP(backend, n=80).eval(), [torch.randn(2, 3, K)], fullgraph=True)
    assert [r.gated for r in results] == [1]
    assert all(torch.equal(out, expected) for out, expected in pairs)


def test_compiled_dynamic_m_equals_eager_at_decode_and_prefill_sizes():
    torch.manual_seed(5)
    pairs, results = _compile_and_run(GatedMLP().eval(), [torch.randn(1, 4, K), torch.randn(3, 40, K)],
                                      dynamic=True)
    assert results and all(r.gated == 1 for r in results)
    assert all(torch.equal(out, expected) for out, expected in pairs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["marlin", "triton-w4a4"])
def test_compiled_gated_mlp_on_the_gpu(backend):
    """The Hopper backends: the gated launch at decode sizes (and the fallback above them) within bf16
    rounding of the eager layers, on a model of Llama's MLP width."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(6)
    model = GatedMLP(backend, "cuda", torch.bfloat16).eval()
    xs = [torch.randn(b, t, K, device="cuda", dtype=torch.bfloat16) for b, t in ((1, 1), (3, 4), (2, 20))]
    pairs, results = _compile_and_run(model, xs, dynamic=True)
    assert results and all(r.gated == 1 for r in results)
    for out, expected in pairs:
        rel = float((out.double() - expected.double()).norm() / expected.double().norm())
        assert out.shape == expected.shape and rel <= 1e-2


def test_inspection_counts_the_linears_inside_fused_calls():
    from fp4_compile.inspection import count_linear_calls

    code = ("        buf0 = torch.ops.fp4.linear_silu_mul.default(reinterpret_tensor(arg0_1, (6, 64), (64, 1), 0), "
            "[arg3_1, arg6_1], [arg4_1, arg7_1], [arg1_1, arg1_1], [arg2_1, arg5_1], [None, None], 96, 'emulation')\n"
            "        # buffer buf1 (op: torch.ops.fp4.linear.default) is assumed to be not aligned\n"
            "        buf2 = torch.ops.fp4.linear.default(buf1, arg9_1, arg10_1, arg1_1, arg8_1, None, 64, 'emulation')\n")
    assert count_linear_calls(code, prefix="= ") == 3
