"""Give a gated MLP's down projection its W4A4 activations from the gate/up launch: ``fp4::linear_silu_mul``
with ``out_global_scale``.

After ``fuse_silu_mul`` a Llama MLP reads::

    y = fp4.linear_silu_mul(x, [wg, wu], ..., N, backend)
    out = fp4.linear(view(y, [-1, N]), wd, wd_scale, gs, alpha, bias, K, "triton-w4a4")

and the W4A4 down projection quantizes ``y`` in a kernel of its own before its GEMM. Here ``y`` becomes
the exact NVFP4 block values of the product (``fp4.linear_silu_mul(..., out_global_scale=gs)``), written
by the launch that computes it (on Hopper at decode sizes the gated small-M kernel's epilogue, one NVFP4
block per 16 outputs; elsewhere the SiLU*mul kernel after the two GEMMs), and the down projection reads
them with backend ``marlin``: a W4A16 GEMM on exact block values with W4A4's alpha is the W4A4 product, as
in ``fuse_rms_norm_quant``, whose conditions this pass shares: every user of ``y`` (directly or through
views) is a ``triton-w4a4`` linear op, all with one activation scale that is a graph input. Graphs whose M
is a constant below ``GATED_QUANT_MIN_M`` (one-token decode) are left alone: there the down projection's
own quantization kernel hides its GEMM's launch, which measured faster (ops/cuda_small_m.py).
"""

from __future__ import annotations

import logging

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fp4)
from .fuse_rms_norm_quant import VALUES_BACKEND, _consumers
from ..ops.cuda_small_m import GATED_QUANT_MIN_M
from .fuse_silu_mul import LINEAR_SILU_MUL, _position

logger = logging.getLogger(__name__)


def fuse_silu_mul_quant(graph: torch.fx.Graph) -> int:
    """Rewrite every match in ``graph``; returns how many ``fp4.linear_silu_mul`` nodes now quantize."""
    made = 0
    position = _position(graph)
    for node in graph.find_nodes(op="call_function", target=LINEAR_SILU_MUL):
        if len(node.args) > 8 or node.kwargs:
            continue  # already quantizing (N is the W4A4 consumer's K: a multiple of 16, as quantizing needs)
        m = node.meta["val"].shape[0] if "val" in node.meta else None
        if isinstance(m, int) and m < GATED_QUANT_MIN_M:
            continue
        if (found := _consumers(node)) is None:
            continue
        consumers, gs = found
        if position(gs) > position(node):
            continue
        node.args = (*node.args, gs)
        for consumer in consumers:
            consumer.update_arg(7, VALUES_BACKEND)
        made += 1
        logger.debug("fp4 fusion: %s writes the block values of %s", node.name, ", ".join(c.name for c in consumers))
    return made
