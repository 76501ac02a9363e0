"""NVFP4Linear against the float64 W4A4 reference, quantize_model, and bad input."""

import copy
import logging

import pytest
import torch
from torch import nn

from fp4_compile import Backend, BackendError, NVFP4Linear, quantize_model
from fp4_compile import format as fmt


def _reference_w4a4(x, layer_linear: nn.Linear, gs_x=None):
    """Independent W4A4 from format's quantize/dequantize, in float64."""
    w = layer_linear.weight.detach().float()
    gs_w = fmt.global_scale_from_amax(w.abs().amax()).reshape(1)
    x2 = x.reshape(-1, x.shape[-1])
    gs_x = fmt.global_scale_from_amax(x2.abs().amax().float()).reshape(1) if gs_x is None else gs_x
    xq = fmt.dequantize_nvfp4(*fmt.quantize_nvfp4(x2, gs_x), gs_x, dtype=torch.float64)
    wq = fmt.dequantize_nvfp4(*fmt.quantize_nvfp4(w, gs_w), gs_w, dtype=torch.float64)
    out = xq @ wq.t()
    if layer_linear.bias is not None:
        out = out + layer_linear.bias.double()
    return out.reshape(*x.shape[:-1], -1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 96), (1, 16)])
def test_layer_equals_float64_reference_dynamic(seed, bias, shape):
    lin = nn.Linear(shape[-1], 40, bias=bias)
    layer = NVFP4Linear.from_linear(lin)
    x = torch.randn(shape)
    out = layer(x)
    assert out.shape == shape[:-1] + (40,) and out.dtype == torch.float32
    assert _rel(out, _reference_w4a4(x, lin)) < 1e-6


def test_layer_static_scale_and_bf16(seed):
    lin = nn.Linear(128, 72).bfloat16()
    x = torch.randn(5, 128, dtype=torch.bfloat16) * 3
    gs = fmt.global_scale_from_amax(torch.tensor(20.0))
    layer = NVFP4Linear.from_linear(lin, input_global_scale=gs)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert _rel(out, _reference_w4a4(x, lin, gs.reshape(1))) < 4e-3  # bf16 output rounding
    assert torch.equal(layer.alpha, torch.reciprocal(layer.input_global_scale * layer.weight_global_scale))


def test_layer_accuracy_vs_bf16_linear(seed):
    lin = nn.Linear(512, 256)
    layer = NVFP4Linear.from_linear(lin)
    x = torch.randn(32, 512)
    cos = nn.functional.cosine_similarity(layer(x).flatten(), lin(x).detach().flatten(), dim=0).item()
    assert cos > 0.985, cos  # W4A4 on Gaussian data: about 0.990 (quantization error ~0.13)


def test_layer_buffers_and_round_trip(seed):
    lin = nn.Linear(48, 20)
    layer = NVFP4Linear.from_linear(lin)
    packed, scales = layer.linear_weight()
    assert packed.shape == (20, 24) and scales.shape == (20, 3)
    w = lin.weight.detach()
    gs = fmt.global_scale_from_amax(w.abs().amax()).reshape(1)
    want_p, want_s = fmt.quantize_nvfp4(w, gs)
    assert torch.equal(packed, want_p) and torch.equal(scales.view(torch.uint8), want_s.view(torch.uint8))
    assert set(dict(layer.named_buffers())) >= {"weight", "weight_scale", "weight_global_scale"}
    assert layer.alpha is None  # dynamic activation scale: alpha comes per call
    assert torch.allclose(layer.dequantized_weight(), fmt.dequantize_nvfp4(want_p, want_s, gs))


def test_layer_empty_and_non_contiguous(seed):
    layer = NVFP4Linear.from_linear(nn.Linear(32, 8))
    assert layer(torch.randn(0, 32)).shape == (0, 8)
    x = torch.randn(32, 6).t()
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_non_finite_input_is_not_finite(seed):
    layer = NVFP4Linear.from_linear(nn.Linear(32, 8), input_global_scale=torch.tensor(50.0))
    x = torch.randn(2, 32)
    x[0, 5] = float("inf")
    out = layer(x)
    assert not out[0].isfinite().any() and out[1].isfinite().all()


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(),
                                  lambda m: m.type(torch.float16)])
