"""NVFP4 checkpoints: load and save compressed-tensors and ModelOpt safetensors.

Formats (shared NVFP4.md, "Checkpoint conventions"):

=================  ===========================================  ==========================================
                   compressed-tensors ``nvfp4-pack-quantized``  ModelOpt ``quant_algo: NVFP4``
=================  ===========================================  ==========================================
packed weight      ``weight_packed`` uint8 ``[N, K/2]``          ``weight`` uint8 ``[N, K/2]``
block scales       ``weight_scale`` fp8 ``[N, K/16]`` (linear)   ``weight_scale`` fp8 ``[N, K/16]``
weight global      ``weight_global_scale`` = 448*6/amax          ``weight_scale_2`` = amax/(448*6)
activation global  ``input_global_scale`` = 448*6/amax           ``input_scale`` = amax/(448*6)
=================  ===========================================  ==========================================

:class:`~fp4_compile.layer.NVFP4Linear` keeps multipliers (the compressed-tensors
direction), so ModelOpt scales are inverted on load and on save.

:func:`load_nvfp4` builds the transformers model from ``config.json`` with its parameters
on the meta device (no dense weights are materialised), checks every safetensors header
against the model *before* reading any tensor data, then loads tensor by tensor.
:func:`save_nvfp4` writes compressed-tensors (what vLLM and llm-compressor read) or
ModelOpt, into a temporary directory next to the target that is renamed at the end, so
an interrupted save never leaves a directory that looks complete.

Modules: ``formats`` (the names they share and ``CheckpointError``), ``safetensors_index`` (headers and shards), ``scheme`` (a
checkpoint's quantization config), ``load``, ``save``, ``quantize`` (a Hugging Face model's linears to NVFP4) and
``merge`` (sibling linears joined into one).
"""

from .formats import COMPRESSED_TENSORS, DEFAULT_IGNORE, FORMATS, MODELOPT, CheckpointError
from .load import build_empty_model, load_nvfp4
from .merge import MergeReport, merge_nvfp4_linears
from .quantize import nvfp4_linear_shapes, quantize_transformers_model
from .safetensors_index import TensorInfo, index_checkpoint, read_safetensors_header
from .save import atomic_output_dir, nvfp4_state_dict, save_nvfp4
from .scheme import QuantScheme, check_model_dir, is_nvfp4_checkpoint, read_quant_scheme

__all__ = [
    "COMPRESSED_TENSORS", "DEFAULT_IGNORE", "FORMATS", "MODELOPT", "CheckpointError", "MergeReport", "QuantScheme",
    "TensorInfo", "atomic_output_dir", "build_empty_model", "check_model_dir", "index_checkpoint",
    "is_nvfp4_checkpoint", "load_nvfp4", "merge_nvfp4_linears", "nvfp4_linear_shapes", "nvfp4_state_dict",
    "quantize_transformers_model", "read_quant_scheme", "read_safetensors_header", "save_nvfp4",
]
