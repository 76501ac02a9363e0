"""``load_nvfp4``: the model built on the meta device, every header checked against it, then tensor by tensor."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import format as fmt
from ..layer import NVFP4Linear, share_equal_activation_scales
from .formats import (FLOAT_ST, HF_QUANT_CONFIG, KV_CACHE_SUFFIXES, MODELOPT, QUANT_PARAM_SUFFIXES, ST_DTYPES,
                      CheckpointError)
from .safetensors_index import TensorInfo, index_checkpoint
from .scheme import QuantScheme, check_model_dir, read_json, read_quant_scheme

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device; buffers (rotary tables) stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _model_class(config: Any) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        mapping = auto._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise CheckpointError(f"no transformers model class for model_type '{getattr(config, 'model_type', '?')}'")


def build_empty_model(model_dir: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers model of ``model_dir/config.json`` with meta parameters."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{model_dir / 'config.json'}: transformers cannot read it: {msg}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = _model_class(config)
    if dtype is not None:
        config.dtype = dtype
    with _parameters_on_meta():
        model = cls(config)
    return model.eval()


@dataclass
class _Plan:
    quantized: dict[str, tuple[nn.Linear, str]]  # name -> (meta linear, activation mode)
    dense: dict[str, str]  # state-dict key -> checkpoint key to read it from (tied keys share)
    tied_groups: list[list[str]]


def _storage_groups(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


class _Validator:
    def __init__(self, tensors: dict[str, TensorInfo], model_dir: Path) -> None:
        self.tensors = tensors
        self.model_dir = model_dir
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        info = self.tensors.get(key)
        return str(info.file) if info else str(self.model_dir)

    def require(self, key: str, dtypes: set[str] | str, shapes: Sequence[tuple[int, ...]], why: str) -> TensorInfo:
        info = self.tensors.get(key)
        if info is None:
            files = sorted({str(i.file.name) for i in self.tensors.values()})
            raise CheckpointError(
                f"tensor '{key}' ({why}) is missing from the checkpoint in {self.model_dir} "
                f"(files: {', '.join(files)})"
            )
        self.used.add(key)
        dtypes = {dtypes} if isinstance(dtypes, str) else dtypes
        if info.dtype not in dtypes:
            raise CheckpointError(
                f"tensor '{key}' in {info.file} has dtype {info.dtype}, expected {' or '.join(sorted(dtypes))} ({why})"
            )
        if tuple(info.shape) not in [tuple(s) for s in shapes]:
            raise CheckpointError(
                f"tensor '{key}' in {info.file} has shape {_fmt_shape(info.shape)}, expected "
                f"{' or '.join(_fmt_shape(s) for s in shapes)} ({why})"
            )
        return info


def _plan_and_validate(model: nn.Module, scheme: QuantScheme, tensors: dict[str, TensorInfo], model_dir: Path) -> _Plan:
    v = _Validator(tensors, model_dir)
    names = scheme.names()
    quantized: dict[str, tuple[nn.Linear, str]] = {}
    for name, module in model.named_modules():
        mode = scheme.activation_mode(name, module)
        if mode is None:
            continue
        n, k = module.out_features, module.in_features
        what = f"{scheme.describe()} linear '{name}' [{n}x{k}]"
        if k % fmt.BLOCK_SIZE or k % 2:
            raise CheckpointError(
                f"{scheme.source}: module '{name}' is quantized per the config but in_features={k} is not a multiple of 16"
            )
        v.require(f"{name}.{names['packed']}", "U8", [(n, k // 2)], f"packed e2m1 weight of {what}")
        v.require(f"{name}.{names['scales']}", "F8_E4M3", [(n, k // fmt.BLOCK_SIZE)], f"block scales of {what}")
        v.require(f"{name}.{names['weight_gs']}", "F32", [(), (1,)], f"weight global scale of {what}")
        input_key = f"{name}.{names['input_gs']}"
        if mode == "static" or (scheme.format == MODELOPT and input_key in tensors):
            if scheme.format == MODELOPT and input_key not in tensors:
                mode = "dynamic"
            else:
                v.require(input_key, "F32", [(), (1,)], f"activation global scale of {what}")
        elif input_key in tensors:
            v.used.add(input_key)  # present but the config says dynamic: not used
        if module.bias is not None:
            v.require(f"{name}.bias", FLOAT_ST, [(n,)], f"bias of {what}")
        quantized[name] = (module, mode)

    # NVFP4 tensors of a module the config leaves unquantized: the config and the tensors disagree.
    for key in sorted(tensors, key=lambda k: (not k.endswith(".weight_packed"), k)):
        module_name, _, suffix = key.rpartition(".")
        if suffix in QUANT_PARAM_SUFFIXES - {"weight_scale"} and module_name not in quantized:
            raise CheckpointError(
                f"tensor '{key}' in {tensors[key].file} is an NVFP4 parameter of module '{module_name}', which "
                f"{scheme.source} does not quantize (check its targets/ignore lists)"
            )
    tied_groups = _storage_groups(model)
    tied_of = {name: group for group in tied_groups for name in group}
    dense: dict[str, str] = {}
    state = model.state_dict(keep_vars=True)
    for key, tensor in state.items():
        module_name = key.rpartition(".")[0]
        if module_name in quantized:
            continue
        source = key
        if key not in tensors and key in tied_of:
            present = [k for k in tied_of[key] if k in tensors and k.rpartition(".")[0] not in quantized]
            if present:
                source = present[0]
        if scheme.format == MODELOPT and tensors.get(source) is not None and tensors[source].dtype == "U8" \
                and source.endswith(".weight") and isinstance(model.get_submodule(module_name), nn.Linear):
            raise CheckpointError(
                f"tensor '{source}' in {tensors[source].file} is an NVFP4-packed weight but module '{module_name}' "
                f"is excluded by {scheme.source} (exclude_modules/ignore)"
            )
        float_dtypes = FLOAT_ST if tensor.is_floating_point() else {_st_name(tensor.dtype)}
        v.require(source, float_dtypes, [tuple(tensor.shape)], f"{type(model.get_submodule(module_name)).__name__} '{module_name}'")
        dense[key] = source

    unexpected = sorted(k for k in set(tensors) - v.used if k.rpartition(".")[2] not in KV_CACHE_SUFFIXES
                        and "rotary_emb" not in k)
    if unexpected:
        logger.warning("ignoring %d checkpoint tensor(s) the model has no place for: %s%s", len(unexpected),
                       ", ".join(unexpected[:5]), " ..." if len(unexpected) > 5 else "")
    return _Plan(quantized, dense, tied_groups)


def _st_name(dtype: torch.dtype) -> str:
    for k, v in ST_DTYPES.items():
        if v == dtype:
            return k
    return str(dtype)


class _Reader:
    """Reads tensors from the checkpoint's files, keeping each file open once."""

    def __init__(self, tensors: dict[str, TensorInfo], device: torch.device) -> None:
        self.tensors = tensors
        self.device = device
        self._open: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[key]
        handle = self._open.get(info.file)
        if handle is None:
            dev = "cpu" if self.device.type == "meta" else str(self.device)
            handle = self._stack.enter_context(safe_open(str(info.file), framework="pt", device=dev))
            self._open[info.file] = handle
        return handle.get_tensor(key)


