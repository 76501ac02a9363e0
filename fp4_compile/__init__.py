"""fp4_compile: NVFP4 linear layers that are fast under torch.compile."""

from .backends import Backend, BackendError, convert_to_kernel_format, select_backend
from .checkpoint import (
    CheckpointError,
    MergeReport,
    load_nvfp4,
    merge_nvfp4_linears,
    quantize_transformers_model,
    save_nvfp4,
)
from .compile import fp4_backend, register
from .format import (
    dequantize_nvfp4,
    global_scale_from_amax,
    pad_activation_for_alignment,
    pad_weight_for_alignment,
    quantize_nvfp4,
    slice_output,
    swizzle_blockscale,
    unswizzle_blockscale,
)
from .layer import NVFP4Linear, quantize_model

__version__ = "0.1.0"

# torch.compile(model, backend="fp4") also works from a source tree (no entry point);
# guarded, so importing through the entry point does not register twice.
register()

__all__ = [
    "Backend",
    "BackendError",
    "CheckpointError",
    "MergeReport",
    "NVFP4Linear",
    "convert_to_kernel_format",
    "dequantize_nvfp4",
    "fp4_backend",
    "global_scale_from_amax",
    "load_nvfp4",
    "merge_nvfp4_linears",
    "pad_activation_for_alignment",
    "pad_weight_for_alignment",
    "quantize_model",
    "quantize_nvfp4",
    "quantize_transformers_model",
    "register",
    "save_nvfp4",
    "select_backend",
    "slice_output",
    "swizzle_blockscale",
    "unswizzle_blockscale",
]
