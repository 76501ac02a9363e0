"""Safetensors headers read without the tensor data, and the index of a checkpoint's tensors across shards."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .formats import DTYPE_SIZES, SAFE_INDEX, SAFE_WEIGHTS, CheckpointError


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
        expected = math.prod(shape) * DTYPE_SIZES.get(dtype, 0)
        if dtype in DTYPE_SIZES and end - begin != expected:
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
