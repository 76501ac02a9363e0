"""Self-resetting split-K tickets.

The CTAs of a GEMM that splits K count the slices of an output tile in int32 counters. The
counters are zero at launch and the kernel sets them back to zero, so a call needs no memset (a
graph node of its own, after which the GEMM could not launch programmatically).

One zeroed buffer per device, allocated outside CUDA-graph capture (``reserve``, called when a
weight is prepared). Each call takes the next region of it, so that launches in flight on other
streams, or graphs replayed there, count in counters of their own.
"""

from __future__ import annotations

import threading

import torch

ENTRIES = 1 << 16

_lock = threading.Lock()
_buffers: dict[tuple[str, int | None], torch.Tensor] = {}
_next: dict[tuple[str, int | None], int] = {}


def _key(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda" and device.index is None:
        return device.type, torch.cuda.current_device()
    return device.type, device.index


def _buffer(device: torch.device) -> torch.Tensor | None:
    key = _key(device)
    buf = _buffers.get(key)
    if buf is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        buf = _buffers[key] = torch.zeros(ENTRIES, dtype=torch.int32, device=device)
    return buf


def reserve(device: torch.device) -> None:
    """Allocate the device's tickets now (before any graph capture that will need them)."""
    with _lock:
        _buffer(device)


def split_tickets(device: torch.device, count: int) -> torch.Tensor:
    """``count`` zeroed int32 counters for one launch: the next region of the device's buffer; a
    fresh zeroed tensor (a memset) where none exists yet during graph capture or ``count`` exceeds
    ENTRIES."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    with _lock:
        buf = _buffer(device) if count <= ENTRIES else None
        if buf is None:
            return torch.zeros(count, dtype=torch.int32, device=device)
        key = _key(device)
        start = _next.get(key, 0)
        if start + count > ENTRIES:
            start = 0
        _next[key] = start + count
        return buf[start:start + count]
