"""The Hopper kernels' weight word: where each bit of the 8 e2m1 codes of a 32-bit word lives.

The kernels turn a word into four x2 registers of 16-bit values (``r[0..3]``, two codes each) and
multiply each by its block scale with one x2 fma. The bit placement that precedes the fma is most
of the integer work per weight in every Hopper kernel, so the bits are stored where placing them is
cheapest (at M = 1 that took 2-19% off the decode kernel's time: benchmarks/NOTES.md, v12). bf16
wants a code's sign at bit 15 of its lane and its 3 magnitude bits at 8..6 (they then read as
``e2m1 * 2^-126``, subnormal 0.5 included): that is the mask ``BF16_BITS`` over both lanes.

- ``r[0]``, ``r[1]``, ``r[2]``: ``(w << s) & BF16_BITS`` for s = 0, 3, 6: the three shifted copies
  of the mask are disjoint, and no other code's bit lands on a mask bit.
- ``r[3]`` takes the 8 bits left over, which no single shift can place (they hold no 3 adjacent
  bits): ``(lo | hi)((w & GROUP3_BITS) * GROUP3_MULT) & BF16_BITS``, one 32x32->64 multiply that
  adds three shifted copies without carries, the high word bringing the wrapped bits back.

That is 8 integer instructions per word where a nibble layout needs 16 (two shifts and two masks per
pair; no layout lets one shift serve all four pairs: NOTES v8, v12). The wgmma kernel gathers r[3]
with three rotations instead (same bits; the multiply's FMA-pipe time slowed it there). fp16 reuses
the bf16 placement and moves the magnitude to bits 11..9 with ``(v * 9) & FP16_BITS`` (v + v << 3).

The codes of a word are the k-columns an MMA quad's thread ``t`` holds (Marlin's idea): word ``t``
of each 32-element chunk carries k = 2t + h + 8 * (j % 2) + 16 * (j // 2) in lane h of ``r[j]``.
``nvfp4_decode.cuh`` (CUDA) and ``triton_gemm._asm_word`` (Triton) implement ``place_bf16``;
``tests/test_weight_layout.py`` checks that their constants are these.

The bytes are then tiled (``tile_rows``): for each 16-row tile and each 256 k, the 16 rows' 128 code
bytes (and 16 scale bytes) are contiguous, a 2 KB block. A warp of the decode kernel reads 16 rows x
64 bytes per 128-k group: row-major they lie in 16 DRAM pages K/2 bytes apart, tiled in one block,
and a row's 128 bytes still hold two groups, so a load's 128-byte L2 fetch brings the next group as
before. H100: 1-5% faster at M=1, 7-11% at M=8 (benchmarks/NOTES.md v27e). So K is padded to 256 (a layer
with K < 256 stores up to 256 / K times its codes; the layers of LLMs have K in the thousands).
"""

from __future__ import annotations

import functools

import torch

from ..format import pack_e2m1, unpack_e2m1

BF16_BITS = 0x81C081C0  # sign -> bit 15, magnitude -> bits 8..6 of each 16-bit lane
FP16_BITS = 0x8E008E00  # sign -> bit 15, magnitude -> bits 11..9
FP16_MULT = 9  # v * 9 = v | v << 3 for a placed bf16 pair (disjoint bits)
GROUP_SHIFTS = (0, 3, 6)  # r[0..2] = (w << s) & BF16_BITS
GROUP3_BITS = 0x6C006C00  # r[3]'s bits: 10, 11, 13, 14 of each lane
GROUP3_MULT = (1 << 2) | (1 << 8) | (1 << 13)  # = 8452: copies shifted by 2, 8 and 13
CHUNK = 32  # elements per 16-byte chunk (4 words)
TILE_ROWS = 16  # rows of a tile
TILE_K = 256  # elements of a tile row piece
ROW_PADDING = 32  # prepared weights' rows (N) are padded to this (the small-M kernel's 32-row CTAs)
TILE_CODE_BYTES = TILE_K // 2
TILE_SCALE_BYTES = TILE_K // 16
_MASK32 = 0xFFFFFFFF


