"""``save_nvfp4``: a model's NVFP4 state dict in either format, sharded, into a directory renamed when complete."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..layer import NVFP4Linear, nvfp4_layers
from .formats import COMPRESSED_TENSORS, CT_FORMAT, FORMATS, HF_QUANT_CONFIG, MODELOPT, SAFE_INDEX, SAFE_WEIGHTS

logger = logging.getLogger(__name__)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: cannot read {size!r} (use e.g. 5GB, 500MB or a byte count)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def _ct_args(mode: str) -> dict | None:
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "static_minmax",
               "observer_kwargs": {}}
    if mode == "weights":
        return weights
    if mode == "weight-only":
        return None
    act = dict(weights)
    act["dynamic"] = "local" if mode == "static" else True
    act["observer"] = "static_minmax" if mode == "static" else None
    return act


def _ct_quantization_config(model: nn.Module, layers: dict[str, NVFP4Linear]) -> dict:
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    modes = {name: ("static" if layer.input_global_scale is not None else "dynamic") for name, layer in layers.items()}
    groups = {}
    if len(set(modes.values())) <= 1:
        mode = next(iter(modes.values()), "static")
        groups["group_0"] = (["Linear"], mode)
    else:
        for i, mode in enumerate(("static", "dynamic")):
            groups[f"group_{i}"] = ([n for n, m in modes.items() if m == mode], mode)
    import importlib.metadata

    try:
        version = importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        version = "0.12.0"
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "version": version,
        "config_groups": {
            g: {
                "targets": targets,
                "weights": _ct_args("weights"),
                "input_activations": _ct_args(mode),
                "output_activations": None,
                "format": CT_FORMAT,
            }
            for g, (targets, mode) in groups.items()
        },
        "ignore": dense_linears,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _modelopt_quantization_config(model: nn.Module) -> dict:
    from .. import __version__

    excluded = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "producer": {"name": "fp4_compile", "version": __version__},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                         "exclude_modules": excluded},
    }


def _modelopt_config_json(hf_quant: dict) -> dict:
    """config.json's quantization_config for ``hf_quant_config.json``'s content, in the form ModelOpt's export
    writes it (modelopt/torch/export/convert_hf_config.py): the excluded modules under ``ignore``, the key
    vLLM's ModelOpt loader reads in this form (it reads ``exclude_modules`` only from hf_quant_config.json's)."""
    quantization = hf_quant["quantization"]
    group_size = quantization["group_size"]
    nvfp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size}
    return {
        "quant_method": "modelopt",
        "quant_algo": quantization["quant_algo"],
        "group_size": group_size,
        "config_groups": {"group_0": {"input_activations": nvfp4, "weights": dict(nvfp4), "targets": ["Linear"]}},
        "ignore": quantization["exclude_modules"],
        "producer": hf_quant["producer"],
    }


def _dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the NVFP4 layers' entries, whose weights it would re-lay out (a copy of
    every one at once)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, NVFP4Linear):
            module._save_to_state_dict(state, f"{name}." if name else "", False)
    return state


def nvfp4_state_dict(model: nn.Module, format: str = COMPRESSED_TENSORS) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``model`` in ``format`` (CPU, contiguous, tied copies dropped)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    layers = nvfp4_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        packed, scales = layer.linear_weight()
        wgs = layer.weight_global_scale.detach().float().reshape(1).clone()
        igs = None if layer.input_global_scale is None else layer.input_global_scale.detach().float().reshape(1).clone()
        if format == COMPRESSED_TENSORS:
            out[f"{name}.weight_packed"] = packed
            out[f"{name}.weight_scale"] = scales
            out[f"{name}.weight_global_scale"] = wgs
            if igs is not None:
                out[f"{name}.input_global_scale"] = igs
        else:
            if igs is None:
                raise ValueError(
                    f"ModelOpt NVFP4 needs static activation scales but '{name}' is dynamic: quantize with "
                    f"calibration data, or save in compressed-tensors format"
                )
            out[f"{name}.weight"] = packed
            out[f"{name}.weight_scale"] = scales
            out[f"{name}.weight_scale_2"] = torch.reciprocal(wgs).reshape(())
            out[f"{name}.input_scale"] = torch.reciprocal(igs).reshape(())
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if not tied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    seen: dict[tuple, str] = {}
    for key, value in _dense_state_dict(model).items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if ident in seen and value.numel() > 0:
            if key in tied:
                continue  # re-tied on load, as transformers does
            value = value.clone()
        seen.setdefault(ident, key)
        out[key] = value.detach()
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``, renamed to it when the block completes.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``out_dir`` is untouched. An existing ``out_dir`` is an error unless ``overwrite``.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_size:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = tensors[key]
        sizes[-1] += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SAFE_WEIGHTS), metadata=metadata)
        return [SAFE_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def save_nvfp4(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    format: str = COMPRESSED_TENSORS,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Save a model with :class:`NVFP4Linear` layers as an NVFP4 checkpoint.

    ``format="compressed-tensors"`` (default) writes ``nvfp4-pack-quantized``, which vLLM,
    llm-compressor and transformers read; ``format="modelopt"`` writes ModelOpt's
    NVFP4 layout (``weight``, ``weight_scale_2`` and ``input_scale`` inverses,
    ``hf_quant_config.json``). Checkpoints above ``max_shard_size`` are sharded with a
    ``model.safetensors.index.json``. ``extra_files`` (tokenizer files, ...) are copied
    in. The directory appears only when complete (written next to it, then renamed).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    layers = nvfp4_layers(model)
    if not layers:
        raise ValueError("the model has no NVFP4Linear layers: quantize it first (quantize_model)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ValueError("save_nvfp4 needs a transformers model (with .config) to write config.json")
    tensors = nvfp4_state_dict(model, format)
    dynamic = [n for n, m in layers.items() if m.input_global_scale is None]
    if dynamic:
        logger.warning(
            "%d of %d NVFP4 linears have dynamic activation scales; vLLM's W4A4 path needs static ones "
            "(quantize with calibration data)", len(dynamic), len(layers),
        )
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    dtype = _model_dtype(model)
    if dtype is not None:
        config.dtype = dtype
    config_dict = json.loads(config.to_json_string(use_diff=False))
    if format == COMPRESSED_TENSORS:
        config_dict["quantization_config"] = _ct_quantization_config(model, layers)
    else:
        hf_quant = _modelopt_quantization_config(model)
        config_dict["quantization_config"] = _modelopt_config_json(hf_quant)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _write_shards(tensors, tmp, parse_size(max_shard_size))
        for extra in extra_files:
            extra = Path(extra)
            if extra.is_file():
                shutil.copy2(extra, tmp / extra.name)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_file"):
            with contextlib.suppress(Exception):
                generation.to_json_file(str(tmp / "generation_config.json"))
        if format == MODELOPT:
            (tmp / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=2) + "\n")
        # config.json last: a directory with config.json holds everything else already
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return Path(out_dir).expanduser().absolute()
