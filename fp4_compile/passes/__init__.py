"""Inductor post-grad passes of the ``fp4`` torch.compile backend.

- :mod:`.fuse_linear`: quantize -> [pad_k] -> mm -> [slice] -> [+ bias]  ==>  fp4.linear
- :mod:`.manager`: :class:`FP4PostGradPass`, the single ``CustomGraphPass`` that runs them
"""

from .manager import FP4PostGradPass, GraphResult, LinearInfo, record_results

__all__ = ["FP4PostGradPass", "GraphResult", "LinearInfo", "record_results"]
