"""NVFP4 format: the one pure-torch reference (see shared NVFP4.md).

Everything here is device-agnostic torch code and bit-exact with the spec on any
device whose float32 arithmetic is IEEE (the CPU included). Kernels elsewhere in the
package are tested against these functions.
"""

from __future__ import annotations

import functools

import torch

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# Magnitudes of the 8 non-negative E2M1 codes; bit 3 of a code is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding thresholds between consecutive magnitudes. Round-to-nearest-even makes a tie
# go to the even code: ties at 0.75, 1.75, 3.5 round up (>=), ties at 0.25, 1.25, 2.5,
# 5.0 round down (>).
_ROUND_UP_AT_TIE = (0.75, 1.75, 3.5)
_ROUND_DOWN_AT_TIE = (0.25, 1.25, 2.5, 5.0)

SCALE_ROW_TILE = 128  # swizzled ("128x4") scale layout: rows padded to 128
SCALE_COL_TILE = 4  # ... and scale columns to 4
ALIGNMENT = 32  # CUTLASS-class kernels need N and K multiples of 32

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------------------------------
# argument checks (shared by the reference, the ops and the layer)


def check_float_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 to be quantized to NVFP4, got {x.dtype}"
        )
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension")
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{name}: the last dimension (K={x.shape[-1]}) must be a multiple of {BLOCK_SIZE}"
        )


def check_global_scale(gs: torch.Tensor, name: str = "global_scale", *, check_value: bool = True) -> None:
    """A global scale is a float32 tensor of one element, positive and finite.

    ``check_value`` reads the value (a device sync on GPUs); traced code passes False.
    """
    if not isinstance(gs, torch.Tensor):
        raise TypeError(f"{name} must be a float32 torch.Tensor of one element, got {type(gs).__name__}")
    if gs.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {gs.dtype}")
    if gs.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(gs.shape)}")
    if check_value and not is_traced(gs):
        v = float(gs.detach().reshape(()).cpu())
        if not (v > 0.0 and v != float("inf")):
            raise ValueError(f"{name} must be positive and finite, got {v}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len({d for d in devices.values()}) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def check_linear_weight(packed: torch.Tensor, scales: torch.Tensor) -> None:
    """A weight in the linear (checkpoint) layout: uint8 ``[N, K/2]`` and float8_e4m3fn ``[N, K/16]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed weight must be 2-D uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if k % BLOCK_SIZE:
        raise ValueError(f"in_features (K={k}) must be a multiple of {BLOCK_SIZE}")
    if scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight scales must be float8_e4m3fn, got {scales.dtype}")
    if tuple(scales.shape) != (n, k // BLOCK_SIZE):
        raise ValueError(
            f"weight scales must have shape {(n, k // BLOCK_SIZE)} for a packed weight of shape "
            f"{tuple(packed.shape)}, got {tuple(scales.shape)}"
        )


def is_traced(t: torch.Tensor) -> bool:
    """Is ``t`` a tracing stand-in (fake or meta tensor, or inside torch.compile) rather than data?"""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta" or torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------
# global scales


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """The quantization multiplier ``448 * 6 / amax`` (float32), as checkpoints store it.

    An all-zero tensor (amax 0) gets a large finite scale instead of inf, so that its
    blocks quantize to zero scales rather than NaN.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (E4M3_MAX * E2M1_MAX) / amax.float().clamp_min(1e-12)


def dynamic_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-call activation global scale from the tensor's amax, in plain torch ops."""
    return global_scale_from_amax(x.detach().abs().amax().float()).reshape(1)


# ---------------------------------------------------------------------------------------
# E2M1 codes


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 values (already scaled and clamped to [-6, 6]) -> uint8 codes 0..15, RNE."""
    mag = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for t in _ROUND_DOWN_AT_TIE:
        code += (mag > t).to(torch.uint8)
    for t in _ROUND_UP_AT_TIE:
        code += (mag >= t).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


@functools.lru_cache(maxsize=None)
def _e2m1_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Cached per device: a host-to-device copy per call would also break CUDA-graph capture.
    return torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=dtype, device=device)


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes 0..15 -> values."""
    return _e2m1_table(codes.device, dtype)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes; element 2j in the low nibble of byte j."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------------------------------------------------------------------------------------
# quantize / dequantize


def quantize_rows(x: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float, gs float32 scalar -> codes uint8 [M, K/2], scales fp8 [M, K/16]."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK_SIZE, BLOCK_SIZE)
    gs = gs.reshape(()).float()
    amax = blocks.abs().amax(dim=-1)
    # The float32 steps of NVFP4.md, in order: gs * (amax * (1/6)), min with 448.
    sf_f32 = torch.clamp(gs * (amax * torch.tensor(1.0 / 6.0, dtype=torch.float32)), max=E4M3_MAX)
    # A non-finite block gets the NaN scale byte (0x7F) so that the GEMM output is
    # non-finite too; saturating Inf to 448 would give a finite wrong answer.
    sf_f32 = torch.where(torch.isfinite(amax), sf_f32, torch.full_like(sf_f32, float("nan")))
    sf = sf_f32.to(torch.float8_e4m3fn)
    sf_back = sf.float()
    inv_gs = torch.reciprocal(gs)
    out_scale = torch.where(sf_back == 0, torch.zeros_like(sf_back), torch.reciprocal(sf_back * inv_gs))
    v = torch.clamp(blocks * out_scale.unsqueeze(-1), -E2M1_MAX, E2M1_MAX)
    codes = e2m1_encode(v).reshape(m, k)
    return pack_e2m1(codes), sf


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise a ValueError naming the first non-finite element of ``x`` (a device sync)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s), the first at index {index}: "
            f"{x[index].item()} (NVFP4 would turn its block into NaN)"
        )


def quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor, *, swizzle: bool = False, check_finite_input: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` to NVFP4.

    Returns packed codes ``uint8 [..., K/2]`` and block scales ``float8_e4m3fn``:
    ``[..., K/16]`` (linear) or, with ``swizzle=True``, the 2-D 128x4 layout of the
    flattened rows, zero-padded to ``[round_up(M, 128), round_up(K/16, 4)]``. A block
    holding Inf or NaN gets the NaN scale byte; ``check_finite_input=True`` raises instead.
    """
    check_float_input(x)
    check_global_scale(global_scale)
    check_same_device(x=x, global_scale=global_scale)
    if check_finite_input:
        check_finite(x)
    lead, k = x.shape[:-1], x.shape[-1]
    packed, scales = quantize_rows(x.reshape(-1, k), global_scale)
    packed = packed.reshape(*lead, k // 2)
    if swizzle:
        return packed, swizzle_blockscale(scales)
    return packed, scales.reshape(*lead, k // BLOCK_SIZE)


def dequantize_nvfp4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    swizzled: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4`: ``e2m1(q) * float(sf) / gs`` in float32, cast to dtype."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"scales must be float8_e4m3fn, got {scales.dtype}")
    check_global_scale(global_scale)
    lead, k = packed.shape[:-1], packed.shape[-1] * 2
    rows = packed.reshape(-1, k // 2)
    m = rows.shape[0]
    if swizzled:
        scales = unswizzle_blockscale(scales, m, k)
    scales = scales.reshape(m, -1)
    if scales.shape[1] != k // BLOCK_SIZE:
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match packed shape {tuple(packed.shape)} "
            f"(expected {k // BLOCK_SIZE} scales per row)"
        )
    values = e2m1_decode(unpack_e2m1(rows)).reshape(m, k // BLOCK_SIZE, BLOCK_SIZE)
    out = (values * scales.float().unsqueeze(-1)).reshape(m, k) / global_scale.reshape(()).float()
    return out.reshape(*lead, k).to(dtype)


def block_values(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``e2m1(q) * float(sf)`` as float32 [rows, K], without the global scale.

    These products are exact in bf16 (at most 6 significant bits), which is what makes
    the Hopper W4A4 emulation exact; the reference GEMM uses them in float32.
    """
    rows, k = packed.shape[0], packed.shape[1] * 2
    values = e2m1_decode(unpack_e2m1(packed)).reshape(rows, k // BLOCK_SIZE, BLOCK_SIZE)
    return (values * scales.float().reshape(rows, k // BLOCK_SIZE, 1)).reshape(rows, k)


# ---------------------------------------------------------------------------------------
# scale layouts


def swizzled_scale_shape(rows: int, k: int) -> tuple[int, int]:
    """Shape of the 128x4 swizzled scales of ``rows`` rows of K elements."""
    return round_up(rows, SCALE_ROW_TILE), round_up(k // BLOCK_SIZE, SCALE_COL_TILE)


def swizzle_blockscale(scales: torch.Tensor) -> torch.Tensor:
    """Linear ``[M, K/16]`` scales -> zero-padded 128x4 layout ``[Mp, Kp]`` (2-D, same dtype).

    Byte offset of (m, k): ((m//128)*(Kp//4) + k//4)*512 + (m%32)*16 + ((m//32)%4)*4 + k%4.
    """
    m, kb = scales.shape
    mp, kp = round_up(m, SCALE_ROW_TILE), round_up(kb, SCALE_COL_TILE)
    padded = torch.zeros((mp, kp), dtype=torch.uint8, device=scales.device)
    padded[:m, :kb] = scales.view(torch.uint8)
    tiles = padded.reshape(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, kp).view(scales.dtype)


def unswizzle_blockscale(swizzled: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_blockscale`: back to linear ``[rows, K/16]``."""
    mp, kp = swizzled_scale_shape(rows, k)
    if tuple(swizzled.shape) != (mp, kp):
        raise ValueError(
            f"swizzled scales have shape {tuple(swizzled.shape)}, expected {(mp, kp)} "
            f"for {rows} rows of K={k}"
        )
    raw = swizzled.contiguous().view(torch.uint8)
    tiles = raw.reshape(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, kp)[:rows, : k // BLOCK_SIZE].contiguous().view(swizzled.dtype)


# ---------------------------------------------------------------------------------------
# alignment padding (CUTLASS-class kernels need N and K multiples of 32)


def pad_weight_for_alignment(
    packed: torch.Tensor, scales: torch.Tensor, alignment: int = ALIGNMENT, k_alignment: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a weight ``[N, K/2]`` and its linear scales ``[N, K/16]`` to N a multiple of ``alignment`` and K
    of ``k_alignment`` (default: ``alignment``)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    np_, kp = round_up(n, alignment), round_up(k, k_alignment or alignment)
    if (np_, kp) == (n, k):
        return packed, scales
    out = torch.zeros((np_, kp // 2), dtype=packed.dtype, device=packed.device)
    out[:n, : k // 2] = packed
    sf = torch.zeros((np_, kp // BLOCK_SIZE), dtype=torch.uint8, device=scales.device)
    sf[:n, : k // BLOCK_SIZE] = scales.view(torch.uint8)
    return out, sf.view(scales.dtype)


def pad_activation_for_alignment(packed: torch.Tensor, k_padded: int) -> torch.Tensor:
    """Zero-pad packed activations ``[M, K/2]`` in K to ``k_padded`` elements."""
    missing = k_padded // 2 - packed.shape[-1]
    if missing == 0:
        return packed
    return torch.nn.functional.pad(packed, (0, missing))


def slice_output(out: torch.Tensor, n: int) -> torch.Tensor:
    """Drop the padded output columns of an N-padded GEMM."""
    return out if out.shape[-1] == n else out[..., :n]
