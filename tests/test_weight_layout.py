"""The Hopper kernels' weight word (ops/weight_layout.py): a bijection of code bits, exact round trip,
the placement decodes every code to its e2m1 value, and the CUDA / Triton decoders use its constants."""

import pathlib
import re

import pytest
import torch

from fp4_compile import format as F
from fp4_compile.ops import weight_layout as WL
from fp4_compile.ops.triton_gemm import _asm_word

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
DECODE_CUH = pathlib.Path(F.__file__).parent / "csrc" / "hopper" / "nvfp4_decode.cuh"


def e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


def test_code_bits_are_a_bijection():
    pos = WL.code_bit_positions()
    flat = [p for j in pos for h in j for p in h]
    assert sorted(flat) == list(range(32))
    # r[0..2] are the shifted copies of the bf16 mask
    for j, s in enumerate(WL.GROUP_SHIFTS):
        assert pos[j] == tuple(tuple(b - s for b in (6 + 16 * h, 7 + 16 * h, 8 + 16 * h, 15 + 16 * h))
                               for h in range(2))


@pytest.mark.parametrize("rows,cols", [(1, 16), (3, 48), (45, 112), (64, 2048)])
def test_round_trip(rows, cols):
    packed = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    words = WL.to_kernel_layout(packed)
    assert words.shape == packed.shape and words.dtype == torch.uint8
    assert torch.equal(WL.from_kernel_layout(words), packed)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="multiple of 16"):
        WL.to_kernel_layout(torch.zeros(2, 24, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        WL.to_kernel_layout(torch.zeros(2, 32, dtype=torch.int32))


def _words(packed: torch.Tensor) -> torch.Tensor:
    b = packed.reshape(-1, 4).to(torch.int64)
    return b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)


def test_placement_decodes_every_word_to_its_codes():
    """place_bf16 on the stored words gives, in lane h of r[j] of word t, the bf16 pattern of
    e2m1(code k) * 2^-126 for k = chunk_k(t, j, h); fp16's (v * 9) & FP16_BITS gives * 2^-14."""
    rows, cols = 8, 256
    packed = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    codes = F.unpack_e2m1(packed).reshape(rows, cols // 16, 32)
    words = _words(WL.to_kernel_layout(packed)).reshape(rows, cols // 16, 4)
    placed = WL.place_bf16(words)
    for j in range(4):
        v = placed[j]
        v16 = (v * WL.FP16_MULT) & 0xFFFFFFFF & WL.FP16_BITS
        for h in range(2):
            bf16 = ((v >> (16 * h)) & 0xFFFF).to(torch.int16).view(torch.bfloat16).double() * 2.0**126
            fp16 = ((v16 >> (16 * h)) & 0xFFFF).to(torch.int16).view(torch.float16).double() * 2.0**14
            for t in range(4):
                want = torch.tensor([[e2m1(int(c)) for c in row] for row in codes[:, :, WL.chunk_k(t, j, h)]],
                                    dtype=torch.float64)
                assert torch.equal(bf16[:, :, t], want)
                assert torch.equal(fp16[:, :, t], want)


def test_every_code_in_every_slot():
    """All 16 codes in each of the 8 slots of a word, the other slots random."""
    pos = WL.code_bit_positions()
    for j in range(4):
        for h in range(2):
            for code in range(16):
                word = int(torch.randint(0, 2**32, (1,), dtype=torch.int64))
                for b in range(4):
                    bit = pos[j][h][b]
                    word = (word & ~(1 << bit)) | (((code >> b) & 1) << bit)
                v = int(WL.place_bf16(torch.tensor([word]))[j])
                lane = (v >> (16 * h)) & 0xFFFF
                got = torch.tensor([lane], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double()
                assert float(got) * 2.0**126 == e2m1(code)


def _cuh_constant(name: str) -> int:
    match = re.search(rf"constexpr uint32_t {name} = (0x[0-9A-Fa-f]+|\d+)u;", DECODE_CUH.read_text())
    assert match, name
    return int(match.group(1), 0)


def test_cuda_decoder_uses_these_constants():
    assert _cuh_constant("kBf16Bits") == WL.BF16_BITS
    assert _cuh_constant("kFp16Bits") == WL.FP16_BITS
    assert _cuh_constant("kFp16Mult") == WL.FP16_MULT
    assert _cuh_constant("kGroup3Bits") == WL.GROUP3_BITS
    rot = re.search(r"constexpr int kGroup3Rot0 = (\d+), kGroup3Rot1 = (\d+), kGroup3Rot2 = (\d+);",
                    DECODE_CUH.read_text())
    assert rot and sum(1 << int(r) for r in rot.groups()) == WL.GROUP3_MULT
    text = DECODE_CUH.read_text()
    assert WL.GROUP_SHIFTS[0] == 0 and "v[0] = w & kBf16Bits;" in text
    for j, s in enumerate(WL.GROUP_SHIFTS[1:], 1):
        assert f"v[{j}] = (w << {s}) & kBf16Bits;" in text
        assert f"v[{j}] = ((w & (kBf16Bits >> {s})) * (kFp16Mult << {s})) & kFp16Bits;" in text


@pytest.mark.parametrize("fp16", [False, True])
def test_triton_decoder_uses_these_constants(fp16):
    asm = _asm_word(fp16)
    assert f"and.b32 t, $4, {WL.GROUP3_BITS:#010x};" in asm and f"mul.wide.u32 p, t, {WL.GROUP3_MULT};" in asm
    for s in WL.GROUP_SHIFTS:
        if fp16:
            assert f"and.b32 t, $4, {WL.BF16_BITS >> s:#010x};" in asm
            assert f"mul.lo.u32 t, t, {WL.FP16_MULT << s};" in asm
        else:
            assert f"shl.b32 t, $4, {s};" in asm
    assert asm.count(f"and.b32 t, t, {WL.BF16_BITS:#010x};") == (1 if fp16 else 4)
    assert asm.count(f"and.b32 t, t, {WL.FP16_BITS:#010x};") == (4 if fp16 else 0)


def test_fp16_shortcut_equals_placement_times_nine():
    """The decoders' fp16 form of r[0..2], ((w & (BF16_BITS >> s)) * (9 << s)) & FP16_BITS, equals
    (place_bf16(w)[j] * 9) & FP16_BITS: the two copies never overlap, so no carries."""
    words = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    placed = WL.place_bf16(words)
    for j, s in enumerate(WL.GROUP_SHIFTS):
        short = ((words & (WL.BF16_BITS >> s)) * (WL.FP16_MULT << s)) & 0xFFFFFFFF & WL.FP16_BITS
        assert torch.equal(short, (placed[j] * WL.FP16_MULT) & 0xFFFFFFFF & WL.FP16_BITS)


def test_rotations_equal_the_multiply():
    """The wgmma kernel gathers r[3] with three rotations (kGroup3Rot), the others with one multiply."""
    words = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    u = words & WL.GROUP3_BITS
    rotations = [s for s in range(32) if WL.GROUP3_MULT >> s & 1]
    rotated = 0
    for s in rotations:
        rotated = rotated | (((u << s) | (u >> (32 - s))) & 0xFFFFFFFF)
    assert len(rotations) == 3 and torch.equal(rotated & WL.BF16_BITS, WL.place_bf16(words)[3])


def _tiled_offset(r: int, c: int, row_len: int, piece: int) -> int:
    """The kernels' address of element c of row r in a tiled view whose rows hold row_len elements
    (triton_gemm.tiled_offsets; nvfp4_decode.cuh's tiled_row + tiled_group with piece in bytes)."""
    return (r // 16) * 16 * row_len + (c // piece) * 16 * piece + (r % 16) * piece + c % piece


@pytest.mark.parametrize("rows,k", [(16, 256), (32, 512), (96, 4096), (64, 1280)])
def test_tiling_round_trip_and_addresses(rows, k):
    """tile_rows is a byte permutation undone by untile_rows, and puts (row r, byte c) where the kernels'
    address arithmetic reads it: for the codes (128-byte pieces; Triton reads 4-byte words, 32 a piece),
    and the scales (16-byte pieces; Triton reads 2-byte pairs, 8 a piece)."""
    codes = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8)
    scales = torch.randint(0, 256, (rows, k // 16), dtype=torch.uint8)
    for t, piece in ((codes, WL.TILE_CODE_BYTES), (scales, WL.TILE_SCALE_BYTES)):
        tiled = WL.tile_rows(t, piece)
        assert tiled.shape == t.shape and torch.equal(WL.untile_rows(tiled, piece), t)
        flat = tiled.flatten()
        for r in sorted({0, 1, 15, min(16, rows - 1), rows - 1}):
            for c in sorted({0, 7, piece - 1, min(piece, t.shape[1] - 1), t.shape[1] - 1}):
                assert flat[_tiled_offset(r, c, t.shape[1], piece)] == t[r, c]
        for unit in (4, 2):  # Triton's int32 words of codes / int16 scale pairs
            if piece % unit == 0 and t.shape[1] % unit == 0:
                view = tiled.view(torch.int32 if unit == 4 else torch.int16).flatten()
                ref = t.contiguous().view(torch.int32 if unit == 4 else torch.int16)
                r, c = rows - 1, ref.shape[1] - 1
                assert view[_tiled_offset(r, c, ref.shape[1], piece // unit)] == ref[r, c]


def test_tiling_rejects_untileable_shapes():
    with pytest.raises(ValueError, match="rows a multiple of 16"):
        WL.tile_rows(torch.zeros(24, 128, dtype=torch.uint8), WL.TILE_CODE_BYTES)
    with pytest.raises(ValueError, match="128-byte row pieces"):
        WL.tile_rows(torch.zeros(32, 96, dtype=torch.uint8), WL.TILE_CODE_BYTES)


def test_tiled_weight_problem_names_what_the_kernels_cannot_read():
    """One check of the prepared weight for both Hopper kernels: the tiling's shape and contiguity, the weight's
    16-byte base and the scales' per-kernel alignment."""
    from fp4_compile.ops.hopper import MARLIN

    weight, scales = MARLIN.prepare_weight(*F.quantize_nvfp4(torch.randn(40, 304), torch.tensor(1.0)))
    assert weight.shape == (64, 256) and scales.shape == (64, 32)
    assert WL.tiled_weight_problem(weight) is None
    assert WL.tiled_weight_problem(weight, scales, scale_alignment=4) is None
    raw = scales.view(torch.uint8)
    bad = {
        "2-D": (weight.flatten(), None, 2),
        "rows a multiple of 32": (weight[:48], None, 2),
        "K of 256": (weight[:, :64], None, 2),
        "16-byte aligned": (torch.zeros(weight.numel() + 8, dtype=torch.uint8)[8:].view(weight.shape), None, 2),
        "weight_scale must be contiguous": (weight, raw[:, :16], 2),
        "must be contiguous \\[64, 32\\]": (weight, raw.t().contiguous().t(), 2),
        "2-byte aligned": (weight, torch.zeros(raw.numel() + 1, dtype=torch.uint8)[1:].view(raw.shape), 2),
        "4-byte aligned": (weight, torch.zeros(raw.numel() + 2, dtype=torch.uint8)[2:].view(raw.shape), 4),
    }
    for expected, (w, s, alignment) in bad.items():
        problem = WL.tiled_weight_problem(w, s, scale_alignment=alignment)
        assert problem is not None and re.search(expected, problem), (expected, problem)
