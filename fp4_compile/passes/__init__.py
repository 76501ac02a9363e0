"""Inductor post-grad passes of the ``fp4`` torch.compile backend.

- :mod:`.fuse_linear`: quantize -> [pad_k] -> mm -> [slice] -> [+ bias]  ==>  fp4.linear
- :mod:`.fuse_silu_mul`: silu(fp4.linear(x, gate)) * fp4.linear(x, up)  ==>  fp4.linear_silu_mul
- :mod:`.fuse_rms_norm_quant`: RMSNorm -> W4A4 linears  ==>  fp4.rms_norm_quantize -> their GEMMs on block values
- :mod:`.group_linear`: fp4.linear nodes of one activation  ==>  fp4.linear_group (decode sizes)
- :mod:`.fx_nodes`: the FX-node helpers they share
- :mod:`.manager`: :class:`FP4PostGradPass`, the single ``CustomGraphPass`` that runs them
"""

from .manager import FP4PostGradPass, GraphResult, LinearInfo, record_results

__all__ = ["FP4PostGradPass", "GraphResult", "LinearInfo", "record_results"]
