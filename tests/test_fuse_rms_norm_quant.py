"""fp4::rms_norm_quantize and the pass that makes it (passes/fuse_rms_norm_quant.py).

CPU: the op's reference against the eager RMSNorm and format.quantize_nvfp4 (its values times the weight
equal the W4A4 product), its fake kernel and opcheck, the pass on FX graphs traced with Inductor's
decompositions (with and without the residual add, bf16 and fp32) and what it leaves alone. The Triton
kernel runs in the interpreter (test_triton_interpret.py) and on the GPU (below, marked gpu), and a
compiled W4A4 layer is checked against eager on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from compile_helpers import op_counts
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fp4_compile import NVFP4Linear
from fp4_compile import format as F
from fp4_compile.passes import FP4PostGradPass, fuse_rms_norm_quant
from fp4_compile.passes.fuse_rms_norm_quant import RMS_NORM_QUANTIZE

K = 64


def _norm(x, residual, weight, eps, unit_offset=False, offset=1.0):
    """(s, h): Hugging Face's LlamaRMSNorm of s = x + residual, or with ``unit_offset`` its GemmaRMSNorm."""
    s = x + residual if residual is not None else x
    xf = s.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return s, (normed * (offset + weight.float())).type_as(x)
    return s, normed.to(x.dtype) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_op_reference(dtype, residual, unit_offset):
    x = torch.randn(2, 3, K, dtype=dtype) * 3
    r = torch.randn(2, 3, K, dtype=dtype) if residual else None
    w = (torch.randn(K) / 4 + (0 if unit_offset else 1)).to(dtype)
    gs = F.global_scale_from_amax(torch.tensor(20.0)).reshape(1)
    values, total = torch.ops.fp4.rms_norm_quantize(x, r, w, 1e-5, gs, unit_offset)
    s, h = _norm(x, r, w, 1e-5, unit_offset)
    assert values.shape == x.shape and values.dtype == dtype
    assert torch.equal(total, s) if residual else total.numel() == 0
    expected = F.block_values(*F.quantize_nvfp4(h.reshape(-1, K), gs)).reshape(x.shape)
    assert torch.equal(values.float(), expected)
    # the values times the weight's are the W4A4 product (alpha = 1 / (gs * gw))
    layer = NVFP4Linear.from_linear(nn.Linear(K, 32, bias=False).to(dtype), backend="emulation", input_global_scale=gs)
    w4a4 = layer(h).double()
    by_values = values.double() @ layer.dequantized_weight(torch.float64).t() * layer.weight_global_scale.double() \
        * layer.alpha.double()
    assert torch.allclose(w4a4, by_values.to(dtype).double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                          atol=1e-5)


