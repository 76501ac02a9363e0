"""``quantize_transformers_model``: a Hugging Face model's linears to NVFP4, as vLLM would read them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .. import format as fmt
from ..layer import quantize_model
from .formats import DEFAULT_IGNORE, FUSED_GROUPS
from .load import build_empty_model
from .scheme import check_model_dir, matches_ct, read_quant_scheme

logger = logging.getLogger(__name__)


def _fused_siblings(names: Iterable[str]) -> list[list[str]]:
    names = set(names)
    groups = []
    for name in sorted(names):
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf == group[0]:
                members = [f"{parent}.{g}" if parent else g for g in group]
                present = [m for m in members if m in names]
                if len(present) > 1:
                    groups.append(present)
    return groups


def _quantizable_linears(model: nn.Module, ignore: Sequence[str]) -> dict[str, nn.Linear]:
    """The linears :func:`quantize_transformers_model` makes NVFP4: not ignored, K a multiple of 16."""
    ignore = list(ignore)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not matches_ct(n, m, ignore) and m.in_features % fmt.BLOCK_SIZE == 0}


def _dense_matmul_weights(model: nn.Module) -> list[str]:
    """Weights of matmuls that are not ``nn.Linear`` and so stay dense: GPT-2's ``Conv1D`` modules, MoE experts
    stored as 3-D parameters (transformers 5)."""
    dense = []
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D":
            dense.append(name)
        elif not isinstance(module, nn.modules.conv._ConvNd):  # (a convolution's weight is 3-D too)
            prefix = f"{name}." if name else ""
            dense += [prefix + p for p, param in module.named_parameters(recurse=False) if param.dim() == 3]
    return dense


def nvfp4_linear_shapes(model_dir: str | os.PathLike, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[tuple[int, int]]:
    """The distinct (out_features, in_features) of the linears that loading ``model_dir`` (an NVFP4
    checkpoint: those its quantization config names) or quantizing it (a bf16 model: those
    :func:`quantize_transformers_model` takes, with ``ignore``) makes NVFP4, from its config alone (no
    weights are read; ``fp4c tune --model``)."""
    path = check_model_dir(model_dir)
    model = build_empty_model(path)
    scheme = read_quant_scheme(path)
    if scheme is None:
        linears = list(_quantizable_linears(model, ignore).values())
    else:
        linears = [m for name, m in model.named_modules() if scheme.activation_mode(name, m) is not None]
    return sorted({(m.out_features, m.in_features) for m in linears})


def quantize_transformers_model(
    model: nn.Module,
    *,
    calibration_data: Iterable[Any] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    share_fused_global_scales: bool = True,
    backend: str | None = None,
    progress: bool = True,
) -> nn.Module:
    """:func:`~fp4_compile.layer.quantize_model` for a transformers model, in place.

    ``ignore`` uses compressed-tensors matching (module name, ``re:`` regex or class
    name); by default ``lm_head`` and MoE routers stay in high precision. With
    ``calibration_data`` activation global scales are static (calibrated amax), else
    dynamic. ``share_fused_global_scales`` gives q/k/v and gate/up one weight global
    scale (that of the largest amax), so that engines which fuse them into one GEMM
    (vLLM) lose nothing: :func:`merge_nvfp4_linears` of such layers is exact.
    """
    candidates = _quantizable_linears(model, ignore)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for group in _fused_siblings(linears):
        if 0 < sum(name in candidates for name in group) < len(group):  # (an ignore list that splits a group)
            logger.warning("only some of %s become NVFP4: vLLM fuses them into one layer and needs all or none "
                           "quantized", ", ".join(group))
    if dense := _dense_matmul_weights(model):
        logger.warning("%d matmul weights are not nn.Linear and stay dense (not NVFP4): %s", len(dense),
                       ", ".join(dense[:4]) + (", ..." if len(dense) > 4 else ""))
    groups = _fused_siblings(candidates) if share_fused_global_scales else []
    shared_scales = {}
    for group in groups:
        amax = torch.stack([candidates[n].weight.detach().abs().amax().float() for n in group]).amax()
        gs = fmt.global_scale_from_amax(amax).reshape(1)
        shared_scales.update({n: gs for n in group})
    if calibration_data is not None and progress:
        from tqdm.auto import tqdm

        calibration_data = tqdm(calibration_data, desc="calibrating activation scales", unit="batch")
    return quantize_model(
        model, backend=backend, calibration_data=calibration_data, progress=progress,
        filter_fn=lambda name, linear: name in candidates, weight_global_scales=shared_scales,
    )
