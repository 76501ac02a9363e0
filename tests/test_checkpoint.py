"""Checkpoints: compressed-tensors and ModelOpt load/save, interop with the real
compressed-tensors package, faults named by tensor and file, fused-partition merges."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fp4_compile import format as fmt  # noqa: E402
from fp4_compile.checkpoint import (  # noqa: E402
    CheckpointError,
    QuantScheme,
    load_nvfp4,
    merge_nvfp4_linears,
    quantize_transformers_model,
    read_quant_scheme,
    save_nvfp4,
)
from fp4_compile.demo import build_demo_model, random_batches  # noqa: E402
from fp4_compile.layer import NVFP4Linear, nvfp4_layers  # noqa: E402

VOCAB = 128


def tiny_model(seed: int, *, layers: int = 1, tie: bool = True, bias: bool = False) -> nn.Module:
    model = build_demo_model(hidden_size=64, num_layers=layers, vocab_size=VOCAB, seed=seed)
    if not tie:
        cfg = copy.deepcopy(model.config)
        cfg.tie_word_embeddings = False
        cfg.attention_bias = bias
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = type(model)._from_config(cfg, dtype=torch.bfloat16).eval()
    return model


def calibration(seed: int, count: int = 2) -> list[dict]:
    return [{"input_ids": ids, "use_cache": False} for ids in random_batches(VOCAB, count=count, batch=2, seq_len=16, seed=seed)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny Llama (untied, with attention bias) quantized with calibration, plus inputs."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    model = tiny_model(seed, tie=False, bias=True)
    quantize_transformers_model(model, calibration_data=calibration(seed + 1), progress=False)
    ids = random_batches(VOCAB, count=1, batch=2, seq_len=16, seed=seed + 2)[0]
    return model, ids


# ---------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("shard", [None, "24KB"])
def test_compressed_tensors_round_trip_is_exact(quantized, tmp_path, shard):
    model, ids = quantized
    out = save_nvfp4(model, tmp_path / "ckpt", **({"max_shard_size": shard} if shard else {}))
    files = sorted(p.name for p in out.iterdir())
    if shard:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    loaded = load_nvfp4(out, device="cpu")
    assert set(nvfp4_layers(loaded)) == set(nvfp4_layers(model))
    assert all(layer.backend_follows_device for layer in nvfp4_layers(loaded).values())  # none was named
    for name, layer in nvfp4_layers(model).items():
        other = loaded.get_submodule(name)
        for a, b in zip(layer.linear_weight(), other.linear_weight()):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
        assert torch.equal(layer.weight_global_scale, other.weight_global_scale)
        assert torch.equal(layer.input_global_scale, other.input_global_scale)
        assert torch.equal(layer.bias, other.bias) if layer.bias is not None else other.bias is None
    assert isinstance(loaded.lm_head, nn.Linear) and loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # the linears of one input calibrated one activation scale: one tensor, in the model and once loaded
    for m in (model, loaded):
        attn = m.model.layers[0].self_attn
        assert attn.q_proj.input_global_scale is attn.k_proj.input_global_scale is attn.v_proj.input_global_scale


def test_tied_embeddings_and_dynamic_scales_round_trip(tmp_path, seed):
    model = tiny_model(seed, tie=True)
    quantize_transformers_model(model, calibration_data=None, progress=False)  # dynamic activation scales
    out = save_nvfp4(model, tmp_path / "ckpt")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert not any(k.endswith("input_global_scale") for k in keys)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    loaded = load_nvfp4(out, device="cpu", backend="emulation")
    assert not any(layer.backend_follows_device for layer in nvfp4_layers(loaded).values())  # named
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(m.input_global_scale is None for m in nvfp4_layers(loaded).values())
    ids = random_batches(VOCAB, count=1, batch=2, seq_len=16, seed=seed)[0]
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_modelopt_round_trip(quantized, tmp_path):
    model, ids = quantized
    out = save_nvfp4(model, tmp_path / "mo", format="modelopt")
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["quant_algo"] == "NVFP4"
    assert hf_quant["quantization"]["exclude_modules"] == ["lm_head"]
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(name)
    assert tensors[f"{name}.weight"].dtype == torch.uint8
    assert f"{name}.weight_packed" not in tensors
    # ModelOpt stores inverses: weight_scale_2 = amax/(448*6) = 1/multiplier
    assert tensors[f"{name}.weight_scale_2"].shape == ()
    assert torch.equal(tensors[f"{name}.weight_scale_2"].reshape(1), torch.reciprocal(layer.weight_global_scale))
    assert torch.equal(tensors[f"{name}.input_scale"].reshape(1), torch.reciprocal(layer.input_global_scale))
    loaded = load_nvfp4(out, device="cpu")
    for n, layer in nvfp4_layers(model).items():
        other = loaded.get_submodule(n)
        for a, b in zip(layer.linear_weight(), other.linear_weight()):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), n
        # 1/(1/x) in float32 is x or one ulp away
        for a, b in ((layer.weight_global_scale, other.weight_global_scale),
                     (layer.input_global_scale, other.input_global_scale)):
            ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(float(a)))
            assert abs(float(a) - float(b)) <= ulp, n
    torch.testing.assert_close(logits(loaded, ids).float(), logits(model, ids).float(), rtol=0.02, atol=0.02)


def modelopt_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """NVFP4 the ModelOpt way (its formulas, written independently of fp4_compile)."""
    w = w.float()
    ws2 = w.abs().amax() / (6.0 * 448.0)  # get_weights_scaling_factor_2
    blocks = w.reshape(w.shape[0], -1, 16)
    sf = (blocks.abs().amax(-1) / (6.0 * ws2)).clamp(max=448).to(torch.float8_e4m3fn)  # per-block scale
    scaled = blocks / (sf.float() * ws2).unsqueeze(-1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mag = scaled.abs().clamp(max=6).reshape(-1, 1)
    idx = (mag - grid).abs().argmin(-1).to(torch.uint8).reshape(scaled.shape)  # nearest (ties: lower)
    codes = (idx | ((scaled < 0).to(torch.uint8) << 3)).reshape(w.shape[0], -1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": packed, "weight_scale": sf, "weight_scale_2": ws2.reshape(())}


def test_hand_built_modelopt_checkpoint(tmp_path, seed):
    """A checkpoint following ModelOpt's conventions, written without fp4_compile."""
    dense = tiny_model(seed, tie=False)
    dense.save_pretrained(tmp_path / "dense")  # config.json + dense weights to start from
    state = load_file(str(tmp_path / "dense" / "model.safetensors"))
    out = tmp_path / "mo"
    out.mkdir()
    input_amax = 3.0
    for name, module in dense.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            del state[f"{name}.weight"]
            for k, v in modelopt_quantize(module.weight.detach()).items():
                state[f"{name}.{k}"] = v
            state[f"{name}.input_scale"] = torch.tensor(input_amax / (6.0 * 448.0))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config))
    (out / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                         "exclude_modules": ["lm_head"]},
    }))
    scheme = read_quant_scheme(out)
    assert scheme.format == "modelopt"
    loaded = load_nvfp4(out, device="cpu")
    assert len(nvfp4_layers(loaded)) == 7
    for name, layer in nvfp4_layers(loaded).items():
        ws2 = state[f"{name}.weight_scale_2"]
        # ModelOpt dequantizes as e2m1 * sf * weight_scale_2
        expected = fmt.block_values(state[f"{name}.weight"], state[f"{name}.weight_scale"]) * ws2
        torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=2e-7, atol=0)
        assert abs(float(layer.weight_global_scale) * float(ws2) - 1) < 1e-6  # multiplier = 1/weight_scale_2
        assert float(layer.input_global_scale) == pytest.approx(448 * 6 / input_amax, rel=1e-6)
    # compressed-tensors' own ModelOpt converter agrees on the directions
    converters = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4")
    converted = converters.ModelOptNvfp4Converter(ignore=["lm_head"], targets=["re:.*proj$"]).process(dict(state))
    name = "model.layers.0.mlp.down_proj"
    layer = loaded.get_submodule(name)
    torch.testing.assert_close(converted[f"{name}.weight_global_scale"].reshape(1), layer.weight_global_scale)
    torch.testing.assert_close(converted[f"{name}.input_global_scale"].reshape(1), layer.input_global_scale)
    # the loaded model runs and stays close to the dense one
    ids = random_batches(VOCAB, count=1, batch=2, seq_len=16, seed=seed)[0]
    ref, out_logits = logits(dense, ids).float(), logits(loaded, ids).float()
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out_logits.flatten(), dim=0) > 0.9


