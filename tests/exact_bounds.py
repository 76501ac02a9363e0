"""The element-wise bound of an NVFP4 GEMM's output against its float64 product (shared by test_cublaslt.py,
test_gpu_dispatch_fuzz.py and the Triton interpreter's worker; not a test module).

    |out - ref| <= u * |ref| + (1 + u) * slack * size + tiny

``ref`` the float64 product of the operands the kernel multiplies (times alpha, plus bias), ``size`` the same of
their absolute values, which bounds what fp32 sums in any order can change, ``u`` the output type's unit
roundoff and ``tiny`` its smallest (subnormal) step. A norm-relative tolerance lets a few wrong elements of a large
output through; this bound does not: a 16-element block dropped from one element's sum moves it by about 16/K of
its absolute sum, far above ``slack`` = 2^-16.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
TINY = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24, torch.float32: 2.0 ** -149}
# 2^8 of fp32's unit roundoff: the worst case of 256 chained fp32 additions, and far above what the kernels'
# longer sums lose in practice (a rounding error of random sign per addition: it grows as their length's root)
SUM_ORDER = 2.0 ** -16


def product_and_size(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor | float,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``a @ b^T * alpha + bias``, ``|a| @ |b|^T * |alpha| + |bias|``) in float64, ``a [M, K]``, ``b [N, K]``."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=a.device).reshape(())
    a, b = a.double(), b.double()
    ref, size = a @ b.t() * alpha, a.abs() @ b.abs().t() * alpha.abs()
    if bias is not None:
        ref, size = ref + bias.double(), size + bias.double().abs()
    return ref, size


def outside(out: torch.Tensor, ref: torch.Tensor, size: torch.Tensor, slack: float = SUM_ORDER) -> torch.Tensor:
    """Where ``out`` (of its own dtype) breaks the bound above; NaN and infinite outputs included."""
    u = UNIT_ROUNDOFF[out.dtype]
    bound = u * ref.abs() + (1 + u) * slack * size + TINY[out.dtype]
    return ~((out.double() - ref).abs() <= bound)


def describe(out: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor) -> str:
    """How many elements ``bad`` marks, and the first of them."""
    i, j = (int(v) for v in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {out.numel()} elements off, e.g. [{i}, {j}] = {float(out[i, j])} "
            f"against {float(ref[i, j])}")
