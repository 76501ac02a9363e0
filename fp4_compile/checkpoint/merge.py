"""``merge_nvfp4_linears``: sibling NVFP4 linears (q/k/v, gate/up) joined into one, as serving engines fuse them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import format as fmt
from ..layer import NVFP4Linear

logger = logging.getLogger(__name__)


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
