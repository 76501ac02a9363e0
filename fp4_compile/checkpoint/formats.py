"""What loading, saving and quantizing share: the two formats and their tensor names, safetensors dtypes, the
modules left dense by default, the sibling linears engines fuse, and ``CheckpointError``."""

from __future__ import annotations

import torch


CT_FORMAT = "nvfp4-pack-quantized"
COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
FORMATS = (COMPRESSED_TENSORS, MODELOPT)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
HF_QUANT_CONFIG = "hf_quant_config.json"

# safetensors dtype strings
ST_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
FLOAT_ST = {"BF16", "F16", "F32", "F64"}
DTYPE_SIZES = {"U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1, "BF16": 2, "F16": 2, "I16": 2,
                "F32": 4, "I32": 4, "F64": 8, "I64": 8}

# Tensor names of a quantized linear, per format.
CT_NAMES = dict(packed="weight_packed", scales="weight_scale", weight_gs="weight_global_scale", input_gs="input_global_scale")
MO_NAMES = dict(packed="weight", scales="weight_scale", weight_gs="weight_scale_2", input_gs="input_scale")
QUANT_PARAM_SUFFIXES = {"weight_packed", "weight_global_scale", "input_global_scale", "weight_scale_2", "input_scale",
                         "weight_scale", "weight_zero_point", "input_zero_point"}
KV_CACHE_SUFFIXES = {"k_scale", "v_scale", "q_scale", "prob_scale"}

# Default modules left in high precision when quantizing a transformers model: the output
# head and MoE routers (as llm-compressor's NVFP4 recipes do).
DEFAULT_IGNORE = ("lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$")  # routers stay dense, as in vLLM
# Sibling linears that serving engines fuse into one GEMM (q/k/v, gate/up, Mixtral w1/w3).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be loaded; the message names the tensor and file."""
