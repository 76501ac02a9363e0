"""A checkpoint's quantization config (compressed-tensors or ModelOpt) read into one ``QuantScheme``."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .formats import COMPRESSED_TENSORS, CT_FORMAT, CT_NAMES, HF_QUANT_CONFIG, MO_NAMES, MODELOPT, CheckpointError

logger = logging.getLogger(__name__)


def matches_ct(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
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
        if matches_ct(name, module, self.ignore):
            return None
        for targets, mode in self.groups:
            if matches_ct(name, module, targets):
                return mode
        return None

    def names(self) -> dict[str, str]:
        return CT_NAMES if self.format == COMPRESSED_TENSORS else MO_NAMES

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
        config = read_json(config_path)
    qc = config.get("quantization_config")
    hf_quant = model_dir / HF_QUANT_CONFIG
    if qc is None and hf_quant.is_file():
        data = read_json(hf_quant)
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


def read_json(path: Path) -> dict:
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
