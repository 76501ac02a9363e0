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
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import format as fmt
from .layer import NVFP4Linear, quantize_model, share_equal_activation_scales

logger = logging.getLogger(__name__)

CT_FORMAT = "nvfp4-pack-quantized"
COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
FORMATS = (COMPRESSED_TENSORS, MODELOPT)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
HF_QUANT_CONFIG = "hf_quant_config.json"

# safetensors dtype strings
_ST_DTYPES = {
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
_FLOAT_ST = {"BF16", "F16", "F32", "F64"}
_DTYPE_SIZES = {"U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1, "BF16": 2, "F16": 2, "I16": 2,
                "F32": 4, "I32": 4, "F64": 8, "I64": 8}

# Tensor names of a quantized linear, per format.
_CT_NAMES = dict(packed="weight_packed", scales="weight_scale", weight_gs="weight_global_scale", input_gs="input_global_scale")
_MO_NAMES = dict(packed="weight", scales="weight_scale", weight_gs="weight_scale_2", input_gs="input_scale")
_QUANT_PARAM_SUFFIXES = {"weight_packed", "weight_global_scale", "input_global_scale", "weight_scale_2", "input_scale",
                         "weight_scale", "weight_zero_point", "input_zero_point"}
_KV_CACHE_SUFFIXES = {"k_scale", "v_scale", "q_scale", "prob_scale"}

# Default modules left in high precision when quantizing a transformers model: the output
# head and MoE routers (as llm-compressor's NVFP4 recipes do).
DEFAULT_IGNORE = ("lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$")  # routers stay dense, as in vLLM
# Sibling linears that serving engines fuse into one GEMM (q/k/v, gate/up, Mixtral w1/w3).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be loaded; the message names the tensor and file."""


# ---------------------------------------------------------------------------------------
# safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string, e.g. "U8", "F8_E4M3", "BF16"
    shape: tuple[int, ...]
    file: Path


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, from its header only.

    Also checks that every tensor's byte range lies inside the file (a truncated file
    fails here, before anything is loaded), and that the ranges tile the data as safetensors
    requires (one after another, no gap, no overlap).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 1 << 28):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    out = {}
    ranges: list[tuple[int, int, str]] = []
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"tensor '{name}' in {path}: malformed safetensors header entry") from None
        if end > data_size or begin > end:
            raise CheckpointError(
                f"tensor '{name}' in {path}: data ends at byte {end} but the file holds {data_size} "
                f"bytes of tensor data (truncated file?)"
            )
        expected = math.prod(shape) * _DTYPE_SIZES.get(dtype, 0)
        if dtype in _DTYPE_SIZES and end - begin != expected:
            raise CheckpointError(
                f"tensor '{name}' in {path}: {end - begin} bytes for a {dtype} tensor of shape {list(shape)} "
                f"({expected} expected)"
            )
        out[name] = TensorInfo(dtype, shape, path)
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise CheckpointError(f"tensor '{name}' in {path}: its data starts at byte {begin} where the tensors "
                                  f"before it end at byte {position} (a corrupt header: tensors overlap or leave a gap)")
        position = end
    if position != data_size:
        raise CheckpointError(f"{path}: its tensors hold {position} bytes but the file has {data_size} bytes of "
                              f"tensor data (a corrupt header)")
    return out


def index_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model directory (single file or sharded with an index), from headers."""
    model_dir = Path(model_dir)
    index_path = model_dir / SAFE_INDEX
    single = model_dir / SAFE_WEIGHTS
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no 'weight_map')") from None
        tensors: dict[str, TensorInfo] = {}
        headers = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = model_dir / shard
            if not shard_path.is_file():
                names = sorted(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(
                    f"shard file {shard_path} listed in {index_path} (for '{names[0]}' and {len(names) - 1} more) "
                    f"does not exist"
                )
            headers[shard] = read_safetensors_header(shard_path)
            tensors.update(headers[shard])
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"tensor '{name}' is listed in {index_path} for {model_dir / shard} but that file does not hold it")
        return tensors
    if single.is_file():
        return read_safetensors_header(single)
    others = sorted(model_dir.glob("*.safetensors"))
    if len(others) == 1:
        return read_safetensors_header(others[0])
    if others:
        raise CheckpointError(f"{model_dir}: {len(others)} safetensors files but no {SAFE_INDEX}")
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(f"{model_dir}: only pickle weights (*.bin); NVFP4 checkpoints are read from safetensors")
    raise CheckpointError(f"{model_dir}: no {SAFE_WEIGHTS} or {SAFE_INDEX}")


# ---------------------------------------------------------------------------------------
# quantization configs


def _matches_ct(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    """compressed-tensors matching: ``re:`` regex (re.match), exact name, or class name."""
    classes = {c.__name__ for c in type(module).__mro__}
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or p in classes:
            return True
    return False


def _matches_modelopt(name: str, patterns: Iterable[str]) -> bool:
    """ModelOpt exclude_modules: exact name, a prefix of it, or an fnmatch wildcard."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p):
            return True
    return False