# ---------------------------------------------------------------------------------------
# interop with the compressed-tensors package


def _ct_nvfp4_model(seed: int):
    ct_q = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    model = tiny_model(seed, tie=False)
    dense = copy.deepcopy(model)
    qcfg = ct_q.QuantizationConfig(
        config_groups={"group_0": ct_q.QuantizationScheme(targets=["Linear"], **NVFP4)}, ignore=["lm_head"]
    )
    ct_q.apply_quantization_config(model, qcfg)
    for _, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        # what llm-compressor's observers compute (static min-max), with CT's own helpers
        w = m.weight.detach()
        gs = generate_gparam(w.amin(), w.amax())
        blocks = w.reshape(w.shape[0], -1, 16)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), m.quantization_scheme.weights, global_scale=gs)
        m.weight_global_scale.data.copy_(gs)
        m.weight_scale.data.copy_(scale)
        m.input_global_scale.data.copy_(generate_gparam(torch.tensor(-2.5), torch.tensor(2.5)))
    compressor = ModelCompressor.from_pretrained_model(model, "nvfp4-pack-quantized")
    compressor.compress_model(model)
    return model, dense, compressor


def test_checkpoint_written_by_compressed_tensors_loads(tmp_path, seed):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    def w_shape(m):
        return m.weight_packed.shape[0], m.weight_packed.shape[1] * 2

    model, dense, compressor = _ct_nvfp4_model(seed)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(str(tmp_path / "ct"))
    loaded = load_nvfp4(tmp_path / "ct", device="cpu")
    layers = nvfp4_layers(loaded)
    assert len(layers) == 7 and isinstance(loaded.lm_head, nn.Linear)
    for name, layer in layers.items():
        m = model.get_submodule(name)
        packed, scales = layer.linear_weight()
        assert torch.equal(packed, m.weight_packed)
        assert torch.equal(scales.view(torch.uint8), m.weight_scale.view(torch.uint8))
        assert torch.equal(layer.weight_global_scale, m.weight_global_scale)
        assert torch.equal(layer.input_global_scale, m.input_global_scale)
        theirs = NVFP4PackedCompressor.decompress(
            {"weight_packed": m.weight_packed, "weight_scale": m.weight_scale,
             "weight_global_scale": m.weight_global_scale}, m.quantization_scheme)["weight"]
        ours = layer.dequantized_weight(torch.float32)
        # compressed-tensors computes e2m1 * (sf / gs) and rounds to bf16; we compute e2m1 * sf / gs:
        # the same value up to one bf16 step, and up to two float32 steps when it stays in float32
        torch.testing.assert_close(ours.to(theirs.dtype).float(), theirs.float(), rtol=2**-7, atol=0)
        values = unpack_fp4_from_uint8(m.weight_packed, *w_shape(m), dtype=torch.float32)
        theirs32 = ct_dequantize(x_q=values, scale=m.weight_scale.float(), args=m.quantization_scheme.weights,
                                 global_scale=m.weight_global_scale, dtype=torch.float32)
        torch.testing.assert_close(ours, theirs32, rtol=2.5e-7, atol=0)
        # and both are a faithful NVFP4 rounding of the dense weight
        w = dense.get_submodule(name).weight.float()
        assert (ours - w).abs().max() <= w.abs().max() / 6 * 1.1  # half a code step + block-scale rounding
    ids = random_batches(VOCAB, count=1, batch=2, seq_len=16, seed=seed)[0]
    ref, out = logits(dense, ids).float(), logits(loaded, ids).float()
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.9


