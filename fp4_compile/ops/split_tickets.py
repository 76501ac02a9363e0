"""Self-resetting split-K tickets.

The CTAs of a GEMM that splits K count the slices of an output tile in int32 counters. The
counters are zero at launch and the kernel sets them back to zero, so a call needs no memset (a
graph node of its own, after which the GEMM could not launch programmatically). Two launches that
run at once must not share counters.

Two zeroed buffers per device, allocated outside CUDA-graph capture (``reserve``, called when a
weight is prepared), their zeroing waited for, as calls on any stream read them:

- eager calls take the next region of a ring (``ENTRIES``), far longer than what launches in flight
  on other streams hold;
- captured calls take regions of the second buffer (``CAPTURE_ENTRIES``) that are never handed out
  again: a graph may be replayed on any stream, at any time, beside eager calls and other graphs.
  Once that buffer is spent, a captured call gets a zeroed tensor of its own (a memset node in the
  graph), with a warning.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import torch

ENTRIES = 1 << 16
CAPTURE_ENTRIES = 1 << 20  # 4 MB: at about 100 counters a launch, some 10^4 captured launches


@dataclasses.dataclass
class DeviceTickets:
    ring: torch.Tensor
    captured: torch.Tensor
    ring_next: int = 0
    captured_next: int = 0


_lock = threading.Lock()
_buffers: dict[tuple[str, int | None], DeviceTickets] = {}


def _key(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda" and device.index is None:
        return device.type, torch.cuda.current_device()
    return device.type, device.index


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _zeroed(device: torch.device, entries: int) -> torch.Tensor:
    buf = torch.zeros(entries, dtype=torch.int32, device=device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # zeroed on this stream, read on every stream
    return buf


def _tickets(device: torch.device) -> DeviceTickets | None:
    key = _key(device)
    tickets = _buffers.get(key)
    if tickets is None and not _capturing(device):
        tickets = _buffers[key] = DeviceTickets(_zeroed(device, ENTRIES), _zeroed(device, CAPTURE_ENTRIES))
    return tickets


def reserve(device: torch.device) -> None:
    """Allocate the device's tickets now (before any graph capture that will need them)."""
    with _lock:
        _tickets(device)


def split_tickets(device: torch.device, count: int) -> torch.Tensor:
    """``count`` zeroed int32 counters for one launch: the next region of the device's ring, or, during graph
    capture, of its buffer of captured regions; a fresh zeroed tensor (a memset) where the buffers do not exist
    yet during capture, or have no room for ``count``."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    with _lock:
        tickets = _tickets(device)
        if tickets is None:
            return torch.zeros(count, dtype=torch.int32, device=device)
        if _capturing(device):
            start = tickets.captured_next
            if start + count > tickets.captured.numel():
                warnings.warn(f"fp4_compile: the split-K tickets kept for CUDA graphs on {device} are spent; "
                              "further captured split-K launches zero their own (one memset node each)",
                              stacklevel=2)
                return torch.zeros(count, dtype=torch.int32, device=device)
            tickets.captured_next = start + count
            return tickets.captured[start:start + count]
        if count > tickets.ring.numel():
            return torch.zeros(count, dtype=torch.int32, device=device)
        start = tickets.ring_next if tickets.ring_next + count <= tickets.ring.numel() else 0
        tickets.ring_next = start + count
        return tickets.ring[start:start + count]