@dataclass
class QuantScheme:
    """What the checkpoint's quantization config says, in one format-independent record."""

    format: str  # COMPRESSED_TENSORS or MODELOPT
    source: Path  # the file the config was read from
    groups: list[tuple[list[str], str]] = field(default_factory=list)  # CT: (targets, activation mode)
    ignore: list[str] = field(default_factory=list)
    activations: str = "static"  # ModelOpt: "static"
    raw: dict[str, Any] = field(default_factory=dict)

    def activation_mode(self, name: str, module: nn.Module) -> str | None:
        """None if ``name`` is not quantized, else "static", "dynamic" or "weight-only"."""
        if not isinstance(module, nn.Linear):
            return None
        if self.format == MODELOPT:
            return None if _matches_modelopt(name, self.ignore) else self.activations
        if _matches_ct(name, module, self.ignore):
            return None
        for targets, mode in self.groups:
            if _matches_ct(name, module, targets):
                return mode
        return None

    def names(self) -> dict[str, str]:
        return _CT_NAMES if self.format == COMPRESSED_TENSORS else _MO_NAMES

    def describe(self) -> str:
        if self.format == COMPRESSED_TENSORS:
            return f"compressed-tensors {CT_FORMAT}"
        return "ModelOpt NVFP4"


def _unsupported(source: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"unsupported quantization scheme in {source}: {what} "
        f"(supported: compressed-tensors '{CT_FORMAT}', ModelOpt quant_algo 'NVFP4')"
    )


def _ct_activation_mode(args: dict | None, source: Path, group: str) -> str:
    if args is None:
        return "weight-only"
    bad = _nvfp4_args_problem(args)
    if bad:
        raise _unsupported(source, f"config group '{group}' input_activations {bad}")
    dynamic = args.get("dynamic", False)
    if dynamic is False or (isinstance(dynamic, str) and dynamic.lower() == "local"):
        return "static"  # "local": block scales per batch, global scale calibrated (stored)
    if dynamic is True:
        return "dynamic"
    raise _unsupported(source, f"config group '{group}' input_activations dynamic={dynamic!r}")


def _nvfp4_args_problem(args: dict) -> str | None:
    want = {"num_bits": 4, "type": "float", "group_size": 16, "symmetric": True}
    for k, v in want.items():
        if args.get(k, v if k == "symmetric" else None) != v:
            return f"has {k}={args.get(k)!r} (NVFP4 needs {v!r})"
    strategy = args.get("strategy")
    if strategy not in (None, "tensor_group"):
        return f"has strategy={strategy!r} (NVFP4 needs 'tensor_group')"
    return None