def test_checkpoint_saved_here_decompresses_in_compressed_tensors(quantized, tmp_path):
    ct_q = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

    model, _ = quantized
    out = save_nvfp4(model, tmp_path / "ours")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = ct_q.QuantizationConfig.model_validate(qc)  # compressed-tensors accepts our config
    scheme = config.config_groups["group_0"]
    tensors = load_file(str(out / "model.safetensors"))
    for name, layer in nvfp4_layers(model).items():
        sd = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        theirs = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
        ours = layer.dequantized_weight(torch.float32)
        torch.testing.assert_close(ours.to(theirs.dtype).float(), theirs.float(), rtol=2**-7, atol=0)
        # compressed-tensors reads the same activation multiplier
        torch.testing.assert_close(tensors[f"{name}.input_global_scale"], layer.input_global_scale)
    # transformers + compressed-tensors load it too (dequantizing to bf16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    name = "model.layers.0.mlp.down_proj"
    torch.testing.assert_close(hf.get_submodule(name).weight.float(),
                               model.get_submodule(name).dequantized_weight().to(torch.bfloat16).float(),
                               rtol=2**-7, atol=0)


# ---------------------------------------------------------------------------------------
# quantize -> save -> load -> compile


def test_llama_quantize_save_load_compile(quantized, tmp_path):
    model, ids = quantized
    loaded = load_nvfp4(save_nvfp4(model, tmp_path / "ckpt"), device="cpu")
    from fp4_compile.compile import fp4_backend as backend

    torch._dynamo.reset()
    with torch.no_grad():
        a = torch.compile(model, backend=backend)(input_ids=ids, use_cache=False).logits
        b = torch.compile(loaded, backend=backend)(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)
    eager = logits(model, ids).float()
    assert torch.nn.functional.cosine_similarity(a.float().flatten(), eager.flatten(), dim=0) > 0.99