def test_module_casts_keep_the_format_buffers(seed, cast):
    """``model.to(dtype)`` / ``.half()`` / ``.type(dtype)`` cast the bias, as nn.Linear's, but not the packed codes
    (``.type`` casts every tensor), the e4m3 block scales or the float32 global scales and alpha (a cast would
    round them and leave the layer unusable)."""
    lin = nn.Linear(64, 24)
    layer = NVFP4Linear.from_linear(lin, input_global_scale=3.0)
    before = {name: getattr(layer, name).clone() for name in ("weight", "weight_scale", "weight_global_scale",
                                                                "input_global_scale", "alpha")}
    cast(layer)
    for name, value in before.items():
        now = getattr(layer, name)
        assert now.dtype == value.dtype and torch.equal(now.view(torch.uint8), value.view(torch.uint8)), name
    dtype = layer.bias.dtype
    assert dtype in (torch.bfloat16, torch.float16, torch.float32)
    x = torch.randn(3, 64).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert _rel(out, _reference_w4a4(x.float(), lin, layer.input_global_scale)) < 1e-2


def test_bias_of_another_dtype_follows_the_input(seed):
    """A float32 layer fed bf16: the output is bf16 on every path, with the bias cast to it (the fused op
    refuses a bias of another dtype)."""
    lin = nn.Linear(64, 24)
    layer = NVFP4Linear.from_linear(lin, input_global_scale=3.0)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    no_bias = NVFP4Linear.from_linear(nn.Linear(64, 24, bias=False), input_global_scale=3.0)
    no_bias.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "bias"})
    assert torch.equal(out, no_bias(x) + layer.bias.to(torch.bfloat16))