def _parse_ct(qc: dict, source: Path) -> QuantScheme:
    global_format = qc.get("format")
    status = qc.get("quantization_status", "compressed")
    if status not in ("compressed", None):
        raise _unsupported(source, f"quantization_status={status!r} (dense weights; only 'compressed' is read)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _unsupported(source, "compressed-tensors config without config_groups")
    parsed = []
    for gname, group in groups.items():
        gformat = group.get("format") or global_format
        if gformat != CT_FORMAT:
            raise _unsupported(source, f"compressed-tensors format {gformat!r} in config group '{gname}'")
        weights = group.get("weights")
        if not weights:
            raise _unsupported(source, f"config group '{gname}' has no weights scheme")
        bad = _nvfp4_args_problem(weights)
        if bad:
            raise _unsupported(source, f"config group '{gname}' weights {bad}")
        if weights.get("dynamic") not in (False, None):
            raise _unsupported(source, f"config group '{gname}' has dynamic weights")
        if group.get("output_activations"):
            raise _unsupported(source, f"config group '{gname}' quantizes output activations")
        targets = group.get("targets") or []
        if isinstance(targets, str):
            targets = [targets]
        parsed.append((list(targets), _ct_activation_mode(group.get("input_activations"), source, gname)))
    if qc.get("kv_cache_scheme"):
        logger.warning("%s: kv_cache_scheme is ignored (the KV cache stays in the model's dtype)", source)
    ignore = qc.get("ignore") or []
    return QuantScheme(COMPRESSED_TENSORS, source, groups=parsed, ignore=list(ignore), raw=qc)


def _parse_modelopt(qc: dict, source: Path) -> QuantScheme:
    inner = qc.get("quantization", qc)
    algo = inner.get("quant_algo")
    if algo != "NVFP4":
        raise _unsupported(source, f"ModelOpt quant_algo={algo!r}")
    group_size = inner.get("group_size", 16)
    if group_size != 16:
        raise _unsupported(source, f"ModelOpt NVFP4 with group_size={group_size}")
    if inner.get("kv_cache_quant_algo"):
        logger.warning("%s: kv_cache_quant_algo=%s is ignored", source, inner.get("kv_cache_quant_algo"))
    ignore = list(inner.get("exclude_modules") or []) + list(inner.get("ignore") or [])
    return QuantScheme(MODELOPT, source, ignore=ignore, raw=qc)


def read_quant_scheme(model_dir: Path, config: dict | None = None) -> QuantScheme | None:
    """The NVFP4 scheme of a model directory, None for an unquantized model.

    Raises :class:`CheckpointError` for a quantization scheme this package does not read.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if config is None:
        config = _read_json(config_path)
    qc = config.get("quantization_config")
    hf_quant = model_dir / HF_QUANT_CONFIG
    if qc is None and hf_quant.is_file():
        data = _read_json(hf_quant)
        if "quantization" not in data:
            raise _unsupported(hf_quant, "no 'quantization' section")
        return _parse_modelopt(data, hf_quant)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{config_path}: quantization_config is not a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method in ("compressed-tensors", "compressed_tensors"):
        return _parse_ct(qc, config_path)
    if method == "modelopt" or (not method and "quant_algo" in qc):
        return _parse_modelopt(qc, config_path)
    raise _unsupported(config_path, f"quant_method={qc.get('quant_method')!r}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """A directory with a config.json, or :class:`CheckpointError` saying why not."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a model directory holds config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    return path


def is_nvfp4_checkpoint(model_dir: str | os.PathLike) -> bool:
    """True when ``model_dir`` holds an NVFP4 checkpoint this package reads."""
    path = check_model_dir(model_dir)
    return read_quant_scheme(path) is not None


# ---------------------------------------------------------------------------------------
# building the model without weights


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


# ---------------------------------------------------------------------------------------
# loading


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
            v.require(f"{name}.bias", _FLOAT_ST, [(n,)], f"bias of {what}")
        quantized[name] = (module, mode)

    # NVFP4 tensors of a module the config leaves unquantized: the config and the tensors disagree.
    for key in sorted(tensors, key=lambda k: (not k.endswith(".weight_packed"), k)):
        module_name, _, suffix = key.rpartition(".")
        if suffix in _QUANT_PARAM_SUFFIXES - {"weight_scale"} and module_name not in quantized:
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
        float_dtypes = _FLOAT_ST if tensor.is_floating_point() else {_st_name(tensor.dtype)}
        v.require(source, float_dtypes, [tuple(tensor.shape)], f"{type(model.get_submodule(module_name)).__name__} '{module_name}'")
        dense[key] = source

    unexpected = sorted(k for k in set(tensors) - v.used if k.rpartition(".")[2] not in _KV_CACHE_SUFFIXES
                        and "rotary_emb" not in k)
    if unexpected:
        logger.warning("ignoring %d checkpoint tensor(s) the model has no place for: %s%s", len(unexpected),
                       ", ".join(unexpected[:5]), " ..." if len(unexpected) > 5 else "")
    return _Plan(quantized, dense, tied_groups)


def _st_name(dtype: torch.dtype) -> str:
    for k, v in _ST_DTYPES.items():
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
    from .backends import check_runnable_device, default_device, resolve_backend

    path = check_model_dir(model_dir)
    device = torch.device(device) if device is not None else default_device()
    try:
        check_runnable_device(device)
    except ValueError as e:
        raise ValueError(f"device {device}: {e}") from None
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    config = _read_json(path / "config.json")
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


# ---------------------------------------------------------------------------------------
# saving


def _parse_size(size: int | str) -> int:
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
    from . import __version__

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
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
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
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
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
        _write_shards(tensors, tmp, _parse_size(max_shard_size))
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


# ---------------------------------------------------------------------------------------
# quantizing a transformers model


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
            if isinstance(m, nn.Linear) and not _matches_ct(n, m, ignore) and m.in_features % fmt.BLOCK_SIZE == 0}


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


# ---------------------------------------------------------------------------------------
# fused partitions


@dataclass
class MergeReport:
    """How a merge of NVFP4 linears with different global scales came out."""

    exact: bool  # the merged layer's dequantized weights equal every partition's, bit for bit
    weight_global_scale: float  # the common one (the smallest multiplier: no block scale overflows)
    partition_global_scales: list[float]
    max_rel_error: float  # max |w_merged / w_partition - 1| over all weights (= per-block scale error)
    max_abs_error: float  # max |w_merged - w_partition| over all weights
    input_global_scale_note: str | None = None

    def __str__(self) -> str:
        head = "exact" if self.exact else f"inexact: max relative weight error {self.max_rel_error:.3g}"
        ratios = ", ".join(f"{self.weight_global_scale / g:.6g}" for g in self.partition_global_scales)
        text = f"merged {len(self.partition_global_scales)} NVFP4 partitions ({head}); global-scale ratios {ratios}"
        if self.input_global_scale_note:
            text += f"; {self.input_global_scale_note}"
        return text


