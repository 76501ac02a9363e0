"""The element-wise bound that the GPU tests hold GEMM outputs to (exact_bounds.py), on the CPU: one rounding of
the output type passes, an element off by a few roundings or a NaN does not. Fresh random data every run."""

from __future__ import annotations

import math

import pytest
import torch

import exact_bounds


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_rounding_passes_and_one_wrong_element_fails(seed, dtype):
    a, b = torch.randn(33, 160), torch.randn(70, 160)
    alpha, bias = torch.tensor([0.37]), torch.randn(70)
    ref, size = exact_bounds.product_and_size(a, b, alpha, bias)
    # the product rounded once to the output type, with an fp32 sum's order changed (the sums in fp32)
    out = (a @ b.t() * alpha + bias).to(dtype)
    assert not exact_bounds.outside(out, ref, size).any()
    wrong = out.clone()
    v = float(out[5, 7])  # moved away from zero by 8 roundings and 1e-2
    wrong[5, 7] = v + math.copysign(8 * exact_bounds.UNIT_ROUNDOFF[dtype] * abs(v) + 1e-2, v)
    wrong[9, 3] = float("nan")
    bad = exact_bounds.outside(wrong, ref, size)
    assert bad.nonzero().tolist() == [[5, 7], [9, 3]]
    assert exact_bounds.describe(wrong, ref, bad).startswith(f"2 of {out.numel()} elements off, e.g. [5, 7]")


def test_a_dropped_block_is_outside_the_bound(seed):
    """What the bound is for: a 16-element block missing from one element's sum (K = 4096) is caught (the block
    whose partial sum is largest: a random one may sum to almost nothing)."""
    a, b = torch.randn(4, 4096), torch.randn(8, 4096)
    ref, size = exact_bounds.product_and_size(a, b, 1.0)
    out = (a @ b.t()).float()
    block = int((a[2] * b[5]).reshape(-1, 16).sum(1).abs().argmax())
    out[2, 5] -= a[2, 16 * block:16 * block + 16] @ b[5, 16 * block:16 * block + 16]
    assert exact_bounds.outside(out, ref, size).nonzero().tolist() == [[2, 5]]
