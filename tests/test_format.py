"""format.py against the independent spec quantizer, layouts, padding and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4_compile import format as fmt

import nvfp4_spec as spec


def _spec_check(x: torch.Tensor, gs: torch.Tensor) -> None:
    packed, scales = fmt.quantize_nvfp4(x, gs)
    rows = x.reshape(-1, x.shape[-1]).float().numpy()
    want_codes, want_sf = spec.quantize(rows, float(gs))
    got_codes = fmt.unpack_e2m1(packed.reshape(-1, x.shape[-1] // 2)).numpy()
    got_sf = scales.reshape(rows.shape[0], -1).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got_sf, want_sf)
    finite = np.repeat(np.isfinite(rows.reshape(rows.shape[0], -1, 16)).all(-1), 16, axis=1)
    np.testing.assert_array_equal(got_codes[finite], want_codes[finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (3, 48), (2, 5, 64), (67, 256)])
def test_quantize_bit_exact_random(seed, dtype, shape):
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype)
    gs = fmt.global_scale_from_amax(x.abs().amax().float()).reshape(1)
    _spec_check(x, gs)


def test_quantize_bit_exact_with_outliers_and_saturation(seed):
    x = torch.randn(32, 128)
    x[::3, ::7] *= 1000  # blocks whose scale saturates at 448 with a calibrated gs
    gs = fmt.global_scale_from_amax(torch.tensor(5.0))
    _spec_check(x, gs.reshape(1))


_THRESHOLDS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0]


@st.composite
def _blocks(draw):
    """Blocks hitting the E2M1 rounding thresholds exactly (gs=1, amax=6*2^e gives sf=2^e)."""
    n_blocks = draw(st.integers(1, 4))
    rows = []
    for _ in range(n_blocks):
        kind = draw(st.sampled_from(["ties", "zero", "random", "huge", "tiny"]))
        if kind == "zero":
            rows.append([0.0] * 16)
            continue
        if kind == "ties":
            e = draw(st.integers(-6, 6))
            vals = [6.0] + draw(st.lists(st.sampled_from(_THRESHOLDS), min_size=15, max_size=15))
            signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=16, max_size=16))
            rows.append([s * v * 2.0**e for s, v in zip(signs, vals)])
            continue
        mag = {"random": 1.0, "huge": 1e30, "tiny": 1e-30}[kind]
        vals = draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=16, max_size=16))
        rows.append([v * mag for v in vals])
    return rows


@settings(max_examples=150, deadline=None)
@given(_blocks(), st.sampled_from([None, 1.0, 0.5, 1e-20, 3e20]))
def test_quantize_bit_exact_hypothesis(rows, gs_value):
    x = torch.tensor(rows, dtype=torch.float32).reshape(1, -1)
    amax = x.abs().amax()
    gs = torch.tensor([gs_value if gs_value is not None else float(fmt.global_scale_from_amax(amax))], dtype=torch.float32)
    _spec_check(x, gs)


def test_ties_round_to_even():
    # gs = 1 and a block amax of 6 make sf = 1, so values are rounded as they are.
    vals = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, 5.01, 0.2, 5.5, -5.5, 0.0, -0.0])
    packed, scales = fmt.quantize_nvfp4(vals.reshape(1, 16), torch.ones(1))
    assert scales.float().item() == 1.0
    got = fmt.e2m1_decode(fmt.unpack_e2m1(packed)).reshape(-1).tolist()
    assert got == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, 6.0, 0.0, 6.0, -6.0, 0.0, -0.0]


def test_dequantize_error_level(seed):
    x = torch.randn(256, 512)
    gs = fmt.global_scale_from_amax(x.abs().amax()).reshape(1)
    packed, scales = fmt.quantize_nvfp4(x, gs)
    rel = ((fmt.dequantize_nvfp4(packed, scales, gs) - x).norm() / x.norm()).item()
    assert 0.07 < rel < 0.11, rel


@pytest.mark.parametrize("rows,k", [(1, 16), (5, 48), (128, 64), (130, 272), (300, 1024)])
def test_swizzle_roundtrip_and_zero_padding(seed, rows, k):
    sf = torch.randint(1, 0x7F, (rows, k // 16), dtype=torch.uint8).view(torch.float8_e4m3fn)
    swz = fmt.swizzle_blockscale(sf)
    mp, kp = fmt.swizzled_scale_shape(rows, k)
    assert swz.shape == (mp, kp) and mp % 128 == 0 and kp % 4 == 0
    flat = swz.view(torch.uint8).reshape(-1)
    # every byte at the formula's offset, and every other byte zero
    m_idx, k_idx = torch.meshgrid(torch.arange(rows), torch.arange(k // 16), indexing="ij")
    off = ((m_idx // 128) * (kp // 4) + k_idx // 4) * 512 + (m_idx % 32) * 16 + ((m_idx // 32) % 4) * 4 + k_idx % 4
    assert torch.equal(flat[off.reshape(-1)], sf.view(torch.uint8).reshape(-1))
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[off.reshape(-1)] = False
    assert int(flat[mask].count_nonzero()) == 0
    assert torch.equal(fmt.unswizzle_blockscale(swz, rows, k).view(torch.uint8), sf.view(torch.uint8))


def test_quantize_swizzled_matches_linear(seed):
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    gs = fmt.global_scale_from_amax(x.abs().amax().float()).reshape(1)
    packed, linear = fmt.quantize_nvfp4(x, gs)
    packed2, swz = fmt.quantize_nvfp4(x, gs, swizzle=True)
    assert torch.equal(packed, packed2)
    assert torch.equal(fmt.swizzle_blockscale(linear.reshape(21, 6)).view(torch.uint8), swz.view(torch.uint8))
    deq = fmt.dequantize_nvfp4(packed.reshape(21, 48), swz, gs, swizzled=True)
    assert torch.equal(deq, fmt.dequantize_nvfp4(packed, linear, gs).reshape(21, 96))


def test_pad_weight_activation_and_slice(seed):
    n, k = 40, 48
    w = torch.randn(n, k)
    gs = fmt.global_scale_from_amax(w.abs().amax()).reshape(1)
    packed, sf = fmt.quantize_nvfp4(w, gs)
    pp, psf = fmt.pad_weight_for_alignment(packed, sf)
    assert pp.shape == (64, 32) and psf.shape == (64, 4)
    assert torch.equal(pp[:n, : k // 2], packed) and int(pp[n:].count_nonzero()) == 0 and int(pp[:, k // 2 :].count_nonzero()) == 0
    assert int(psf.view(torch.uint8)[n:].count_nonzero()) == 0 and int(psf.view(torch.uint8)[:, 3:].count_nonzero()) == 0
    a = torch.randint(0, 255, (3, k // 2), dtype=torch.uint8)
    pa = fmt.pad_activation_for_alignment(a, 64)
    assert pa.shape == (3, 32) and torch.equal(pa[:, :24], a) and int(pa[:, 24:].count_nonzero()) == 0
    # the padded GEMM, sliced, equals the unpadded one
    xa = torch.randn(3, k)
    ga = fmt.global_scale_from_amax(xa.abs().amax()).reshape(1)
    qa, sa = fmt.quantize_nvfp4(xa, ga)
    full = fmt.block_values(qa, sa) @ fmt.block_values(packed, sf).t()
    qpa = fmt.pad_activation_for_alignment(qa, 64)
    spa = torch.cat([sa.view(torch.uint8), torch.zeros(3, 1, dtype=torch.uint8)], 1).view(torch.float8_e4m3fn)
    padded = fmt.block_values(qpa, spa) @ fmt.block_values(pp, psf).t()
    assert torch.equal(fmt.slice_output(padded, n), full)


def test_non_finite_blocks_are_nan(seed):
    x = torch.randn(2, 64)
    x[0, 3] = float("inf")
    x[1, 40] = float("nan")
    gs = torch.tensor([100.0])
    packed, scales = fmt.quantize_nvfp4(x, gs)
    deq = fmt.dequantize_nvfp4(packed, scales, gs)
    assert deq[0, :16].isnan().all() and deq[1, 32:48].isnan().all()
    assert deq[0, 16:].isfinite().all() and deq[1, :32].isfinite().all() and deq[1, 48:].isfinite().all()
    assert scales.view(torch.uint8)[0, 0] == 0x7F


def test_check_finite_input_raises(seed):
    x = torch.randn(3, 32)
    x[2, 17] = float("-inf")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\), the first at index \(2, 17\)"):
        fmt.quantize_nvfp4(x, torch.tensor([10.0]), check_finite_input=True)


def test_empty_and_non_contiguous(seed):
    gs = torch.tensor([10.0])
    packed, scales = fmt.quantize_nvfp4(torch.randn(0, 32), gs)
    assert packed.shape == (0, 16) and scales.shape == (0, 2)
    base = torch.randn(64, 48)
    x = base.t()  # non-contiguous [48, 64]
    p1, s1 = fmt.quantize_nvfp4(x, gs)
    p2, s2 = fmt.quantize_nvfp4(x.contiguous(), gs)
    assert torch.equal(p1, p2) and torch.equal(s1.view(torch.uint8), s2.view(torch.uint8))


def test_global_scale_from_amax():
    assert math.isclose(float(fmt.global_scale_from_amax(torch.tensor(2688.0))), 1.0)
    assert math.isfinite(float(fmt.global_scale_from_amax(torch.tensor(0.0))))


@pytest.mark.parametrize(
    "x,gs,err,match",
    [
        (torch.randn(2, 24), torch.ones(1), ValueError, "multiple of 16"),
        (torch.randint(0, 5, (2, 32)), torch.ones(1), TypeError, "float32, float16 or bfloat16"),
        (torch.randn(2, 32).to(torch.float8_e4m3fn), torch.ones(1), TypeError, "float32, float16 or bfloat16"),
        (torch.randn(2, 32), torch.ones(1, dtype=torch.float64), TypeError, "global_scale must be float32"),
        (torch.randn(2, 32), torch.ones(2), ValueError, "exactly one element"),
        (torch.randn(2, 32), torch.tensor([-1.0]), ValueError, "positive and finite"),
        (torch.randn(2, 32), torch.tensor([float("inf")]), ValueError, "positive and finite"),
        (torch.randn(2, 32), torch.tensor([0.0]), ValueError, "positive and finite"),
        (torch.randn(2, 32), 1.0, TypeError, "global_scale must be a float32 torch.Tensor"),
    ],
)
def test_bad_input(x, gs, err, match):
    with pytest.raises(err, match=match):
        fmt.quantize_nvfp4(x, gs)


def test_bad_input_devices_and_shapes():
    with pytest.raises(ValueError, match="one device"):
        fmt.check_same_device(x=torch.ones(1), global_scale=torch.ones(1, device="meta"))
    packed = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not match packed shape"):
        fmt.dequantize_nvfp4(packed, torch.zeros(4, 3, dtype=torch.float8_e4m3fn), torch.ones(1))
    with pytest.raises(ValueError, match="swizzled scales have shape"):
        fmt.unswizzle_blockscale(torch.zeros(4, 2, dtype=torch.float8_e4m3fn), 4, 32)