def test_op_fake_kernel_opcheck_and_errors():
    x, w, gs = torch.randn(3, K), torch.randn(K), torch.tensor([2.0])
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        values, total = torch.ops.fp4.rms_norm_quantize(x, x, w, 1e-6, gs)
        assert values.shape == (3, K) and total.shape == (3, K)
    for args in ((x, x.clone(), w, 1e-6, gs), (x, None, w, 1e-6, gs, True)):
        torch.library.opcheck(torch.ops.fp4.rms_norm_quantize.default, args,
                              test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.fp4.rms_norm_quantize(x, None, w[:-1], 1e-6, gs)
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.fp4.rms_norm_quantize(torch.randn(3, 40), None, torch.randn(40), 1e-6, gs)


# ---------------------------------------------------------------------------------------
# the pass on FX graphs (traced with Inductor's decompositions, as its post-grad graphs hold the norm)

def _layers(dtype, n=(96, 32), shared_scale=True):
    from fp4_compile.layer import share_equal_activation_scales

    layers = [NVFP4Linear.from_linear(nn.Linear(K, n_i, bias=False).to(dtype), backend="emulation",
                                      input_global_scale=0.75 if shared_scale else 0.5 + i)
              for i, n_i in enumerate(n)]
    share_equal_activation_scales(nn.ModuleList(layers))  # as quantize_model does
    return layers


def _fx(dtype=torch.bfloat16, residual=True, backend="triton-w4a4", h_used=False, shared_scale=True,
        dynamic_scale=False, unit_offset=False, offset=1.0):
    from torch._inductor.decomposition import select_decomp_table

    layers = _layers(dtype, shared_scale=shared_scale)

    def fn(x, r, w, *flat):
        s, h = _norm(x, r if residual else None, w, 1e-5, unit_offset, offset)
        h2 = h.reshape(-1, K)
        outs = [s * 2]
        for i, la in enumerate(layers):
            wt, ws, gs, alpha = flat[4 * i:4 * i + 4]
            if dynamic_scale:
                gs = 448 * 6 / h2.float().abs().amax().reshape(1)
            outs.append(torch.ops.fp4.linear(h2, wt, ws, gs, alpha, None, la.out_features, backend))
        if h_used:
            outs.append(h + 1)
        return outs

    flat = [t for la in layers for t in (la.weight, la.weight_scale, la.input_global_scale, la.alpha)]
    args = (torch.randn(2, 3, K, dtype=dtype), torch.randn(2, 3, K, dtype=dtype), torch.randn(K, dtype=dtype), *flat)
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_norm_and_quantization_become_one_node(dtype, residual, unit_offset):
    gm = _fx(dtype, residual, unit_offset=unit_offset)
    fp4_pass = FP4PostGradPass()
    fp4_pass(gm.graph)
    counts = op_counts(gm.graph)
    assert fp4_pass.last.norms == 1 and counts[RMS_NORM_QUANTIZE] == 1 and fp4_pass.last.groups == 1
    for op in (torch.ops.aten.rsqrt.default, torch.ops.aten.mean.dim, torch.ops.aten.pow.Tensor_Scalar,
               torch.ops.prims.convert_element_type.default):
        assert not counts[op]
    assert counts[torch.ops.aten.mul.Tensor] == 1  # the graph's own s * 2
    (norm,) = gm.graph.find_nodes(op="call_function", target=RMS_NORM_QUANTIZE)
    assert (norm.args[1] is not None) == residual and norm.args[3] == 1e-5
    assert norm.args[2].op == "placeholder" and tuple(norm.args[5:]) == ((True,) if unit_offset else ())
    (group,) = gm.graph.find_nodes(op="call_function", target=torch.ops.fp4.linear_group.default)
    assert group.args[7] == "marlin"  # the W4A16 kernels on the W4A4 block values
    assert not counts[torch.ops.aten.add.Tensor]  # the residual add (and the eps add) went into the op


def test_gemma_weight_term_before_the_normalized_input():
    """Without a residual add, Gemma's ``1 + weight`` may come before s (computed from the weight alone): the
    fused op still goes after s, and the graph stays valid (a review found it placed before s)."""
    from torch._inductor.decomposition import select_decomp_table

    (layer,) = _layers(torch.bfloat16, n=(32,))

    def fn(x, w, wt, ws, gs, alpha):
        offset = 1.0 + w.float()
        s = x * 2.0  # not a residual add (as Gemma's scaled embeddings)
        xf = s.float()
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * offset).type_as(x)
        return torch.ops.fp4.linear(h.reshape(-1, K), wt, ws, gs, alpha, None, 32, "triton-w4a4")

    args = (torch.randn(2, 3, K, dtype=torch.bfloat16), torch.randn(K, dtype=torch.bfloat16), layer.weight,
            layer.weight_scale, layer.input_global_scale, layer.alpha)
    gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)
    assert fuse_rms_norm_quant.fuse_rms_norm_quant(gm.graph) == 1
    gm.graph.lint()
    (norm,) = gm.graph.find_nodes(op="call_function", target=RMS_NORM_QUANTIZE)
    assert norm.args[5] is True and norm.args[0].target == torch.ops.aten.mul.Tensor


@pytest.mark.parametrize("case", ["emulation", "h_used", "scales_differ", "dynamic_scale", "offset_two"])
def test_left_alone(case):
    gm = _fx(backend="emulation" if case == "emulation" else "triton-w4a4", h_used=case == "h_used",
             shared_scale=case != "scales_differ", dynamic_scale=case == "dynamic_scale",
             unit_offset=case == "offset_two", offset=2.0)  # (a Gemma-like norm of 2 + weight is not Gemma's)
    assert fuse_rms_norm_quant.fuse_rms_norm_quant(gm.graph) == 0
    assert not op_counts(gm.graph)[RMS_NORM_QUANTIZE]


# ---------------------------------------------------------------------------------------
# on the GPU