def test_layer_bad_input():
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear.from_linear(nn.Linear(24, 8))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        NVFP4Linear.from_linear(nn.Linear(32, 8).to(torch.float8_e4m3fn))
    nan_linear = nn.Linear(32, 8)
    nan_linear.weight.data[3, 4] = float("nan")
    with pytest.raises(ValueError, match="linear.weight has 1 non-finite"):
        NVFP4Linear.from_linear(nan_linear)
    layer = NVFP4Linear.from_linear(nn.Linear(32, 8))
    with pytest.raises(ValueError, match="expects 32"):
        layer(torch.randn(2, 48))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer(torch.ones(2, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="positive and finite"):
        NVFP4Linear.from_linear(nn.Linear(32, 8), input_global_scale=-1.0)
    packed, scales = layer.linear_weight()
    with pytest.raises(ValueError, match="weight scales must have shape"):
        NVFP4Linear(packed, scales[:, :1], torch.ones(1))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        NVFP4Linear(packed, scales.float(), torch.ones(1))
    with pytest.raises(ValueError, match="bias must have shape"):
        NVFP4Linear(packed, scales, torch.ones(1), bias=torch.ones(3))
    with pytest.raises(ValueError, match="one device"):
        NVFP4Linear(packed, scales, torch.ones(1), bias=torch.ones(8, device="meta"))


class TinyTransformer(nn.Module):
    """Embedding, one attention block and an MLP, with a K=24 linear that must be skipped."""

    def __init__(self, vocab=97, dim=128, hidden=256, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim)
        self.odd = nn.Linear(24, 24)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        b, s, d = h.shape
        x = self.norm1(h)
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        att = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        h = h + self.o(att.transpose(1, 2).reshape(b, s, d))
        x = self.norm2(h)
        h = h + self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        h = torch.cat([h[..., :104], self.odd(h[..., 104:])], -1)
        return self.head(h)


@pytest.mark.parametrize("calibrated", [False, True])
def test_quantize_model_keeps_outputs_close(seed, calibrated, caplog):
    model = TinyTransformer().eval()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
    calib = [torch.randint(0, 97, (2, 12)) for _ in range(3)] + [tokens] if calibrated else None
    with caplog.at_level(logging.INFO, logger="fp4_compile.layer"):
        quantize_model(model, calibration_data=calib, progress=False)
    assert "odd" in caplog.text and "not a multiple of 16" in caplog.text
    assert isinstance(model.odd, nn.Linear) and isinstance(model.q, NVFP4Linear)
    n_fp4 = sum(isinstance(m, NVFP4Linear) for m in model.modules())
    assert n_fp4 == 8
    assert all((m.input_global_scale is not None) == calibrated for m in model.modules() if isinstance(m, NVFP4Linear))
    with torch.no_grad():
        out = model(tokens)
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    print(f"quantize_model cosine similarity (calibrated={calibrated}): {cos:.4f}")
    assert cos > 0.97


def test_quantize_model_of_a_bare_linear_returns_the_nvfp4_layer(seed):
    lin = nn.Linear(64, 24)
    out = quantize_model(lin, progress=False)
    assert isinstance(out, NVFP4Linear) and not list(lin.children())
    x = torch.randn(2, 64)
    assert _rel(out(x), _reference_w4a4(x, lin)) < 1e-6


def test_quantize_model_replaces_nothing_when_a_layer_fails(seed):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 16)))
    with torch.no_grad():
        model[2][0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^2\.0: .*non-finite"):
        quantize_model(model, progress=False)
    assert [type(m) for m in (model[0], model[2][0])] == [nn.Linear, nn.Linear]


def test_quantize_model_filter(seed):
    model = TinyTransformer()
    quantize_model(model, filter_fn=lambda name, mod: name != "head", progress=False)
    assert isinstance(model.head, nn.Linear) and isinstance(model.down, NVFP4Linear)


def test_given_weight_global_scale(seed):
    lin = nn.Linear(64, 24)
    gs = fmt.global_scale_from_amax(lin.weight.detach().abs().amax() * 4).reshape(1)  # a shared, larger amax
    layer = NVFP4Linear.from_linear(lin, weight_global_scale=gs)
    assert torch.equal(layer.weight_global_scale, gs)
    want = fmt.quantize_nvfp4(lin.weight.detach(), gs)
    assert torch.equal(layer.linear_weight()[0], want[0])
    model = nn.ModuleList([nn.Linear(64, 24), nn.Linear(32, 8)])
    quantize_model(model, weight_global_scales={"0": gs}, progress=False)
    assert torch.equal(model[0].weight_global_scale, gs) and not torch.equal(model[1].weight_global_scale, gs)


def _quantized_mlp(calibration_data, dense: nn.Sequential | None = None):
    """An MLP of two NVFP4 layers (of ``dense``'s linears, quantized in a copy, when given)."""
    model = dense if dense is not None else nn.Sequential(nn.Linear(64, 96, bias=False), nn.SiLU(), nn.Linear(96, 48, bias=False))
    return quantize_model(copy.deepcopy(model).eval(), calibration_data=calibration_data, progress=False)


@pytest.mark.parametrize("backend", ["triton-w4a4", "cublas", "flashinfer-trtllm"])
def test_state_dict_loads_into_a_layer_of_another_backend(seed, backend):
    from fp4_compile.backends import convert_to_kernel_format

    lin = nn.Linear(256, 128)
    gs_x = fmt.global_scale_from_amax(torch.tensor(8.0)).reshape(1)
    gpu_layer = NVFP4Linear.from_linear(lin, input_global_scale=gs_x)
    convert_to_kernel_format(backend, gpu_layer)  # what quantize_model gives on a GPU; its layout: same shape
    cpu_layer = NVFP4Linear.from_linear(nn.Linear(256, 128), input_global_scale=1.0)  # another model's layer
    cpu_layer.load_state_dict(gpu_layer.state_dict())
    x = torch.randn(6, 256)
    assert _rel(cpu_layer(x), _reference_w4a4(x, lin, gs_x)) < 1e-6
    convert_to_kernel_format(backend, cpu_layer)  # and back: the state dict of emulation in the kernel layout
    gpu_layer.load_state_dict(NVFP4Linear.from_linear(lin, input_global_scale=gs_x).state_dict())
    for a, b in zip(gpu_layer.linear_weight(), cpu_layer.linear_weight()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_load_state_dict_into_layers_that_share_an_activation_scale(seed):
    dense = nn.Sequential(nn.Linear(64, 96, bias=False), nn.SiLU(), nn.Linear(96, 48, bias=False))
    source = _quantized_mlp([torch.randn(4, 64) * 3], dense)
    skeleton = _quantized_mlp([torch.zeros(4, 64)])  # both inputs all zero: one scale, one shared tensor
    assert skeleton[0].input_global_scale is skeleton[2].input_global_scale
    skeleton.load_state_dict(source.state_dict())
    x = torch.randn(5, 64)
    hidden = nn.functional.silu(skeleton[0](x))
    for layer, lin, inputs in ((skeleton[0], dense[0], x), (skeleton[2], dense[2], hidden)):
        assert _rel(layer(inputs), _reference_w4a4(inputs, lin, layer.input_global_scale)) < 1e-6
    for mine, theirs in ((skeleton[0], source[0]), (skeleton[2], source[2])):
        assert torch.equal(mine.input_global_scale, theirs.input_global_scale)


def test_state_dict_with_a_static_scale_makes_a_dynamic_layer_static(seed):
    source = _quantized_mlp([torch.randn(4, 64)])
    target = _quantized_mlp(None)
    target.load_state_dict(source.state_dict(), strict=True)
    assert target[0].input_global_scale is not None and target[2].input_global_scale is not None
    assert "0.alpha" not in source.state_dict()  # derived from the global scales, recomputed on load
    x = torch.randn(3, 64)
    assert torch.equal(target(x), source(x))


def test_strict_load_of_a_dynamic_state_dict_into_a_static_layer_reports_the_scale_missing(seed):
    target = _quantized_mlp([torch.randn(4, 64)])
    with pytest.raises(RuntimeError, match="input_global_scale"):
        target.load_state_dict(_quantized_mlp(None).state_dict(), strict=True)


def test_partial_load_keeps_the_static_activation_scale(seed):
    """A non-strict load of weights alone (no input_global_scale) keeps a calibrated layer's static scale."""
    source = _quantized_mlp(None)
    target = _quantized_mlp([torch.randn(4, 64)])
    scales = [target[0].input_global_scale.clone(), target[2].input_global_scale.clone()]
    weights_only = {k: v for k, v in source.state_dict().items() if "input_global_scale" not in k}
    target.load_state_dict(weights_only, strict=False)
    assert all(torch.equal(m.input_global_scale, s) for m, s in zip((target[0], target[2]), scales))
    x = torch.randn(3, 64)
    for layer, inputs in ((target[0], x), (target[2], nn.functional.silu(target[0](x)))):
        assert torch.equal(layer.linear_weight()[0], source[0 if layer is target[0] else 2].linear_weight()[0])
        assert torch.isfinite(layer(inputs)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton-w4a4", "marlin"])
def test_gpu_state_dict_loads_into_a_cpu_model_and_back(seed, backend):
    """A layer on the GPU's Hopper kernels saves the checkpoint layout: a CPU (emulation) layer loads it and
    computes the same W4A4 product; the GPU layer loads the CPU one's state dict back unchanged."""
    lin = nn.Linear(320, 200)
    gs_x = fmt.global_scale_from_amax(torch.tensor(6.0)).reshape(1)
    gpu_layer = NVFP4Linear.from_linear(lin, input_global_scale=gs_x).cuda()
    gpu_layer.set_backend(backend)
    cpu_layer = NVFP4Linear.from_linear(nn.Linear(320, 200), input_global_scale=1.0)
    cpu_layer.load_state_dict(gpu_layer.state_dict())
    x = torch.randn(5, 320)
    assert _rel(cpu_layer(x), _reference_w4a4(x, lin, gs_x)) < 1e-6
    fresh = NVFP4Linear.from_linear(nn.Linear(320, 200), input_global_scale=1.0).cuda()
    fresh.set_backend(backend)
    fresh.load_state_dict(cpu_layer.state_dict())
    for a, b in zip(fresh.linear_weight(), gpu_layer.linear_weight()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    xg = x.cuda()
    assert torch.equal(fresh(xg), gpu_layer(xg))


def test_backend_follows_device_only_where_none_was_named(seed):
    lin = nn.Linear(64, 32)
    assert NVFP4Linear.from_linear(lin).backend_follows_device
    named = NVFP4Linear.from_linear(lin, backend="emulation")
    assert not named.backend_follows_device
    named.set_backend()
    assert named.backend_follows_device
    named.set_backend("emulation")
    assert not named.backend_follows_device
    assert all(layer.backend_follows_device for layer in _quantized_mlp(None) if isinstance(layer, NVFP4Linear))


def _raise_backend_error(device):
    raise BackendError("FP4_GEMM_BACKEND names a backend this device lacks")


@pytest.mark.parametrize("selected, named, expected", [
    (lambda device: Backend.FLASHINFER_TRTLLM, False, Backend.FLASHINFER_TRTLLM),  # followed
    (lambda device: Backend.FLASHINFER_TRTLLM, True, Backend.EMULATION),  # a named backend stays
    (lambda device: Backend.MARLIN, False, Backend.EMULATION),  # W4A16: other numbers, not followed
    (_raise_backend_error, False, Backend.EMULATION),
])
def test_a_move_re_lays_a_selected_backend_out(seed, monkeypatch, selected, named, expected):
    """``to_empty`` from the meta device onto the CPU, whose backend is patched to be another one: a layer of a
    selected backend takes it (same semantics only), with its weight laid out for it; a state dict then loads
    into the layer exactly. (The meta device itself is no move to follow.)"""
    from fp4_compile import layer as layer_module
    from fp4_compile.backends import kernels_for

    lin = nn.Linear(256, 128)
    source = NVFP4Linear.from_linear(lin)
    moved = NVFP4Linear.from_linear(lin, backend="emulation" if named else None).to("meta")
    assert moved.backend is Backend.EMULATION
    monkeypatch.setattr(layer_module, "select_backend", selected)
    moved.to_empty(device="cpu")
    assert moved.backend is expected
    assert moved.weight.shape == kernels_for(expected).prepare_weight(*source.linear_weight())[0].shape
    moved.load_state_dict(source.state_dict())
    for a, b in zip(moved.linear_weight(), source.linear_weight()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_a_meta_layer_loaded_with_assign_takes_its_new_device_backend(seed, monkeypatch):
    """Built on the meta device, then ``load_state_dict(assign=True)`` (no ``_apply``: the state dict's tensors
    become the buffers): a layer of a selected backend takes the backend of their device, one of a named
    backend keeps its own; the weight is exact either way."""
    from fp4_compile import layer as layer_module

    source = NVFP4Linear.from_linear(nn.Linear(256, 128), input_global_scale=2.0)
    monkeypatch.setattr(layer_module, "select_backend", lambda device: Backend.FLASHINFER_TRTLLM)
    for named, expected in ((False, Backend.FLASHINFER_TRTLLM), (True, Backend.EMULATION)):
        layer = NVFP4Linear.from_linear(nn.Linear(256, 128), input_global_scale=2.0,
                                        backend="emulation" if named else None).to("meta")
        layer.load_state_dict(source.state_dict(), assign=True)
        assert layer.weight.device.type == "cpu" and layer.backend is expected
        for a, b in zip(layer.linear_weight(), source.linear_weight()):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert torch.equal(layer.alpha, source.alpha)


def test_an_unpickled_layer_takes_the_backend_of_its_device(seed, monkeypatch, tmp_path):
    """``torch.load`` of a whole pickled layer (its tensors mapped to a device; no ``_apply``): a selected
    backend becomes the one of the device it landed on, a named one stays; the weight is exact."""
    from fp4_compile import layer as layer_module

    lin = nn.Linear(256, 128)
    selected, named = NVFP4Linear.from_linear(lin), NVFP4Linear.from_linear(lin, backend="emulation")
    monkeypatch.setattr(layer_module, "select_backend", lambda device: Backend.FLASHINFER_TRTLLM)
    torch.save({"selected": selected, "named": named}, tmp_path / "layers.pt")
    loaded = torch.load(tmp_path / "layers.pt", map_location="cpu", weights_only=False)
    assert (loaded["selected"].backend, loaded["named"].backend) == (Backend.FLASHINFER_TRTLLM, Backend.EMULATION)
    for layer in loaded.values():
        for a, b in zip(layer.linear_weight(), selected.linear_weight()):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
def test_a_model_quantized_on_the_cpu_runs_the_gpu_backend_once_moved(seed):
    """quantize_model on the CPU (emulation), then .cuda(): the GPU's own backend, the same W4A4 function;
    .cpu() again: emulation, and the CPU outputs of before, bit for bit. A named backend stays through both."""
    from fp4_compile.backends import select_backend

    dense = nn.Sequential(nn.Linear(256, 320), nn.SiLU(), nn.Linear(320, 192))
    model = _quantized_mlp([torch.randn(4, 256) * 2], dense)
    x = torch.randn(7, 256)
    with torch.no_grad():
        before = model(x)
        model.cuda()
        assert {model[0].backend, model[2].backend} == {select_backend(torch.device("cuda"))} != {Backend.EMULATION}
        on_gpu = model(x.cuda()).cpu()
        hidden = nn.functional.silu(model[0](x.cuda())).cpu()
        assert _rel(on_gpu, _reference_w4a4(hidden, dense[2], model[2].input_global_scale.cpu())) < 1e-3
        assert _rel(on_gpu, before) < 1e-3  # the same function; fp32 summation order differs
        model.cpu()
        assert model[0].backend is model[2].backend is Backend.EMULATION
        assert torch.equal(model(x), before)
    named = NVFP4Linear.from_linear(nn.Linear(64, 32), backend="emulation").cuda()
    assert named.backend is Backend.EMULATION
