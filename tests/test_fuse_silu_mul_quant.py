"""fp4::linear_silu_mul with ``out_global_scale`` (the product's NVFP4 block values) and the pass that asks
for it (passes/fuse_silu_mul_quant.py).

CPU: the op's output equals ``format.quantize_nvfp4`` of ``F.silu(gate) * up`` as block values, bit for bit
(emulation), and those values times the down weight are the W4A4 down projection; fake kernel, opcheck,
errors; the pass on FX graphs (the down projection switched to the W4A16 kernels of its layout) and what
it leaves alone. The Triton SiLU*mul kernel with quantization runs in the interpreter
(test_triton_interpret.py); the gated CUDA launch with quantization on the GPU (test_gpu_kernels.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from compile_helpers import op_counts
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fp4_compile import NVFP4Linear
from fp4_compile import format as F
from fp4_compile.passes import FP4PostGradPass, fuse_silu_mul_quant
from fp4_compile.passes.fuse_silu_mul import LINEAR, LINEAR_SILU_MUL

K, N = 64, 96


def _layers(dtype, n=N, down_scale=None, backend="emulation"):
    gs = torch.tensor(0.75)
    gate, up = (NVFP4Linear.from_linear(nn.Linear(K, n, bias=b).to(dtype), backend=backend, input_global_scale=gs)
                for b in (False, True))
    down = NVFP4Linear.from_linear(nn.Linear(n, K, bias=False).to(dtype), backend=backend,
                                   input_global_scale=down_scale if down_scale is not None else 0.5)
    return gate, up, down


def _args(layers):
    return ([la.weight for la in layers], [la.weight_scale for la in layers],
            [la.input_global_scale for la in layers], [la.alpha for la in layers], [la.bias for la in layers])


def _linear(x, la, backend="emulation"):
    return torch.ops.fp4.linear(x, la.weight, la.weight_scale, la.input_global_scale, la.alpha, la.bias,
                                la.out_features, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7])
def test_op_returns_the_block_values_of_the_product(m, dtype):
    torch.manual_seed(m)
    gate, up, down = _layers(dtype)
    x = torch.randn(m, K, dtype=dtype)
    gs = down.input_global_scale
    values = torch.ops.fp4.linear_silu_mul(x, *_args([gate, up]), N, "emulation", gs)
    product = Fn.silu(_linear(x, gate)) * _linear(x, up)
    expected = F.block_values(*F.quantize_nvfp4(product, gs.reshape(1).float()))
    assert values.dtype == dtype and values.is_contiguous() and torch.equal(values.float(), expected)
    # the block values times the down weight (W4A4's alpha) are the W4A4 down projection
    by_values = values.double() @ down.dequantized_weight(torch.float64).t() * down.weight_global_scale.double() \
        * down.alpha.double()
    w4a4 = _linear(product, down).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(w4a4, by_values.to(dtype).double(), rtol=tol, atol=tol)


def test_op_fake_kernel_opcheck_and_errors():
    torch.manual_seed(0)
    gate, up, down = _layers(torch.float32)
    args = (torch.randn(3, K), *_args([gate, up]), N, "emulation", down.input_global_scale)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        assert tuple(torch.ops.fp4.linear_silu_mul(*args).shape) == (3, N)
    torch.library.opcheck(torch.ops.fp4.linear_silu_mul.default, args,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    gate, up = (NVFP4Linear.from_linear(nn.Linear(K, 40), backend="emulation", input_global_scale=0.5) for _ in "gu")
    with pytest.raises(ValueError, match="multiple of 16 to quantize"):
        torch.ops.fp4.linear_silu_mul(torch.randn(3, K), *_args([gate, up]), 40, "emulation", torch.tensor([1.0]))
    with pytest.raises(ValueError, match="out_global_scale"):
        torch.ops.fp4.linear_silu_mul(*args[:-1], torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------------------------------
# the pass on FX graphs

def _fx(dtype=torch.bfloat16, down_backend="triton-w4a4", y_used=False, dynamic_scale=False, batch=(2, 3)):
    gate, up, down = _layers(dtype)
    n = N

    def fn(x, *flat):
        (wg, sg, gsg, ag), (wu, su, gsu, au, bu), (wd, sd, gsd, ad) = flat[:4], flat[4:9], flat[9:]
        y = torch.ops.fp4.linear_silu_mul(x.reshape(-1, K), [wg, wu], [sg, su], [gsg, gsu], [ag, au], [None, bu], n,
                                          "triton-w4a4")
        y3 = y.reshape(x.shape[0], x.shape[1], n)  # unflattened, then flattened again by the down linear
        if dynamic_scale:
            gsd = 448 * 6 / y.float().abs().amax().reshape(1)
        outs = [torch.ops.fp4.linear(y3.reshape(-1, n), wd, sd, gsd, ad, None, K, down_backend)]
        if y_used:
            outs.append(y3 + 1)
        return outs

    flat = [gate.weight, gate.weight_scale, gate.input_global_scale, gate.alpha,
            up.weight, up.weight_scale, up.input_global_scale, up.alpha, up.bias,
            down.weight, down.weight_scale, down.input_global_scale, down.alpha]
    return make_fx(fn, tracing_mode="fake")(torch.randn(*batch, K, dtype=dtype), *flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_projection_reads_block_values(dtype):
    gm = _fx(dtype)
    fp4_pass = FP4PostGradPass()
    fp4_pass(gm.graph)
    assert fp4_pass.last.gated_quant == 1
    (fused,) = gm.graph.find_nodes(op="call_function", target=LINEAR_SILU_MUL)
    (down,) = gm.graph.find_nodes(op="call_function", target=LINEAR)
    assert fused.args[8].op == "placeholder" and fused.args[8] is down.args[3]
    assert down.args[7] == "marlin"  # the W4A16 kernels on the W4A4 block values
    assert op_counts(gm.graph)[LINEAR_SILU_MUL] == 1


@pytest.mark.parametrize("case", ["other_backend", "y_used", "dynamic_scale", "one_token"])
def test_left_alone(case):
    gm = _fx(down_backend="emulation" if case == "other_backend" else "triton-w4a4", y_used=case == "y_used",
             dynamic_scale=case == "dynamic_scale", batch=(1, 1) if case == "one_token" else (2, 3))
    assert fuse_silu_mul_quant.fuse_silu_mul_quant(gm.graph) == 0
    (fused,) = gm.graph.find_nodes(op="call_function", target=LINEAR_SILU_MUL)
    assert len(fused.args) == 8
    assert all(node.args[7] != "marlin" for node in gm.graph.find_nodes(op="call_function", target=LINEAR))