# ---------------------------------------------------------------------------------------
# faults: named by tensor and file, before any tensor data is read


@pytest.fixture
def saved(quantized, tmp_path):
    model, _ = quantized
    return save_nvfp4(model, tmp_path / "ckpt")


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail loudly if a tensor's data is read: errors must come from the headers."""
    from fp4_compile import checkpoint

    def boom(self, key):
        raise AssertionError(f"tensor data read ({key}) before validation finished")

    monkeypatch.setattr(checkpoint.load._Reader, "get", boom)


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


KEY = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.pop(f"{KEY}.weight_scale"), "is missing"),
        (lambda t: t.__setitem__(f"{KEY}.weight_packed", t[f"{KEY}.weight_packed"][:, :-1].contiguous()), "has shape"),
        (lambda t: t.__setitem__(f"{KEY}.weight_scale", t[f"{KEY}.weight_scale"].float()), "has dtype F32"),
        (lambda t: t.__setitem__(f"{KEY}.weight_global_scale", t[f"{KEY}.weight_global_scale"].double()), "has dtype F64"),
        (lambda t: t.pop("model.norm.weight"), "is missing"),
    ],
    ids=["missing-scale", "packed-shape", "scale-dtype", "global-dtype", "missing-norm"],
)
def test_bad_tensor_is_named_with_its_file(saved, edit, expected, no_tensor_reads):
    _rewrite(saved / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_nvfp4(saved, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert str(saved) in message
    assert KEY in message or "model.norm.weight" in message


def test_nonpositive_global_scale_is_named(saved):
    _rewrite(saved / "model.safetensors", lambda t: t.__setitem__(f"{KEY}.weight_global_scale", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=rf"{KEY}.weight_global_scale.*model.safetensors.*positive"):
        load_nvfp4(saved, device="cpu")


def test_weight_only_config_loads_with_dynamic_activation_scales(saved, caplog):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None  # NVFP4A16
    (saved / "config.json").write_text(json.dumps(config))
    _rewrite(saved / "model.safetensors",
             lambda t: [t.pop(k) for k in [k for k in t if k.endswith("input_global_scale")]])
    loaded = load_nvfp4(saved, device="cpu")
    assert all(m.input_global_scale is None for m in nvfp4_layers(loaded).values())
    assert "weight-only NVFP4 (W4A16)" in caplog.text


def test_truncated_file(saved, no_tensor_reads):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_nvfp4(saved, device="cpu")


def test_shifted_data_offsets(saved, no_tensor_reads):
    """A header whose byte ranges stay inside the file but overlap (or leave a gap) is refused before any
    tensor is read, as safetensors itself would refuse it later."""
    path = saved / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 1, end - 1]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match=f"'{name}'.*overlap or leave a gap"):
        load_nvfp4(saved, device="cpu")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dtype": torch.int8}, TypeError, "dtype must be float32, bfloat16 or float16"),
    ({"device": "meta"}, ValueError, "CPU or CUDA device"),
    pytest.param({"device": "cuda"}, ValueError, "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")),
])
def test_load_refuses_bad_arguments(saved, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_nvfp4(saved, **kwargs)


def test_missing_shard(quantized, tmp_path, no_tensor_reads):
    model, _ = quantized
    out = save_nvfp4(model, tmp_path / "sharded", max_shard_size="24KB")
    (out / "model-00002-of-" f"{len(list(out.glob('model-*.safetensors'))):05d}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard file .*model-00002.* does not exist"):
        load_nvfp4(out, device="cpu")


@pytest.mark.parametrize(
    "quantization_config, expected",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}}},
         "format 'pack-quantized'"),
        ({"quant_method": "modelopt", "quant_algo": "FP8"}, "quant_algo='FP8'"),
    ],
)
def test_unknown_scheme(saved, quantization_config, expected, no_tensor_reads):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"unsupported quantization scheme in .*config.json: .*{expected}"):
        load_nvfp4(saved, device="cpu")


