"""The fp4 passes on Hugging Face model families other than Llama (tiny configs, random weights).

Each quantized model's forward is traced with make_fx (fake) and rewritten by FP4PostGradPass, without
Inductor (seconds; a full compile of one of these models takes a minute on 2 CPU cores): every NVFP4 layer
must fuse, the gated MLPs and the linears of one activation must become one node each, and the rewritten
graph must equal the eager model bit for bit, on a padded batch at decode sizes (where the linears group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from compile_helpers import trace_module
from torch import nn

from fp4_compile import NVFP4Linear, quantize_transformers_model
from fp4_compile.passes import FP4PostGradPass

transformers = pytest.importorskip("transformers")

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)


@dataclass(frozen=True)
class Family:
    """A causal LM built from a tiny config, and what the passes make of its one decoder layer."""

    config: str  # the transformers config class
    model: str  # its causal-LM class
    gated: int  # fp4.linear_silu_mul nodes: SiLU-gated MLPs with separate gate/up linears
    groups: int  # fp4.linear_group nodes: linears of one activation (q/k/v, gate/up) left after that
    kwargs: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


FAMILIES = {
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", 1, 1, dict(SMALL, num_key_value_heads=2)),  # q/k/v biases
    "mistral": Family("MistralConfig", "MistralForCausalLM", 1, 1, dict(SMALL, num_key_value_heads=2)),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", 0, 0, dict(SMALL, pad_token_id=0)),  # fused qkv, gate_up
    "gemma": Family("GemmaConfig", "GemmaForCausalLM", 0, 2, dict(SMALL, num_key_value_heads=1, head_dim=16)),  # GELU
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", 0, 2, dict(SMALL, num_key_value_heads=2, head_dim=16)),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", 0, 0, SMALL),  # fused qkv, two norms of one x
    # parallel attention: query_key_value and dense_h_to_4h read one norm's output
    "falcon": Family("FalconConfig", "FalconForCausalLM", 0, 1, dict(SMALL, new_decoder_architecture=False)),
    "opt": Family("OPTConfig", "OPTForCausalLM", 0, 1, dict(SMALL, ffn_dim=128, word_embed_proj_dim=64)),  # ReLU
    # Experts are 3-D parameters (not nn.Linear) in transformers 5: attention and the shared expert quantize.
    # bfloat16: their grouped_mm has no float32 fake kernel (and the eager experts' routing is data-dependent).
    "qwen2_moe": Family("Qwen2MoeConfig", "Qwen2MoeForCausalLM", 1, 1, dict(
        SMALL, num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2), torch.bfloat16),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM", 0, 1, dict(
        SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), torch.bfloat16),
}


def build(family: Family) -> nn.Module:
    config_class, model_class = getattr(transformers, family.config, None), getattr(transformers, family.model, None)
    if config_class is None or model_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family.model}")
    return model_class(config_class(**family.kwargs)).eval().to(family.dtype)


def padded_batch(batch: int = 2, seq: int = 6) -> dict:
    """Random token ids, the second row left-padded: batch * seq <= 16 rows, decode sizes for the grouping."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, : seq // 3] = 0
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq)), "attention_mask": mask}


def trace_and_rewrite(model: nn.Module, *args, **kwargs):
    """``trace_module`` of ``model(*args, **kwargs)``, rewritten by the fp4 pass: (graph module, its parameters,
    the pass's GraphResult)."""
    gm, params = trace_module(model, *args, **kwargs)
    fp4_pass = FP4PostGradPass()
    fp4_pass(gm.graph)
    gm.recompile()
    return gm, params, fp4_pass.last


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_fuses_every_layer_and_equals_eager(seed, name, static):
    family = FAMILIES[name]
    model = build(family)
    calibration = [padded_batch(), padded_batch()] if static else None
    quantize_transformers_model(model, calibration_data=calibration, progress=False)
    layers = sum(isinstance(m, NVFP4Linear) for m in model.modules())
    inputs = padded_batch()
    gm, params, result = trace_and_rewrite(model, **inputs, use_cache=False)
    assert not result.unfused and len(result.fused) == layers > 0
    # (dynamic scales: each layer's scale and alpha are computed between the members, after q's output is used)
    assert (result.gated, result.groups) == (family.gated, family.groups)
    with torch.no_grad():
        assert torch.equal(gm(params, (), {**inputs, "use_cache": False}).logits, model(**inputs, use_cache=False).logits)


# The RMSNorms of one decoder layer that feed NVFP4 linears (Gemma's multiply by 1 + weight, in float32).
NORMS = {"qwen2": 2, "mistral": 2, "phi3": 2, "gemma": 2, "gemma2": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(NORMS))
def test_family_norms_fuse_with_the_hopper_quantization(seed, name, dtype):
    """With triton-w4a4 layers (their layout prepared on the CPU; traced with fake tensors, so no kernel runs)
    and static scales, each RMSNorm before NVFP4 linears fuses with their quantization, Llama's form and
    Gemma's alike."""
    from fp4_compile.backends import convert_to_kernel_format

    model = build(FAMILIES[name]).to(dtype)
    quantize_transformers_model(model, calibration_data=[padded_batch(), padded_batch()], progress=False)
    for layer in model.modules():
        if isinstance(layer, NVFP4Linear):
            convert_to_kernel_format("triton-w4a4", layer)
    _, _, result = trace_and_rewrite(model, **padded_batch(), use_cache=False)
    assert not result.unfused and result.norms == NORMS[name]