def _gpu():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 4096), (16, 4096), (300, 1040), (5, 48), (3, 14336), (2, 20480)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_kernel_against_reference(seed, dtype, m, k, residual, unit_offset):
    """An eager call (16-bit rows: the CUDA kernel; float32: Triton's) and a call captured in a
    CUDA graph (the Triton kernel) against the op's CPU reference and each other: the residual sums equal, the
    values equal but where a normalized element's rounding differs by the order of the float32 sum (rare)."""
    _gpu()
    x = torch.randn(m, k, dtype=dtype) * 4
    r = torch.randn(m, k, dtype=dtype) if residual else None
    w = (torch.randn(k) / 4 + (0 if unit_offset else 1)).to(dtype)
    gs = F.global_scale_from_amax(torch.tensor(40.0)).reshape(1)
    ref_values, ref_total = torch.ops.fp4.rms_norm_quantize(x, r, w, 1e-5, gs, unit_offset)
    cuda = [t.cuda() if t is not None else None for t in (x, r, w, gs)]
    values, total = torch.ops.fp4.rms_norm_quantize(cuda[0], cuda[1], cuda[2], 1e-5, cuda[3], unit_offset)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.fp4.rms_norm_quantize(cuda[0], cuda[1], cuda[2], 1e-5, cuda[3], unit_offset)
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.fp4.rms_norm_quantize(cuda[0], cuda[1], cuda[2], 1e-5, cuda[3], unit_offset)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(total.cpu(), ref_total) and torch.equal(captured[1].cpu(), ref_total)
    for got in (values, captured[0]):
        assert torch.isfinite(got).all() and (got.cpu() != ref_values).float().mean() <= 2e-3
    assert (values != captured[0]).float().mean() <= 2e-3


class W4A4Layer(nn.Module):
    """RMSNorm -> q/k/v, residual, RMSNorm -> gate/up -> SiLU*mul -> down: the norms feed W4A4 linears
    (Llama's norms, or with ``unit_offset`` Gemma's)."""

    def __init__(self, d=256, ff=512, dtype=torch.bfloat16, unit_offset=False):
        super().__init__()
        base = 0 if unit_offset else 1
        self.w1, self.w2 = nn.Parameter(base + torch.randn(d) / 8), nn.Parameter(base + torch.randn(d) / 8)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), nn.Linear(ff, d,
                                                                                                          bias=False)
        self.unit_offset = unit_offset
        self.to(dtype)

    def norm(self, x, w):
        return _norm(x, None, w, 1e-5, self.unit_offset)[1]

    def forward(self, x):
        h = self.norm(x, self.w1)
        x = x + self.o(self.q(h) * torch.sigmoid(self.k(h)) + self.v(h))
        h = self.norm(x, self.w2)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_inductor_post_grad_graph_fuses_both_norms(unit_offset):
    """Inductor's own post-grad graph of the layer on triton-w4a4 (compiled on the CPU, where the call that
    follows the compile raises: the Hopper kernels need a GPU) has both norms fused, Gemma's too."""
    from compile_helpers import SnapshotBackend

    from fp4_compile import quantize_model
    from fp4_compile.backends import convert_to_kernel_format

    torch.manual_seed(3)
    model = W4A4Layer(unit_offset=unit_offset).eval()
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16)
    quantize_model(model, calibration_data=[x], progress=False)
    for layer in model.modules():
        if isinstance(layer, NVFP4Linear):
            convert_to_kernel_format("triton-w4a4", layer)
    torch._dynamo.reset()
    snapshot = SnapshotBackend()
    with torch.no_grad(), pytest.raises(RuntimeError, match="GPU kernel"):
        torch.compile(model, backend=snapshot)(x)
    (after,) = snapshot.after
    norms = after.find_nodes(op="call_function", target=RMS_NORM_QUANTIZE)
    assert len(norms) == 2 and all(tuple(n.args[5:]) == ((True,) if unit_offset else ()) for n in norms)
    assert not op_counts(after)[torch.ops.aten.rsqrt.default]


@pytest.mark.gpu
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_compiled_w4a4_layer_on_the_gpu(unit_offset):
    """Both norms fuse with their linears' quantization; compiled within bf16 rounding of eager at decode
    and prefill sizes (a symbolic M)."""
    _gpu()
    from fp4_compile import quantize_model
    from fp4_compile.passes.manager import record_results

    torch.manual_seed(8)
    model = W4A4Layer(unit_offset=unit_offset).cuda().eval()
    xs = [torch.randn(b, t, 256, device="cuda", dtype=torch.bfloat16) for b, t in ((1, 1), (2, 8), (2, 100))]
    quantize_model(model, backend="triton-w4a4", calibration_data=[xs[1]], progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fp4", options={"fx_graph_cache": False}, dynamic=True)
    with torch.no_grad(), record_results() as results:
        for x in xs:
            out, expected = compiled(x), model(x)
            rel = float((out.double() - expected.double()).norm() / expected.double().norm())
            assert rel <= 2e-2, rel
    assert results and all(r.norms == 2 and r.gated == 1 for r in results)
