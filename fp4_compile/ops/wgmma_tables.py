"""Tables of measured launch configurations of the wgmma kernel (``cuda_wgmma``).

Two sources, the device's own first: the table ``fp4c tune`` measured on a GPU of this name (JSON in
the kernel build directory, or ``$FP4C_WGMMA_TABLE``), then the H100 table built into the package
(``tuned_wgmma_h100``, for 132-SM sm_90 devices). Each maps a layer shape (N, K) to an M grid and, per
grid value, the launch configuration for M above the value before and up to this one (its
``LaunchConfig.label``), or None where the cost model's own pick is as good.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from . import nvcc, tuned_wgmma_h100

TABLE_FORMAT = 1  # the JSON layout written by write_table
DEVICE_KEYS = ("gpu", "sms", "capability")  # device_identity's fields


# The K split counts that the tables written before the 3- and 6-way splits were built had timed.
POWER_OF_TWO_SPLITS = (1, 2, 4, 8)


class ShapePicks(NamedTuple):
    """One layer shape's measured picks, and the K split counts of the variants its sweep timed."""

    m_grid: tuple[int, ...]
    labels: tuple[str | None, ...]
    splits: tuple[int, ...] = POWER_OF_TWO_SPLITS

    def covers(self, m: int) -> bool:
        return m <= self.m_grid[-1]

    def at(self, m: int) -> str | None:
        """The pick for M (M within the grid), or None for the cost model's."""
        return self.labels[bisect.bisect_left(self.m_grid, m)]


Picks = dict[tuple[int, int], ShapePicks]


@functools.lru_cache(maxsize=None)
def builtin_picks(sms: int, capability: tuple[int, int]) -> Picks:
    """The built-in H100 table where the device matches it (SMs and capability), else none."""
    table = tuned_wgmma_h100
    if sms != table.SMS or tuple(capability) != table.CAPABILITY:
        return {}
    return {nk: ShapePicks(tuple(table.M_GRID), tuple(labels), tuple(table.SPLITS))
            for nk, labels in table.PICKS.items()}


def table_path(gpu_name: str, sms: int) -> Path:
    """Where the table of a GPU of this name and SM count lives: ``$FP4C_WGMMA_TABLE``, else a file
    named after the GPU in the kernel build directory (``$FP4C_BUILD_DIR``, ``~/.cache/fp4_compile``)."""
    if os.environ.get("FP4C_WGMMA_TABLE"):
        return Path(os.environ["FP4C_WGMMA_TABLE"])
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_")
    return nvcc.build_dir() / f"wgmma_table_{slug}_{sms}sm.json"


def device_identity(device_index: int) -> dict[str, Any]:
    """The fields a table must match to apply to this device."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return {"gpu": props.name, "sms": props.multi_processor_count,
            "capability": list(nvcc.device_capability(device_index))}


def kernel_build() -> str:
    """The wgmma kernel's source digest (``nvcc.source_digest``): a table measured on another build of the
    kernel no longer holds (NOTES.md v34)."""
    from .cuda_wgmma import SOURCE

    return nvcc.source_digest(SOURCE)


def table_identity(device_index: int) -> dict[str, Any]:
    """What a table must have been measured on to apply here: this device and this build of the kernel."""
    return {**device_identity(device_index), "kernel": kernel_build()}


def read_table(path: str | os.PathLike) -> tuple[dict[str, Any], Picks]:
    """(the table's device and provenance fields, its picks); ValueError if the file is not such a table."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {TABLE_FORMAT}")
        picks = {}
        for shape, entry in data["shapes"].items():
            n, k = (int(v) for v in shape.split("x"))
            grid, labels = tuple(int(m) for m in entry["m_grid"]), tuple(entry["labels"])
            if not grid or len(grid) != len(labels) or list(grid) != sorted(set(grid)):
                raise ValueError(f"shape {shape}: m_grid and labels do not match")
            splits = tuple(int(v) for v in entry.get("splits", POWER_OF_TWO_SPLITS))
            picks[(n, k)] = ShapePicks(grid, labels, splits)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a wgmma launch table ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a wgmma launch table ({e})") from None
    meta = {key: value for key, value in data.items() if key != "shapes"}
    return meta, picks


def write_table(path: str | os.PathLike, meta: dict[str, Any], picks: Picks) -> Picks:
    """Write ``picks`` with ``meta`` (``table_identity`` and provenance) to ``path``, keeping the shapes of
    a table already there for the same device and kernel build that ``picks`` does not measure. Returns the
    table written."""
    path = Path(path)
    merged: Picks = {}
    if path.is_file():
        try:
            old_meta, old = read_table(path)
        except ValueError:
            old_meta, old = {}, {}
        if all(old_meta.get(key) == meta.get(key) for key in (*DEVICE_KEYS, "kernel")):
            merged.update(old)
    merged.update(picks)
    data = {"format": TABLE_FORMAT, **meta, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "shapes": {f"{n}x{k}": {"m_grid": list(p.m_grid), "labels": list(p.labels), "splits": list(p.splits)}
                       for (n, k), p in sorted(merged.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # readers see the old table or the new one, never half of one
    return merged


@functools.lru_cache(maxsize=None)
def device_picks(device_index: int) -> Picks:
    """The table measured on this device's kind of GPU, if there is one (cached per process; a table of
    another GPU or of another build of the kernel, or an unreadable file, is ignored with a warning)."""
    identity = table_identity(device_index)
    path = table_path(identity["gpu"], identity["sms"])
    if not path.is_file():
        return {}
    try:
        meta, picks = read_table(path)
    except (OSError, ValueError) as e:
        warnings.warn(f"fp4_compile: ignoring the wgmma launch table: {e}", stacklevel=2)
        return {}
    theirs = {key: meta.get(key) for key in DEVICE_KEYS}
    device = {key: identity[key] for key in DEVICE_KEYS}
    if theirs != device:
        warnings.warn(f"fp4_compile: ignoring the wgmma launch table {path}: it was measured on {theirs}, "
                      f"this device is {device}", stacklevel=2)
        return {}
    if meta.get("kernel") != identity["kernel"]:
        warnings.warn(f"fp4_compile: ignoring the wgmma launch table {path}: it was measured on another build "
                      "of the wgmma kernel (fp4_compile changed since); run `fp4c tune` again to re-measure",
                      stacklevel=2)
        return {}
    return picks