def place_bf16(words: torch.Tensor) -> list[torch.Tensor]:
    """int64 tensor of 32-bit words -> the four placed bf16x2 bit patterns r[0..3] (before the scale),
    computed with the kernels' instruction sequence."""
    out = [((words << s) & _MASK32) & BF16_BITS for s in GROUP_SHIFTS]
    product = (words & GROUP3_BITS) * GROUP3_MULT  # < 2^46: exact in int64
    out.append(((product & _MASK32) | (product >> 32)) & BF16_BITS)
    return out


@functools.lru_cache(maxsize=None)
def code_bit_positions() -> tuple[tuple[tuple[int, ...], ...], ...]:
    """``[j][h][b]``: the word bit that holds bit b (0 = mantissa, 1, 2 = exponent, 3 = sign) of the
    code in lane h of ``r[j]``; derived by running ``place_bf16`` on every single-bit word."""
    lane_bits = (6, 7, 8, 15)  # where bit b of a code lands in its placed bf16 lane
    where: dict[tuple[int, int, int], int] = {}
    placed = place_bf16(torch.tensor([1 << p for p in range(32)], dtype=torch.int64))
    for p in range(32):
        hits = [(j, h, b) for j in range(4) for h in range(2) for b in range(4)
                if int(placed[j][p]) >> (lane_bits[b] + 16 * h) & 1]
        if len(hits) != 1 or int(sum(placed[j][p] for j in range(4))).bit_count() != 1:
            raise AssertionError(f"word bit {p} is placed {len(hits)} times")
        where[hits[0]] = p
    if len(where) != 32:
        raise AssertionError("the placement does not cover all 32 code bits")
    return tuple(tuple(tuple(where[(j, h, b)] for b in range(4)) for h in range(2)) for j in range(4))