def merge_nvfp4_linears(
    layers: Sequence[NVFP4Linear], *, backend: str | None = None
) -> tuple[NVFP4Linear, MergeReport]:
    """Concatenate NVFP4 linears that read the same input (q/k/v, gate/up) along N.

    Partitions may carry different weight global scales. The merged layer uses the
    smallest multiplier ``g`` (the largest amax) and re-rounds each partition's block
    scales to ``sf * g / g_p`` in e4m3, keeping the e2m1 codes: exact when every ratio
    ``g / g_p`` is a power of two (and no scale leaves e4m3's range), otherwise each
    weight moves by the rounding of its block scale: < 1/16 relative for normal e4m3 scales, more
    for scales that fall into e4m3's subnormal range (down to a block flushed to zero), which the
    returned :class:`MergeReport` measures. vLLM instead takes ``max()`` of the global
    scales without touching the block scales (its issue 54974), which scales whole
    partitions wrongly. Quantizing with :func:`quantize_transformers_model` gives the
    partitions one global scale up front, so their merge is exact.
    """
    if len(layers) < 1:
        raise ValueError("merge_nvfp4_linears needs at least one layer")
    if not all(isinstance(l, NVFP4Linear) for l in layers):
        raise TypeError("merge_nvfp4_linears takes NVFP4Linear layers")
    k = layers[0].in_features
    if any(l.in_features != k for l in layers):
        raise ValueError(f"partitions must share in_features, got {[l.in_features for l in layers]}")
    statics = [l.input_global_scale for l in layers]
    note = None
    if all(s is None for s in statics):
        input_gs = None
    elif any(s is None for s in statics):
        raise ValueError("cannot merge layers with static and dynamic activation scales")
    else:
        values = torch.cat([s.detach().float().reshape(1).cpu() for s in statics])
        input_gs = values.min().reshape(1)
        if not torch.all(values == values[0]):
            note = (f"activation global scales differ ({', '.join(f'{float(v):.6g}' for v in values)}); "
                    f"the merged layer quantizes its input once with {float(input_gs):.6g} (the largest amax)")
    parts = [l.linear_weight() for l in layers]
    gss = [l.weight_global_scale.detach().float().reshape(()).cpu() for l in layers]
    common = torch.stack(gss).min()
    new_scales, max_rel, max_abs, exact = [], 0.0, 0.0, True
    for (packed, scales), gs in zip(parts, gss):
        packed, scales = packed.cpu(), scales.cpu()
        ratio = (common / gs).float()
        rounded = torch.clamp(scales.float() * ratio, max=fmt.E4M3_MAX).to(torch.float8_e4m3fn)
        # Codes are kept, so every weight of a block moves by the block scale's rounding:
        # exact iff rounded * g_p == sf * g (products of <= 28 significant bits: exact in float64).
        want = scales.double() * common.double()
        got = rounded.double() * gs.double()
        finite = torch.isfinite(want) & (want != 0)
        if finite.any():
            max_rel = max(max_rel, ((got[finite] - want[finite]).abs() / want[finite]).max().item())
        exact = exact and bool(torch.equal(got[finite], want[finite])) and bool(torch.all(rounded.float()[want == 0] == 0))
        if packed.numel():
            old_w = fmt.dequantize_nvfp4(packed, scales, gs.reshape(1))
            new_w = fmt.dequantize_nvfp4(packed, rounded, common.reshape(1))
            max_abs = max(max_abs, (new_w - old_w).abs().nan_to_num(0.0).max().item())
        new_scales.append(rounded)
    device = parts[0][0].device
    packed = torch.cat([p for p, _ in parts])
    scales = torch.cat(new_scales).to(device)
    biases = [l.bias for l in layers]
    bias = None
    if any(b is not None for b in biases):
        ref = next(b for b in biases if b is not None)
        bias = torch.cat([b.detach() if b is not None else torch.zeros(l.out_features, dtype=ref.dtype, device=ref.device)
                          for b, l in zip(biases, layers)])
    merged = NVFP4Linear(
        packed, scales, common.reshape(1).to(device),
        input_global_scale=None if input_gs is None else input_gs.to(device), bias=bias,
        backend=backend if backend is not None else layers[0].backend,
    )
    merged.backend_follows_device = backend is None and all(layer.backend_follows_device for layer in layers)
    report = MergeReport(exact, float(common), [float(g) for g in gss], max_rel, max_abs, note)
    if not exact:
        logger.warning("%s", report)
    return merged, report