def _global_scale(value: torch.Tensor, key: str, info: TensorInfo, inverse: bool) -> torch.Tensor:
    value = value.detach().float().reshape(1)
    v = float(value.cpu())
    if not (math.isfinite(v) and v > 0):
        raise CheckpointError(f"tensor '{key}' in {info.file} is {v}; a global scale must be positive and finite")
    if inverse:
        value = torch.reciprocal(value)
        if not math.isfinite(float(value.cpu())):
            raise CheckpointError(f"tensor '{key}' in {info.file} is {v}; its inverse is not finite")
    return value


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False) if not isinstance(value, nn.Parameter) else value
    else:
        module._buffers[attr] = value


def load_nvfp4(
    model_dir: str | os.PathLike,
    *,
    backend: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> nn.Module:
    """Load an NVFP4 checkpoint (compressed-tensors or ModelOpt) as a transformers model.

    Quantized linears become :class:`NVFP4Linear` on ``backend`` (default: the best one
    for ``device``); every other module (embeddings, norms, an ignored ``lm_head``) is
    loaded as stored, cast to ``dtype`` (default: the config's ``dtype``/``torch_dtype``,
    else as stored). ``device`` defaults to CUDA when available, else the CPU.

    Every safetensors header is checked against the model before any tensor is read: a
    missing tensor, a wrong shape or dtype, or an unsupported quantization scheme raises
    :class:`CheckpointError` naming the tensor and the file.
    """
    from ..backends import check_runnable_device, default_device, resolve_backend

    path = check_model_dir(model_dir)
    device = torch.device(device) if device is not None else default_device()
    try:
        check_runnable_device(device)
    except ValueError as e:
        raise ValueError(f"device {device}: {e}") from None
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    config = read_json(path / "config.json")
    scheme = read_quant_scheme(path, config)
    if scheme is None:
        raise CheckpointError(
            f"{path}: no NVFP4 quantization_config in config.json (and no {HF_QUANT_CONFIG}); "
            f"quantize a bf16 model with `fp4c quantize SRC OUT` or quantize_model()"
        )
    tensors = index_checkpoint(path)
    if dtype is None:
        dtype = _config_dtype(config)
    model = build_empty_model(path, dtype)
    plan = _plan_and_validate(model, scheme, tensors, path)
    follows_device = backend is None
    backend = resolve_backend(backend, device)  # once, not per layer
    names = scheme.names()
    inverse = scheme.format == MODELOPT

    # Global scales first (tiny): their values are checked before the big tensors are read.
    scales: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with _Reader(tensors, torch.device("cpu")) as reader:
        for name, (_, mode) in plan.quantized.items():
            wkey, ikey = f"{name}.{names['weight_gs']}", f"{name}.{names['input_gs']}"
            wgs = _global_scale(reader.get(wkey), wkey, tensors[wkey], inverse)
            igs = None
            if mode == "static":
                igs = _global_scale(reader.get(ikey), ikey, tensors[ikey], inverse)
            scales[name] = (wgs, igs)

    weight_only = [n for n, (_, m) in plan.quantized.items() if m == "weight-only"]
    if weight_only:
        logger.warning(
            "%d linear(s) are weight-only NVFP4 (W4A16) in %s; W4A4 backends quantize their activations "
            "with a dynamic global scale", len(weight_only), scheme.source,
        )

    from tqdm.auto import tqdm

    with _Reader(tensors, device) as reader:
        items = list(plan.quantized.items())
        for name, (meta_linear, _) in tqdm(items, desc="loading NVFP4 linears", disable=not progress, unit="linear"):
            packed = reader.get(f"{name}.{names['packed']}")
            block_scales = reader.get(f"{name}.{names['scales']}")
            bias = None
            if meta_linear.bias is not None:
                bias = reader.get(f"{name}.bias")
                bias = bias.to(dtype) if dtype is not None else bias
            wgs, igs = scales[name]
            layer = NVFP4Linear(
                packed, block_scales, wgs.to(device),
                input_global_scale=None if igs is None else igs.to(device), bias=bias, backend=backend,
            )
            layer.backend_follows_device = follows_device
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)

        loaded: dict[str, torch.Tensor] = {}
        for key, source in plan.dense.items():
            if source not in loaded:
                value = reader.get(source)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                loaded[source] = nn.Parameter(value, requires_grad=False)
            _set_tensor(model, key, loaded[source])

    # Tied parameters whose source was read share the one tensor; nothing may stay on meta.
    for key, value in itertools.chain(model.named_parameters(remove_duplicate=False),
                                      model.named_buffers(remove_duplicate=False)):
        if value.device.type == "meta":
            raise CheckpointError(f"tensor '{key}' is missing from the checkpoint in {path}")
    model.to(device)
    share_equal_activation_scales(model)
    if dtype is not None:
        model.config.dtype = dtype
    model.fp4_checkpoint = {"path": str(path), "format": scheme.format, "quantized": len(plan.quantized)}
    return model.eval()


def _config_dtype(config: dict) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str):
        value = getattr(torch, name.replace("torch.", ""), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return None