def chunk_k(t: int, j: int, h: int) -> int:
    """Element of a 32-element chunk held by word t, register r[j], lane h."""
    return 2 * t + h + 8 * (j % 2) + 16 * (j // 2)


def _word_fields() -> list[tuple[torch.Tensor, int, int]]:
    """(k of words t = 0..3, code bit b, word bit) for every code bit of a word."""
    pos = code_bit_positions()
    return [(torch.tensor([chunk_k(t, j, h) for t in range(4)]), b, pos[j][h][b])
            for j in range(4) for h in range(2) for b in range(4)]


def to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 codes ``[R, C]`` (uint8, two per byte in k order, C a multiple of 16) -> the same
    codes as ``[R, C]`` bytes of the kernels' words."""
    rows, cols = _check_packed(packed)
    chunks = unpack_e2m1(packed).reshape(rows, cols // 16, CHUNK).to(torch.int32)
    words = torch.zeros(rows, cols // 16, 4, dtype=torch.int32, device=packed.device)
    for k, b, bit in _word_fields():
        words |= ((chunks[:, :, k.to(packed.device)] >> b) & 1) << bit  # int32 wraps at bit 31, as intended
    return _words_to_bytes(words).reshape(rows, cols)


def from_kernel_layout(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_kernel_layout`` (exact)."""
    rows, cols = _check_packed(weight)
    words = _bytes_to_words(weight.reshape(rows, cols // 16, 16))
    chunks = torch.zeros(rows, cols // 16, CHUNK, dtype=torch.int32, device=weight.device)
    for k, b, bit in _word_fields():
        chunks[:, :, k.to(weight.device)] |= ((words >> bit) & 1) << b
    return pack_e2m1(chunks.to(torch.uint8).reshape(rows, cols * 2)).contiguous()


def tile_rows(t: torch.Tensor, piece: int) -> torch.Tensor:
    """Codes ``[Np, Kp/2]`` (``piece`` = TILE_CODE_BYTES) or scales ``[Np, Kp/16]`` (TILE_SCALE_BYTES) of a weight,
    Np a multiple of TILE_ROWS and Kp of TILE_K -> the same shape, the bytes reordered tile by tile as
    ``[Np/16][Kp/256][16 rows][piece]``."""
    tiles, pieces = _tile_shape(t, piece)
    return t.reshape(tiles, TILE_ROWS, pieces, piece).transpose(1, 2).contiguous().reshape(t.shape)


def untile_rows(t: torch.Tensor, piece: int) -> torch.Tensor:
    """Inverse of ``tile_rows`` (exact)."""
    tiles, pieces = _tile_shape(t, piece)
    return t.reshape(tiles, pieces, TILE_ROWS, piece).transpose(1, 2).contiguous().reshape(t.shape)


def tiled_weight_problem(weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                         scale_alignment: int = 2) -> str | None:
    """Why a Hopper kernel cannot read this prepared weight (and its scales, where given); None if it can.
    The kernels compute addresses from the tiling, so both must be whole and contiguous: rows a multiple
    of ROW_PADDING, K of TILE_K, scales ``[Np, Kp/16]``. The weight must be 16-byte aligned and the scales
    ``scale_alignment``-byte aligned (each kernel's widest load: a misaligned one faults the CUDA context)."""
    if weight.dim() != 2:
        return f"the weight must be 2-D, got {tuple(weight.shape)}"
    np_, kp = weight.shape[0], weight.shape[1] * 2
    if np_ % ROW_PADDING or kp % TILE_K or not weight.is_contiguous():
        return (f"the weight must be the contiguous prepared (tiled) weight, its rows a multiple of {ROW_PADDING} "
                f"and its K of {TILE_K}; got {tuple(weight.shape)} with strides {weight.stride()}")
    if weight.data_ptr() % 16:
        return "the weight must be 16-byte aligned"
    if weight_scale is None:
        return None
    if tuple(weight_scale.shape) != (np_, kp // 16) or not weight_scale.is_contiguous():
        return (f"weight_scale must be contiguous [{np_}, {kp // 16}] (the prepared weight's scales), "
                f"got {tuple(weight_scale.shape)} with strides {weight_scale.stride()}")
    if weight_scale.data_ptr() % scale_alignment:
        return f"the weight's scales must be {scale_alignment}-byte aligned"
    return None


def _tile_shape(t: torch.Tensor, piece: int) -> tuple[int, int]:
    if t.dim() != 2 or t.shape[0] % TILE_ROWS or t.shape[1] % piece:
        raise ValueError(f"a tiled weight needs rows a multiple of {TILE_ROWS} and whole {piece}-byte row pieces, "
                         f"got {tuple(t.shape)}")
    return t.shape[0] // TILE_ROWS, t.shape[1] // piece


def _check_packed(packed: torch.Tensor) -> tuple[int, int]:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed codes must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, cols = packed.shape
    if cols % 16:
        raise ValueError(f"the packed row length ({cols} bytes) must be a multiple of 16")
    return rows, cols


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., 4] words -> uint8 [..., 16], little-endian."""
    parts = [((words >> (8 * q)) & 0xFF) for q in range(4)]
    return torch.stack(parts, dim=-1).reshape(*words.shape[:-1], 16).to(torch.uint8)


def _bytes_to_words(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] -> int32 [..., 4] words, little-endian."""
    b = data.reshape(*data.shape[:-1], 4, 4).to(torch.int32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


__all__ = ["BF16_BITS", "FP16_BITS", "FP16_MULT", "GROUP_SHIFTS", "GROUP3_BITS", "GROUP3_MULT",
           "TILE_ROWS", "TILE_K", "ROW_PADDING", "TILE_CODE_BYTES", "TILE_SCALE_BYTES", "place_bf16",
           "code_bit_positions", "chunk_k", "to_kernel_layout", "from_kernel_layout", "tile_rows", "untile_rows",
           "tiled_weight_problem"]
