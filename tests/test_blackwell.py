"""Blackwell backends (fp4_compile/ops/blackwell.py), tested on the CPU.

No Blackwell GPU exists where these run: the weight layouts are checked against their
inverses and against independent re-derivations of FlashInfer's algorithms; the GEMM
dispatch is checked by replacing each library callee with a recording fake (never a real
kernel); availability is checked with a simulated compute capability; the CUTLASS kernel
source is compile-checked for sm_100a wherever nvcc and CUTLASS headers exist.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
import types

import pytest
import torch

import background_jobs
import fp4_compile  # noqa: F401  (registers torch.ops.fp4)
from fp4_compile import backends
from fp4_compile import format as fmt
from fp4_compile.ops import blackwell as bw
from fp4_compile.ops.reference import EMULATION

NAMES = bw.BACKEND_NAMES
# (N, K): N < 128, N not a multiple of 32 or 128, K not a multiple of 32, one 128-aligned case.
SHAPES = [(1, 16), (7, 48), (31, 16), (32, 32), (100, 48), (128, 64), (129, 272), (200, 512), (257, 80)]


def random_linear_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes for both (every e2m1 code pair, every e4m3 byte incl. NaN)."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scales = torch.randint(0, 256, (n, k // 16), dtype=torch.uint8).view(torch.float8_e4m3fn)
    return packed, scales


def quantized_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k) * torch.rand(n, 1) * 3
    gs = fmt.global_scale_from_amax(w.abs().amax()).reshape(1)
    packed, scales = fmt.quantize_nvfp4(w, gs)
    return packed, scales, gs


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def expected_rows(name: str, n: int) -> int:
    return fmt.round_up(n, 128 if name == "flashinfer-trtllm" else 32)


# ---------------------------------------------------------------------------------------
# import hygiene


def test_import_loads_no_library():
    code = (
        "import sys, fp4_compile, fp4_compile.ops.blackwell as b\n"
        "from fp4_compile import backends\n"
        "[b.availability(n, 'cpu') for n in b.BACKEND_NAMES]; backends.describe_backends('cpu')\n"
        "libs = ('flashinfer', 'fbgemm_gpu', 'cutlass_library', 'cudnn')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in libs]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_kernels_objects_are_where_backends_looks():
    for backend in backends.SPECS:
        if backend.value in NAMES:
            kernels = backends.kernels_for(backend)
            assert kernels is bw.KERNELS[backend.value] is bw.kernels(backend)
            assert kernels.name == backend.value


# ---------------------------------------------------------------------------------------
# weight layouts: prepare_weight / restore_weight


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_prepare_restore_roundtrip(name, n, k, seed):
    kernels = bw.KERNELS[name]
    packed, scales = random_linear_weight(n, k)
    weight, weight_scale = kernels.prepare_weight(packed, scales)

    np_, kp = expected_rows(name, n), fmt.round_up(k, 32)
    assert weight.dtype == torch.uint8 and tuple(weight.shape) == (np_, kp // 2) and weight.is_contiguous()
    mp, kb = fmt.swizzled_scale_shape(np_, kp)
    if name == "fbgemm":
        assert weight_scale.dtype == torch.uint8 and tuple(weight_scale.shape) == (mp * kb,)
    else:
        assert weight_scale.dtype == torch.float8_e4m3fn and tuple(weight_scale.shape) == (mp, kb)
    assert weight_scale.is_contiguous()

    back_packed, back_scales = kernels.restore_weight(weight, weight_scale, n, k)
    assert back_packed.dtype == torch.uint8 and back_scales.dtype == torch.float8_e4m3fn
    assert torch.equal(back_packed, packed)
    assert torch.equal(u8(back_scales), u8(scales))

    # Everything outside the real weight is zero (padding rows/columns, scale tiles).
    full_packed, full_scales = kernels.restore_weight(weight, weight_scale, np_, kp)
    assert torch.equal(full_packed[:n, : k // 2], packed)
    assert int(full_packed[n:].count_nonzero()) == 0 and int(full_packed[:, k // 2 :].count_nonzero()) == 0
    assert int(u8(full_scales)[n:].count_nonzero()) == 0
    assert int(u8(full_scales)[:, k // 16 :].count_nonzero()) == 0
    # ... and nothing beyond them either (the scale tiles' rows past N, columns past K/16)
    assert int(u8(weight_scale).count_nonzero()) == int(u8(scales).count_nonzero())
    assert int(weight.count_nonzero()) == int(packed.count_nonzero())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "flashinfer-trtllm"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_unshuffled_backends_use_the_reference_layout(name, n, k, seed):
    packed, scales = random_linear_weight(n, k)
    weight, weight_scale = bw.KERNELS[name].prepare_weight(packed, scales)
    ref_packed, ref_scales = fmt.pad_weight_for_alignment(packed, scales, 32)
    assert torch.equal(weight, ref_packed)
    assert torch.equal(u8(weight_scale).reshape(-1), u8(fmt.swizzle_blockscale(ref_scales)).reshape(-1))


def test_prepare_weight_rejects_bad_inputs(seed):
    packed, scales = random_linear_weight(64, 64)
    for kernels in bw.KERNELS.values():
        with pytest.raises(TypeError):
            kernels.prepare_weight(packed.view(torch.int8), scales)
        with pytest.raises(TypeError):
            kernels.prepare_weight(packed, scales.view(torch.uint8))
        with pytest.raises(ValueError):
            kernels.prepare_weight(packed, scales[:, :2])


# ---------------------------------------------------------------------------------------
# FlashInfer TRT-LLM shuffle: an independent re-derivation of FlashInfer's algorithm

# flashinfer/utils.py: srcToDstBlk16RowMap / srcToDstBlk32RowMap, copied as literals.
SRC_TO_DST_BLK16 = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
SRC_TO_DST_BLK32 = [
    0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
    4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31,
]  # fmt: skip


def flashinfer_row_indices(rows: int, epilogue_tile_m: int) -> list[int]:
    """get_shuffle_matrix_a_row_indices, as documented: source row r goes to
    (r // B) * B + map[r % B]; row_indices[destination] = source."""
    block, row_map = (32, SRC_TO_DST_BLK32) if epilogue_tile_m % 128 == 0 else (16, SRC_TO_DST_BLK16)
    assert rows % block == 0
    out = [None] * rows
    for src in range(rows):
        out[(src // block) * block + row_map[src % block]] = src
    return out


def interleave_128x4(linear: torch.Tensor) -> torch.Tensor:
    """block_scale_interleave (TRT-LLM get_sf_out_offset_128x4) by its offset formula,
    element by element, zero padding: a flat uint8 buffer."""
    rows, cols = linear.shape
    kp = fmt.round_up(cols, 4)
    out = torch.zeros(fmt.round_up(rows, 128) * kp, dtype=torch.uint8)
    src = u8(linear)
    for m in range(rows):
        for k in range(cols):
            off = ((m // 128) * (kp // 4) + k // 4) * 512 + (m % 32) * 16 + ((m // 32) % 4) * 4 + k % 4
            out[off] = src[m, k]
    return out


@pytest.mark.parametrize("rows", [32, 64, 96, 128, 160, 384])
@pytest.mark.parametrize("tile", [128, 256, 64])
def test_trtllm_row_indices_match_flashinfer_algorithm(rows, tile):
    if tile % 128 and rows % 16:
        pytest.skip("16-row blocks")
    idx = bw.trtllm_shuffle_row_indices(rows, tile)
    assert idx.tolist() == flashinfer_row_indices(rows, tile)
    inv = bw.trtllm_unshuffle_row_indices(rows, tile)
    assert torch.equal(idx[inv], torch.arange(rows)) and torch.equal(inv[idx], torch.arange(rows))


def test_trtllm_row_indices_reject_unaligned_rows():
    with pytest.raises(ValueError):
        bw.trtllm_shuffle_row_indices(48, 128)


@pytest.mark.parametrize("n,k", [(7, 48), (100, 48), (128, 64), (129, 80), (257, 32)])
def test_trtllm_layout_matches_independent_derivation(n, k, seed):
    packed, scales = random_linear_weight(n, k)
    weight, weight_scale = bw.FLASHINFER_TRTLLM.prepare_weight(packed, scales)
    # FlashInfer's input: the checkpoint weight zero-padded to K % 32 and rows % 128.
    rows, kp = fmt.round_up(n, 128), fmt.round_up(k, 32)
    padded = torch.zeros(rows, kp // 2, dtype=torch.uint8)
    padded[:n, : k // 2] = packed
    padded_sf = torch.zeros(rows, kp // 16, dtype=torch.uint8)
    padded_sf[:n, : k // 16] = u8(scales)
    order = flashinfer_row_indices(rows, 128)
    # shuffle_matrix_a: input[row_indices]
    assert torch.equal(weight, padded[order])
    # shuffle_matrix_sf_a: block_scale_interleave(input[row_indices]), flat
    assert torch.equal(u8(weight_scale).reshape(-1), interleave_128x4(padded_sf[order]))


def test_trtllm_against_flashinfer_shuffle_matrix_a(seed):
    flashinfer = pytest.importorskip("flashinfer")
    for n, k in [(128, 64), (100, 48), (384, 272)]:
        packed, scales = random_linear_weight(n, k)
        weight, _ = bw.FLASHINFER_TRTLLM.prepare_weight(packed, scales)
        rows, kp = fmt.round_up(n, 128), fmt.round_up(k, 32)
        padded = torch.zeros(rows, kp // 2, dtype=torch.uint8)
        padded[:n, : k // 2] = packed
        assert torch.equal(weight, flashinfer.shuffle_matrix_a(padded, 128))


@pytest.mark.gpu
def test_trtllm_against_flashinfer_shuffle_matrix_sf_a(seed):
    flashinfer = pytest.importorskip("flashinfer")
    for n, k in [(128, 64), (100, 48), (384, 272)]:
        packed, scales = random_linear_weight(n, k)
        _, weight_scale = bw.FLASHINFER_TRTLLM.prepare_weight(packed.cuda(), scales.cuda())
        rows, kp = fmt.round_up(n, 128), fmt.round_up(k, 32)
        padded_sf = torch.zeros(rows, kp // 16, dtype=torch.uint8, device="cuda")
        padded_sf[:n, : k // 16] = u8(scales).cuda()
        theirs = flashinfer.shuffle_matrix_sf_a(padded_sf, 128)
        assert torch.equal(u8(weight_scale).reshape(-1).cpu(), theirs.reshape(-1).cpu())


# ---------------------------------------------------------------------------------------
# GEMM dispatch with recording fakes (no kernel runs)


def reference_gemm(a, a_scale_swizzled, weight, weight_scale_swizzled, alpha) -> torch.Tensor:
    """What every NVFP4 GEMM computes, from its kernel-format operands, in float32."""
    m, kp = a.shape[0], a.shape[1] * 2
    n = weight.shape[0]
    def linear(swizzled: torch.Tensor, rows: int) -> torch.Tensor:
        tiles = swizzled.view(torch.float8_e4m3fn).reshape(fmt.swizzled_scale_shape(rows, kp))
        return fmt.unswizzle_blockscale(tiles, rows, kp)

    sa, sw = linear(a_scale_swizzled, m), linear(weight_scale_swizzled, n)
    return (fmt.block_values(a, sa) @ fmt.block_values(weight, sw).t()) * alpha.reshape(())


class Recorder:
    def __init__(self):
        self.calls = []


def operands(n: int, k: int, m: int, name: str):
    packed, scales, w_gs = quantized_weight(n, k)
    weight, weight_scale = bw.KERNELS[name].prepare_weight(packed, scales)
    x = torch.randn(m, k)
    x_gs = fmt.global_scale_from_amax(x.abs().amax()).reshape(1)
    a, a_scale = fmt.quantize_nvfp4(x, x_gs, swizzle=True)
    a = fmt.pad_activation_for_alignment(a, weight.shape[1] * 2)
    alpha = torch.reciprocal(x_gs * w_gs)
    return dict(
        packed=packed, scales=scales, weight=weight, weight_scale=weight_scale, a=a, a_scale=a_scale, alpha=alpha
    )


def install_flashinfer_fake(monkeypatch, rec: Recorder):
    def mm_fp4(a, b, a_descale, b_descale, alpha, out_dtype, **kwargs):
        rec.calls.append(
            dict(a=a, b=b, a_descale=a_descale, b_descale=b_descale, alpha=alpha, out_dtype=out_dtype, **kwargs)
        )
        weight, weight_scale = b.t(), b_descale.t()
        if kwargs["backend"] == "trtllm":  # the kernel reads rows shuffled for epilogue_tile_m=128
            n, kp = weight.shape[0], weight.shape[1] * 2
            packed, linear = bw.FLASHINFER_TRTLLM.restore_weight(weight, weight_scale, n, kp)
            weight, weight_scale = packed, fmt.swizzle_blockscale(linear)
        return reference_gemm(a, a_descale, weight, weight_scale, alpha).to(out_dtype)

    monkeypatch.setattr(bw, "_flashinfer_mm_fp4", lambda: mm_fp4)


class FakeFbgemmOp:
    def __init__(self, rec: Recorder, argument_names):
        self.rec = rec
        self.default = types.SimpleNamespace(
            _schema=types.SimpleNamespace(arguments=[types.SimpleNamespace(name=a) for a in argument_names])
        )

    def __call__(self, xq, wq, x_scale, w_scale, **kwargs):
        self.rec.calls.append(dict(xq=xq, wq=wq, x_scale=x_scale, w_scale=w_scale, **kwargs))
        return reference_gemm(xq, x_scale, wq, w_scale, kwargs["global_scale"]).to(torch.bfloat16)


FBGEMM_SCHEMAS = {
    "old": ["XQ", "WQ", "x_scale", "w_scale", "global_scale", "use_mx"],
    "new": ["XQ", "WQ", "x_scale", "w_scale", "output", "global_scale"],
}


def install_cutlass_fake(monkeypatch, rec: Recorder):
    def nvfp4_mm(a, w, sfa, sfw, alpha, out_dtype):
        rec.calls.append(dict(a=a, w=w, sfa=sfa, sfw=sfw, alpha=alpha, out_dtype=out_dtype))
        return reference_gemm(a, sfa, w, sfw, alpha).to(out_dtype)

    monkeypatch.setattr(bw, "_cutlass_op", lambda: nvfp4_mm)


def install_cublas_fake(monkeypatch, rec: Recorder):
    def scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, swizzle_a=None, swizzle_b=None, **kwargs):
        rec.calls.append(
            dict(mat_a=mat_a, mat_b=mat_b, scale_a=scale_a, recipe_a=recipe_a, scale_b=scale_b, recipe_b=recipe_b,
                 swizzle_a=swizzle_a, swizzle_b=swizzle_b, **kwargs)
        )  # fmt: skip
        alpha = scale_a[1] * scale_b[1]
        out = reference_gemm(mat_a.view(torch.uint8), scale_a[0], mat_b.t().view(torch.uint8), scale_b[0], alpha)
        return out.to(kwargs["output_dtype"])

    monkeypatch.setattr(torch.nn.functional, "scaled_mm", scaled_mm)


def install_fake(name: str, monkeypatch, rec: Recorder, fbgemm_schema: str = "new"):
    if name.startswith("flashinfer-"):
        install_flashinfer_fake(monkeypatch, rec)
    elif name == "fbgemm":
        monkeypatch.setattr(bw, "_fbgemm_f4f4bf16", lambda: FakeFbgemmOp(rec, FBGEMM_SCHEMAS[fbgemm_schema]))
    elif name == "cutlass":
        install_cutlass_fake(monkeypatch, rec)
    else:
        install_cublas_fake(monkeypatch, rec)


@pytest.mark.parametrize("name", ["flashinfer-cutlass", "flashinfer-trtllm", "flashinfer-cudnn"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_dispatch(name, out_dtype, monkeypatch, seed):
    rec = Recorder()
    install_flashinfer_fake(monkeypatch, rec)
    ops = operands(100, 48, 5, name)
    out = bw.KERNELS[name].mm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"], out_dtype)
    (call,) = rec.calls
    assert call["backend"] == name.removeprefix("flashinfer-")
    assert set(call) == {"a", "b", "a_descale", "b_descale", "alpha", "out_dtype", "backend"}
    # a [M, Kp/2] uint8 as given; b = weight.t() (column-major [Kp/2, Np], no copy)
    assert call["a"].dtype == torch.uint8 and torch.equal(call["a"], ops["a"])
    assert call["b"].dtype == torch.uint8 and tuple(call["b"].shape) == (32, ops["weight"].shape[0])
    assert call["b"].data_ptr() == ops["weight"].data_ptr() and call["b"].t().is_contiguous()
    # scales: uint8 views, a's swizzled [128, 4]; b's transposed view of the weight scales
    assert call["a_descale"].dtype == torch.uint8 and tuple(call["a_descale"].shape) == (128, 4)
    assert torch.equal(call["a_descale"], u8(ops["a_scale"]))
    assert call["b_descale"].dtype == torch.uint8 and torch.equal(call["b_descale"].t(), u8(ops["weight_scale"]))
    assert call["alpha"] is ops["alpha"] and call["alpha"].dtype == torch.float32
    # trtllm makes bf16 only: asked for fp16, it computes bf16 and casts
    native = out_dtype if out_dtype in bw.NATIVE_OUT_DTYPES[name] else torch.bfloat16
    assert call["out_dtype"] == native
    assert out.dtype == out_dtype and tuple(out.shape) == (5, ops["weight"].shape[0])


@pytest.mark.parametrize("schema", ["old", "new"])
def test_fbgemm_dispatch(schema, monkeypatch, seed):
    rec = Recorder()
    install_fake("fbgemm", monkeypatch, rec, schema)
    ops = operands(64, 96, 3, "fbgemm")
    out = bw.FBGEMM.mm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"], torch.float16)
    (call,) = rec.calls
    assert torch.equal(call["xq"], ops["a"]) and call["wq"] is ops["weight"]
    assert call["x_scale"].dtype == torch.uint8 and call["x_scale"].dim() == 1
    assert torch.equal(call["x_scale"], u8(ops["a_scale"]).reshape(-1))
    assert call["w_scale"].dtype == torch.uint8 and torch.equal(call["w_scale"], ops["weight_scale"])
    assert call["global_scale"] is ops["alpha"]
    if schema == "old":
        assert call["use_mx"] is False
    else:
        assert "use_mx" not in call
    assert out.dtype == torch.float16 and tuple(out.shape) == (3, 64)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cublas_dispatch(out_dtype, monkeypatch, seed):
    rec = Recorder()
    install_cublas_fake(monkeypatch, rec)
    ops = operands(96, 80, 7, "cublas")
    out = bw.CUBLAS.mm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"], out_dtype)
    (call,) = rec.calls
    F = torch.nn.functional
    assert call["mat_a"].dtype == torch.float4_e2m1fn_x2 and tuple(call["mat_a"].shape) == (7, 48)
    assert call["mat_b"].dtype == torch.float4_e2m1fn_x2 and tuple(call["mat_b"].shape) == (48, 96)
    assert call["mat_b"].data_ptr() == ops["weight"].data_ptr() and call["mat_b"].t().is_contiguous()
    assert call["scale_a"][0] is ops["a_scale"] and call["scale_a"][0].dtype == torch.float8_e4m3fn
    assert call["scale_b"][0] is ops["weight_scale"]
    assert torch.equal(call["scale_a"][1], ops["alpha"]) and call["scale_b"][1].tolist() == [1.0]
    assert call["recipe_a"] == call["recipe_b"] == [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise]
    assert call["swizzle_a"] == call["swizzle_b"] == [F.SwizzleType.SWIZZLE_32_4_4, F.SwizzleType.NO_SWIZZLE]
    assert call["output_dtype"] == out_dtype and out.dtype == out_dtype


def test_cublas_call_passes_torch_checks_on_meta(seed):
    """The real torch.nn.functional.scaled_mm (meta kernel): shapes, dtypes, scale sizes."""
    for n, k, m in [(96, 80, 7), (256, 512, 130), (32, 32, 1)]:
        packed, scales, _ = quantized_weight(n, k)
        weight, weight_scale = bw.CUBLAS.prepare_weight(packed, scales)
        kp = weight.shape[1] * 2
        a = torch.empty(m, kp // 2, dtype=torch.uint8, device="meta")
        a_scale = torch.empty(fmt.swizzled_scale_shape(m, kp), dtype=torch.float8_e4m3fn, device="meta")
        alpha = torch.empty(1, dtype=torch.float32, device="meta")
        out = bw.cublas_mm(a, a_scale, weight.to("meta"), weight_scale.to("meta"), alpha, torch.bfloat16)
        assert tuple(out.shape) == (m, weight.shape[0]) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("functional", [True, False])
def test_cublas_accepts_uint8_scale_views_on_meta(functional, monkeypatch, seed):
    """fp4::mm accepts uint8 views of the scales; torch's NVFP4 recipe checks (real meta
    kernels of scaled_mm and _scaled_mm) accept only float8_e4m3fn, so cublas_mm retypes them."""
    if not functional:
        monkeypatch.delattr(torch.nn.functional, "scaled_mm")
    packed, scales, _ = quantized_weight(96, 80)
    weight, weight_scale = bw.CUBLAS.prepare_weight(packed, scales)
    m, kp = 7, weight.shape[1] * 2
    a = torch.empty(m, kp // 2, dtype=torch.uint8, device="meta")
    a_scale = torch.empty(fmt.swizzled_scale_shape(m, kp), dtype=torch.uint8, device="meta")
    alpha = torch.empty(1, dtype=torch.float32, device="meta")
    out = bw.cublas_mm(a, a_scale, weight.to("meta"), u8(weight_scale).to("meta"), alpha, torch.bfloat16)
    assert tuple(out.shape) == (m, weight.shape[0]) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["flashinfer-cutlass", "flashinfer-trtllm", "flashinfer-cudnn"])
def test_flashinfer_gets_2d_scales_from_flat_ones(name, monkeypatch, seed):
    """FlashInfer's cuDNN runner derives its graph from 2-D scale shapes (vLLM asserts ndim == 2);
    mm accepts flat 128x4 scales by size, so flashinfer_mm restores the 2-D shape."""
    rec = Recorder()
    install_flashinfer_fake(monkeypatch, rec)
    ops = operands(100, 48, 5, name)
    flat_a, flat_w = u8(ops["a_scale"]).reshape(-1), u8(ops["weight_scale"]).reshape(-1)
    out = bw.KERNELS[name].mm(ops["a"], flat_a, ops["weight"], flat_w, ops["alpha"], torch.bfloat16)
    (call,) = rec.calls
    np_ = ops["weight"].shape[0]
    assert tuple(call["a_descale"].shape) == fmt.swizzled_scale_shape(5, 64)
    assert tuple(call["b_descale"].t().shape) == fmt.swizzled_scale_shape(np_, 64)
    assert torch.equal(call["b_descale"].t(), u8(ops["weight_scale"]))
    assert tuple(out.shape) == (5, np_)


def test_cublas_fallback_without_functional_scaled_mm(monkeypatch, seed):
    monkeypatch.delattr(torch.nn.functional, "scaled_mm")
    rec = Recorder()

    def _scaled_mm(mat_a, mat_b, scale_a, scale_b, **kwargs):
        rec.calls.append(dict(mat_a=mat_a, mat_b=mat_b, scale_a=scale_a, scale_b=scale_b, **kwargs))
        return reference_gemm(mat_a.view(torch.uint8), scale_a, mat_b.t().view(torch.uint8), scale_b, torch.ones(1))

    monkeypatch.setattr(torch, "_scaled_mm", _scaled_mm)
    ops = operands(64, 64, 4, "cublas")
    out = bw.CUBLAS.mm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"], torch.bfloat16)
    (call,) = rec.calls
    assert call["out_dtype"] == torch.float32 and call["mat_a"].dtype == torch.float4_e2m1fn_x2
    expected = reference_gemm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"])
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_cutlass_dispatch(out_dtype, monkeypatch, seed):
    rec = Recorder()
    install_cutlass_fake(monkeypatch, rec)
    ops = operands(40, 48, 9, "cutlass")
    out = bw.CUTLASS.mm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"], out_dtype)
    (call,) = rec.calls
    assert torch.equal(call["a"], ops["a"]) and call["w"] is ops["weight"]
    assert call["sfa"].dtype == torch.float8_e4m3fn and torch.equal(u8(call["sfa"]), u8(ops["a_scale"]))
    assert call["sfw"] is ops["weight_scale"] and call["alpha"] is ops["alpha"]
    assert call["out_dtype"] == out_dtype and out.dtype == out_dtype and tuple(out.shape) == (9, 64)


def test_cutlass_float32_output_is_computed_in_bf16(monkeypatch, seed):
    rec = Recorder()
    install_cutlass_fake(monkeypatch, rec)
    ops = operands(32, 32, 2, "cutlass")
    out = bw.CUTLASS.mm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"], torch.float32)
    assert rec.calls[0]["out_dtype"] == torch.bfloat16 and out.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,m", [(100, 48, 5), (7, 16, 1), (257, 272, 33)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_emulation_through_fakes(name, dtype, n, k, m, with_bias, monkeypatch, seed):
    """quantize + pad K + GEMM + slice + bias around each callee equals the emulation."""
    rec = Recorder()
    install_fake(name, monkeypatch, rec)
    packed, scales, w_gs = quantized_weight(n, k)
    x = torch.randn(m, k).to(dtype)
    x_gs = fmt.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    alpha = torch.reciprocal(x_gs * w_gs)
    bias = torch.randn(n).to(dtype) if with_bias else None
    weight, weight_scale = bw.KERNELS[name].prepare_weight(packed, scales)
    out = bw.KERNELS[name].linear(x, weight, weight_scale, x_gs, alpha, bias, n)
    ref = EMULATION.linear(x, *EMULATION.prepare_weight(packed, scales), x_gs, alpha, bias, n)
    assert len(rec.calls) == 1
    assert out.dtype == dtype and tuple(out.shape) == (m, n)
    if dtype in bw.NATIVE_OUT_DTYPES[name]:
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(out, ref, **tol)
    else:  # computed in bf16, then cast
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", NAMES)
def test_mm_rejects_unpadded_or_linear_activation_scales(name, monkeypatch, seed):
    rec = Recorder()
    install_fake(name, monkeypatch, rec)
    ops = operands(64, 48, 3, name)  # K=48 -> padded to 64
    unpadded = ops["a"][:, :24].contiguous()
    with pytest.raises(ValueError, match="pad_k"):
        bw.KERNELS[name].mm(unpadded, ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"], torch.bfloat16)
    linear_scales = torch.zeros(3, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="swizzled"):
        bw.KERNELS[name].mm(ops["a"], linear_scales, ops["weight"], ops["weight_scale"], ops["alpha"], torch.bfloat16)
    assert not rec.calls


@pytest.mark.parametrize("name", NAMES)
def test_mm_hands_the_libraries_16_byte_aligned_activations(name, monkeypatch, seed):
    """Activation codes and scales that are contiguous views at an odd offset (contiguous() keeps them as they are;
    on Hopper such a row faulted the quantization kernel, NOTES.md v49) reach the libraries copied, aligned."""
    rec = Recorder()
    install_fake(name, monkeypatch, rec)
    ops = operands(64, 64, 1, name)

    def misaligned(t):
        flat = torch.zeros(t.numel() * t.element_size() + 8, dtype=torch.uint8)
        view = flat[8:].view(t.dtype).view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 == 8
        return view

    out = bw.KERNELS[name].mm(misaligned(ops["a"]), misaligned(ops["a_scale"]), ops["weight"], ops["weight_scale"],
                              ops["alpha"], torch.bfloat16)
    (call,) = rec.calls
    assert all(v.data_ptr() % 16 == 0 for v in call.values() if isinstance(v, torch.Tensor) and v.numel())
    expected = bw.KERNELS[name].mm(ops["a"], ops["a_scale"], ops["weight"], ops["weight_scale"], ops["alpha"],
                                   torch.bfloat16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", NAMES)
def test_mm_empty_batch_calls_nothing(name, monkeypatch, seed):
    rec = Recorder()
    install_fake(name, monkeypatch, rec)
    ops = operands(64, 64, 1, name)
    a = ops["a"][:0]
    a_scale = torch.empty(0, 4, dtype=torch.float8_e4m3fn)
    out = bw.KERNELS[name].mm(a, a_scale, ops["weight"], ops["weight_scale"], ops["alpha"], torch.bfloat16)
    assert tuple(out.shape) == (0, ops["weight"].shape[0]) and not rec.calls


@pytest.mark.parametrize("name", NAMES)
def test_fp4_ops_dispatch_to_blackwell_kernels(name, monkeypatch, seed):
    """torch.ops.fp4.mm / fp4.linear with a backend string reach that backend's callee only."""
    recorders = {n: Recorder() for n in NAMES}
    install_flashinfer_fake(monkeypatch, recorders["flashinfer-cutlass"])  # one mm_fp4 for all three
    monkeypatch.setattr(bw, "_fbgemm_f4f4bf16", lambda: FakeFbgemmOp(recorders["fbgemm"], FBGEMM_SCHEMAS["new"]))
    install_cutlass_fake(monkeypatch, recorders["cutlass"])
    install_cublas_fake(monkeypatch, recorders["cublas"])
    packed, scales, w_gs = quantized_weight(40, 48)
    weight, weight_scale = bw.KERNELS[name].prepare_weight(packed, scales)
    x = torch.randn(6, 48, dtype=torch.bfloat16)
    x_gs = fmt.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    alpha = torch.reciprocal(x_gs * w_gs)
    out = torch.ops.fp4.linear(x, weight, weight_scale, x_gs, alpha, None, 40, name)
    a, a_scale = torch.ops.fp4.quantize(x, x_gs, True)
    out2 = torch.ops.fp4.mm(torch.ops.fp4.pad_k(a, 64), a_scale, weight, weight_scale, alpha, x.dtype, name)
    assert tuple(out.shape) == (6, 40) and tuple(out2.shape) == (6, weight.shape[0])
    torch.testing.assert_close(out2[:, :40], out)
    called = "flashinfer-cutlass" if name.startswith("flashinfer-") else name
    assert {n: len(r.calls) for n, r in recorders.items()} == {n: 2 if n == called else 0 for n in NAMES}
    if called == "flashinfer-cutlass":
        assert [c["backend"] for c in recorders[called].calls] == [name.removeprefix("flashinfer-")] * 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("static_scale", [True, False])
def test_layer_eager_chain_with_blackwell_layout(name, static_scale, monkeypatch, seed):
    """NVFP4Linear re-laid out for a Blackwell backend (availability bypassed on the CPU):
    its eager chain through the fake callee equals the emulation, and its checkpoint
    weight is unchanged."""
    from fp4_compile import NVFP4Linear, convert_to_kernel_format

    rec = Recorder()
    install_fake(name, monkeypatch, rec)
    linear = torch.nn.Linear(80, 100, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 80, dtype=torch.bfloat16)
    input_gs = fmt.global_scale_from_amax(x.float().abs().amax()) if static_scale else None
    layer = NVFP4Linear.from_linear(linear, backend="emulation", input_global_scale=input_gs)
    packed, scales = layer.linear_weight()
    ref = layer(x)
    convert_to_kernel_format(name, layer)
    assert layer.backend.value == name and layer.weight.shape[0] == expected_rows(name, 100)
    out = layer(x)
    assert len(rec.calls) == 1 and out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    back_packed, back_scales = layer.linear_weight()
    assert torch.equal(back_packed, packed) and torch.equal(u8(back_scales), u8(scales))


# ---------------------------------------------------------------------------------------
# availability and selection


@pytest.mark.parametrize("name", NAMES)
def test_cpu_selection_raises_backend_error(name):
    with pytest.raises(backends.BackendError) as info:
        backends.resolve_backend(name, "cpu")
    message = str(info.value)
    assert name in message and "sm_100" in message


@pytest.mark.parametrize("name", NAMES)
def test_availability_on_cpu_names_what_is_missing(name):
    reason = bw.availability(name, "cpu")
    assert reason is not None and "device is cpu" in reason and "Blackwell" in reason
    if name.startswith("flashinfer-") and importlib.util.find_spec("flashinfer") is None:
        assert "flashinfer-python is not installed" in reason
    if name == "fbgemm" and importlib.util.find_spec("fbgemm_gpu") is None:
        assert "fbgemm-gpu-genai is not installed" in reason
    if name in ("cublas", "cutlass") and torch.version.cuda is None:
        assert "CPU-only build" in reason


def test_availability_rejects_unknown_backend():
    with pytest.raises(ValueError):
        bw.availability("marlin", "cpu")


@pytest.fixture
def simulated_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, on the CPU."""
    state = {"cap": (10, 0)}
    monkeypatch.setattr(bw, "_capability", lambda device: state["cap"])
    return state


def fake_installed(monkeypatch, installed: set[str]):
    real = bw._find_spec

    def find_spec(module):
        if module in installed:
            return importlib.machinery.ModuleSpec(module, None, is_package=True)
        if module.split(".")[0] in {"flashinfer", "fbgemm_gpu", "flashinfer_jit_cache", "cudnn"}:
            return None
        return real(module)

    monkeypatch.setattr(bw, "_find_spec", find_spec)


@pytest.mark.parametrize("cap", [(9, 0), (8, 9), (12, 0)])
@pytest.mark.parametrize("name", NAMES)
def test_non_blackwell_capabilities_refused(cap, name, simulated_gpu):
    simulated_gpu["cap"] = cap
    reason = bw.availability(name, "cuda:0")
    assert reason is not None and f"sm_{cap[0]}{cap[1]}" in reason and "Blackwell" in reason


def test_sm103_and_sm100_device_checks(simulated_gpu):
    for cap in [(10, 0), (10, 3)]:
        simulated_gpu["cap"] = cap
        for name in NAMES:
            assert bw._device_reason(name, torch.device("cuda")) is None
    simulated_gpu["cap"] = (10, 7)
    assert bw._device_reason("cutlass", torch.device("cuda")) is not None
    assert bw._device_reason("fbgemm", torch.device("cuda")) is not None
    assert bw._device_reason("flashinfer-trtllm", torch.device("cuda")) is None


def test_flashinfer_availability_logic(simulated_gpu, monkeypatch):
    fake_installed(monkeypatch, {"flashinfer", "cudnn"})
    monkeypatch.setattr(bw, "nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    for name in ("flashinfer-cutlass", "flashinfer-trtllm", "flashinfer-cudnn"):
        assert bw.availability(name, "cuda") is None
    monkeypatch.setattr(bw, "nvcc_path", lambda: None)
    assert "nvcc" in bw.availability("flashinfer-cutlass", "cuda")
    assert "nvcc" in bw.availability("flashinfer-trtllm", "cuda")
    assert bw.availability("flashinfer-cudnn", "cuda") is None  # cuDNN needs no JIT
    fake_installed(monkeypatch, {"flashinfer", "flashinfer_jit_cache"})
    assert bw.availability("flashinfer-cutlass", "cuda") is None
    assert "nvidia-cudnn-frontend" in bw.availability("flashinfer-cudnn", "cuda")
    fake_installed(monkeypatch, set())
    assert "flashinfer-python is not installed" in bw.availability("flashinfer-cudnn", "cuda")


def test_fbgemm_availability_logic(simulated_gpu, monkeypatch, tmp_path):
    root = tmp_path / "fbgemm_gpu"
    (root / "experimental" / "gen_ai").mkdir(parents=True)
    monkeypatch.setattr(bw, "_package_dir", lambda module: root if module == "fbgemm_gpu" else None)
    assert "GenAI" in bw.availability("fbgemm", "cuda")
    (root / "experimental" / "gen_ai" / "fbgemm_gpu_experimental_gen_ai.so").write_bytes(b"")
    assert bw.availability("fbgemm", "cuda") is None
    monkeypatch.setattr(bw, "_package_dir", lambda module: None)
    assert "fbgemm-gpu-genai is not installed" in bw.availability("fbgemm", "cuda")


def test_cublas_availability_logic(simulated_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    assert bw.availability("cublas", "cuda") is None
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert "12.8" in bw.availability("cublas", "cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only" in bw.availability("cublas", "cuda")


def test_cutlass_availability_logic(simulated_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(bw, "nvcc_path", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(bw, "nvcc_version", lambda nvcc=None: (13, 0))
    monkeypatch.setattr(bw, "_has_ninja", lambda: True)
    monkeypatch.setattr(bw, "cutlass_include_dirs", lambda: ["/x/include", "/x/tools/util/include"])
    assert bw.availability("cutlass", "cuda") is None
    monkeypatch.setattr(bw, "nvcc_version", lambda nvcc=None: (12, 4))
    assert "12.8" in bw.availability("cutlass", "cuda")
    monkeypatch.setattr(bw, "nvcc_path", lambda: None)
    monkeypatch.setattr(bw, "_has_ninja", lambda: False)
    monkeypatch.setattr(bw, "cutlass_include_dirs", lambda: None)
    reason = bw.availability("cutlass", "cuda")
    assert "nvcc" in reason and "ninja" in reason and "CUTLASS" in reason


def test_cutlass_include_dirs_from_env(monkeypatch, tmp_path):
    (tmp_path / "include" / "cutlass" / "detail").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "detail" / "sm100_blockscaled_layout.hpp").write_text("")
    (tmp_path / "tools" / "util" / "include" / "cutlass" / "util").mkdir(parents=True)
    (tmp_path / "tools" / "util" / "include" / "cutlass" / "util" / "packed_stride.hpp").write_text("")
    monkeypatch.setenv("FP4C_CUTLASS_DIR", str(tmp_path))
    assert bw.cutlass_include_dirs() == [str(tmp_path / "include"), str(tmp_path / "tools" / "util" / "include")]


def test_cutlass_load_fails_once_and_clearly(monkeypatch):
    monkeypatch.setattr(bw, "_cutlass_build_error", None)
    monkeypatch.setattr(bw, "_cutlass_reasons", lambda: ["nvcc not found"])
    with pytest.raises(RuntimeError, match="nvcc not found"):
        bw.load_cutlass_extension()
    monkeypatch.setattr(bw, "_cutlass_reasons", lambda: [])  # a failed build is not retried
    with pytest.raises(RuntimeError, match="failed to build earlier"):
        bw.load_cutlass_extension()


def test_describe_rows():
    rows = [r for r in backends.describe_backends("cpu") if r["backend"] in NAMES]
    assert sorted(r["backend"] for r in rows) == sorted(NAMES)
    for row in rows:
        assert row["requires"] and "\n" not in row["requires"] and row["semantics"] == "W4A4"
        assert row["available"] == "no" and row["reason"]


@pytest.mark.gpu
def test_blackwell_backends_refuse_on_non_blackwell_gpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_OVERRIDE, raising=False)
    major, minor = torch.cuda.get_device_capability()
    if major == 10:
        pytest.skip("this GPU is a Blackwell (sm_100 family)")
    for name in NAMES:
        reason = bw.availability(name, "cuda")
        assert reason is not None and f"sm_{major}{minor}" in reason
        with pytest.raises(backends.BackendError, match=name):
            backends.resolve_backend(name, "cuda")
    assert backends.select_backend("cuda").value not in NAMES


# ---------------------------------------------------------------------------------------
# the CUTLASS kernel source compiles for sm_100a (compile only, no GPU)


@pytest.mark.slow
@pytest.mark.background_job("cutlass_sm100a")
def test_cutlass_source_compiles_for_sm100a():
    build = background_jobs.result("cutlass_sm100a")
    assert build.returncode == 0, build.stderr[-8000:]
    assert build.output.stat().st_size > 10_000
