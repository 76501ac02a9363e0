"""An independent NVFP4 quantizer written straight from NVFP4.md, in numpy float32.

It shares no code with fp4_compile: E4M3 rounding is done by searching the table of all
finite E4M3 values, E2M1 rounding by nearest magnitude with ties to the even code.
"""

from __future__ import annotations

import numpy as np

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)


def _e4m3_table() -> tuple[np.ndarray, np.ndarray]:
    """All non-negative finite E4M3 values and their byte codes (bias 7, no inf, 0x7F NaN)."""
    values, codes = [], []
    for code in range(0x7F):  # 0x7F is NaN
        exp, man = code >> 3, code & 7
        value = man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        values.append(value)
        codes.append(code)
    return np.array(values), np.array(codes, dtype=np.uint8)


E4M3_VALUES, E4M3_CODES = _e4m3_table()


def round_e4m3(v: np.ndarray) -> np.ndarray:
    """Non-negative float -> E4M3 byte, round to nearest, ties to the even code (v <= 448)."""
    out = np.empty(v.shape, dtype=np.uint8)
    flat_v, flat_out = v.reshape(-1), out.reshape(-1)
    for i, x in enumerate(flat_v.astype(np.float64)):
        if np.isnan(x):
            flat_out[i] = 0x7F
            continue
        dist = np.abs(E4M3_VALUES - x)
        best = np.flatnonzero(dist == dist.min())
        flat_out[i] = E4M3_CODES[best[0]] if len(best) == 1 else E4M3_CODES[best][E4M3_CODES[best] % 2 == 0][0]
    return out


def e4m3_value(code: np.ndarray) -> np.ndarray:
    table = np.append(E4M3_VALUES, np.nan).astype(np.float32)
    return table[code.astype(np.int64)]


def round_e2m1(v: np.ndarray) -> np.ndarray:
    """float in [-6, 6] -> 4-bit code, nearest magnitude, ties to the even code."""
    mag = np.abs(v.astype(np.float64))
    dist = np.abs(mag[..., None] - E2M1)
    best = dist.argmin(-1)
    nearest = np.take_along_axis(dist, best[..., None], -1)[..., 0]
    tie = (nearest == np.take_along_axis(dist, np.minimum(best + 1, 7)[..., None], -1)[..., 0]) & (best < 7)
    best = np.where(tie & (best % 2 == 1), best + 1, best)
    return (best | (np.signbit(v).astype(np.int64) << 3)).astype(np.uint8)


def quantize(x: np.ndarray, gs: float) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] -> (codes uint8 [M, K], scale bytes uint8 [M, K/16]) per NVFP4.md."""
    f32 = np.float32
    m, k = x.shape
    blocks = x.astype(f32).reshape(m, k // 16, 16)
    gs = f32(gs)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        amax = np.abs(blocks).max(-1)
        sf = np.minimum(gs * (amax * f32(1.0 / 6.0)), f32(448.0)).astype(f32)
        sf = np.where(np.isfinite(amax), sf, np.nan)
        sf_code = round_e4m3(sf)
        sf_val = e4m3_value(sf_code)
        out_scale = np.where(sf_val == 0, f32(0), f32(1) / (sf_val * (f32(1) / gs))).astype(f32)
        v = np.clip(blocks * out_scale[..., None], f32(-6), f32(6)).astype(f32)
    return round_e2m1(v).reshape(m, k), sf_code