def test_ignore_list_that_disagrees_with_the_tensors(saved, no_tensor_reads):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*mlp\\.up_proj$"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"'{KEY}.weight_packed' in .*model.safetensors is an NVFP4 parameter "
                                              rf"of module '{KEY}', which .*config.json does not quantize"):
        load_nvfp4(saved, device="cpu")


@pytest.mark.parametrize("make", ["missing", "file", "empty", "no-weights", "dense"])
def test_not_a_model_dir(tmp_path, make):
    path = tmp_path / "x"
    if make == "file":
        path.write_text("hello")
    elif make == "empty":
        path.mkdir()
    elif make == "no-weights":
        path.mkdir()
        tiny_model(0).config.to_json_file(str(path / "config.json"))
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
        (path / "config.json").write_text(json.dumps(config))
    elif make == "dense":
        tiny_model(0).save_pretrained(path)
    with pytest.raises(CheckpointError) as info:
        load_nvfp4(path, device="cpu")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_ct_target_and_ignore_matching():
    scheme = QuantScheme("compressed-tensors", Path("config.json"),
                         groups=[(["re:.*self_attn\\..*"], "static"), (["Linear"], "dynamic")],
                         ignore=["lm_head", "re:.*down_proj$"])
    lin = nn.Linear(16, 16)
    assert scheme.activation_mode("model.layers.0.self_attn.q_proj", lin) == "static"
    assert scheme.activation_mode("model.layers.0.mlp.up_proj", lin) == "dynamic"
    assert scheme.activation_mode("model.layers.0.mlp.down_proj", lin) is None
    assert scheme.activation_mode("lm_head", lin) is None
    assert scheme.activation_mode("model.embed_tokens", nn.Embedding(4, 16)) is None
    mo = QuantScheme("modelopt", Path("hf_quant_config.json"), ignore=["lm_head", "model.layers.*.mlp.gate"])
    assert mo.activation_mode("model.layers.3.mlp.gate", lin) is None
    assert mo.activation_mode("model.layers.3.mlp.gate_proj", lin) == "static"


def test_save_is_atomic(quantized, tmp_path, monkeypatch):
    from fp4_compile import checkpoint

    model, _ = quantized

    def interrupted(tensors, directory, max_shard_size):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.save, "_write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_nvfp4(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_nvfp4(model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        save_nvfp4(model, tmp_path / "out")
    save_nvfp4(model, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------
# fused partitions (q/k/v, gate/up)


def _layer(n: int, k: int, gs_scale: float, input_gs: torch.Tensor | None, seed: int) -> NVFP4Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    gs = fmt.global_scale_from_amax(torch.tensor(0.25)).reshape(1) * gs_scale  # |w| < 0.25: no scale saturates
    packed, scales = fmt.quantize_nvfp4(w, gs)
    bias = torch.randn(n, generator=g) * 0.01
    return NVFP4Linear(packed, scales, gs, input_global_scale=input_gs, bias=bias, backend="emulation")


def test_merge_with_power_of_two_ratios_is_exact(seed):
    input_gs = torch.tensor([448 * 6 / 4.0])
    parts = [_layer(64, 128, s, input_gs, seed + i) for i, s in enumerate((1.0, 0.25, 0.5))]
    merged, report = merge_nvfp4_linears(parts)
    assert report.exact and report.max_rel_error == 0 and report.max_abs_error == 0
    assert not merged.backend_follows_device  # the parts' backend was named
    for part in parts:
        part.set_backend()  # selected: the merge of these follows its device too, unless one is named
    assert merge_nvfp4_linears(parts)[0].backend_follows_device
    assert not merge_nvfp4_linears(parts, backend="emulation")[0].backend_follows_device
    parts[1].set_backend("emulation")  # one part named: the merge keeps that, whatever the order
    assert not merge_nvfp4_linears(parts)[0].backend_follows_device
    assert not merge_nvfp4_linears(parts[::-1])[0].backend_follows_device
    x = torch.randn(5, 128) * 1.5
    expected = torch.cat([p(x) for p in parts], dim=-1)
    assert torch.equal(merged(x), expected)


def test_merge_with_arbitrary_ratios_reports_its_error(seed):
    input_gs = torch.tensor([448 * 6 / 4.0])
    parts = [_layer(64, 128, s, input_gs, seed + i) for i, s in enumerate((1.0, 0.73, 0.41))]
    merged, report = merge_nvfp4_linears(parts)
    assert not report.exact and 0 < report.max_rel_error < 1 / 16
    assert "inexact" in str(report)
    # the reported error bounds the merged weights' deviation from every partition's
    ref_w = torch.cat([p.dequantized_weight() for p in parts])
    new_w = merged.dequantized_weight()
    nz = ref_w != 0
    assert ((new_w[nz] / ref_w[nz] - 1).abs().max().item()) <= report.max_rel_error + 1e-6  # + fp32 rounding
    x = torch.randn(5, 128) * 1.5
    expected = torch.cat([p(x) for p in parts], dim=-1)
    err = (merged(x) - expected).abs().max().item()
    # vLLM's merge (max() of the multipliers, block scales untouched) for comparison
    naive_gs = max(p.weight_global_scale for p in parts)
    packed = torch.cat([p.linear_weight()[0] for p in parts])
    scales = torch.cat([p.linear_weight()[1] for p in parts])
    naive = NVFP4Linear(packed, scales, naive_gs, input_global_scale=input_gs,
                        bias=torch.cat([p.bias for p in parts]), backend="emulation")
    naive_err = (naive(x) - expected).abs().max().item()
    assert err < naive_err / 4


def test_quantize_shares_fused_global_scales_so_merges_are_exact(quantized):
    model, _ = quantized
    attn = model.get_submodule("model.layers.0.self_attn")
    mlp = model.get_submodule("model.layers.0.mlp")
    for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        assert len({float(m.weight_global_scale) for m in group}) == 1
        merged, report = merge_nvfp4_linears(group)
        assert report.exact
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        assert torch.equal(merged(x), torch.cat([m(x) for m in group], dim=-1))


def test_modelopt_config_json_lists_the_excluded_modules_under_ignore(tmp_path, seed):
    model = tiny_model(seed, tie=False)
    quantize_transformers_model(model, calibration_data=calibration(seed + 1), progress=False,
                                ignore=["lm_head", "re:.*down_proj$"])
    out = save_nvfp4(model, tmp_path / "mo", format="modelopt")
    excluded = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert sorted(excluded) == ["lm_head", "model.layers.0.mlp.down_proj"]
    # config.json's flat form, as ModelOpt's export writes it: vLLM reads "ignore" there, not "exclude_modules"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4" and qc["ignore"] == excluded
    loaded = load_nvfp4(out, device="cpu")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, nn.Linear)
    ids = random_batches(VOCAB, count=1, batch=2, seq_len=16, seed=seed)[0]
    torch.testing.assert_close(logits(loaded, ids).float(), logits(model, ids).float(), rtol=0.02, atol=0.02)


def test_matmul_weights_that_are_not_linears_are_named_in_a_warning(caplog, seed):
    """GPT-2's Conv1D and transformers 5's 3-D MoE expert weights stay dense: the user is told which."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, bos_token_id=0, eos_token_id=0, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with caplog.at_level(logging.WARNING, logger="fp4_compile.checkpoint"):
        quantize_transformers_model(gpt2, progress=False)
    assert "4 matmul weights are not nn.Linear" in caplog.text and "transformer.h.0.attn.c_attn" in caplog.text
    if not hasattr(transformers, "Qwen2MoeConfig"):
        pytest.skip("no Qwen2-MoE in this transformers")
    moe = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp4_compile.checkpoint"):
        quantize_transformers_model(moe, progress=False)
    experts = [n for n, p in moe.named_parameters() if p.dim() == 3]
    assert all(name in caplog.text for name in experts[:4]) == bool(experts)
    # the routers stay dense, the shared expert's gate included (vLLM builds it unquantized)
    layer = moe.model.layers[0].mlp
    assert type(layer.gate).__name__ != "NVFP4Linear" and isinstance(layer.shared_expert_gate, nn.Linear)
    assert isinstance(layer.shared_expert.gate_proj, NVFP4Linear)


def test_an_ignore_list_that_splits_a_fused_group_is_warned_about(caplog, seed):
    model = tiny_model(seed)
    with caplog.at_level(logging.WARNING, logger="fp4_compile.checkpoint"):
        quantize_transformers_model(model, ignore=("lm_head", "re:.*k_proj$"), progress=False)
    assert "only some of model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj" in caplog.text
    assert "gate_proj" not in caplog.text  # (gate/up both quantized)
