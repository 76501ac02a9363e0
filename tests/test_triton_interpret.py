"""The Hopper Triton kernels (quant, W4A4, W4A16) in Triton's CPU interpreter, against format.py.

Triton reads TRITON_INTERPRET when it is imported, so the kernels run in a subprocess
(tests/_triton_interp_worker.py) with the variable set; tiny sizes, fp16/fp32 inputs (bf16
is not usable in the interpreter), fresh random data each run (the seed is printed).
"""

import json
import os

import pytest

import background_jobs

pytest.importorskip("triton")

# every test here reads the worker's results: it runs beside the rest of the suite (tests/background_jobs.py)
pytestmark = pytest.mark.background_job("triton_interpret")


@pytest.fixture(scope="module")
def results():
    proc = background_jobs.result("triton_interpret")
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"worker seed={data['seed']}")
    return data


def test_quant_scales_bit_exact(results):
    for r in results["quant"]:
        assert r["scale_shape_ok"], r
        assert r["scale_bytes_equal"], r


def test_quant_codes_equal_except_ties(results):
    for r in results["quant"]:
        assert r["code_mismatch_not_tie"] == 0, r
        assert r["code_mismatch_tie_bad_step"] == 0, r


def test_w4a4_linear_and_mm_match_reference(results):
    for r in results["gemm"]:
        assert r["w4a4"] <= 1e-3, r
        if "mm" in r:
            assert r["w4a4_shape_ok"], r
            assert r["mm"] <= 1e-3, r
            assert r["mm_padded_k"] <= 1e-3, r


def test_w4a16_matches_reference(results):
    for r in results["gemm"]:
        if "w4a16" in r:
            assert r["w4a16"] <= 1e-3, r


def test_random_shapes_and_configs_element_by_element(results):
    """Random M, N, K, input magnitudes, bias, and launch configurations (block sizes, split-K): every output
    element within one rounding of the float64 product (the worker's bound)."""
    for r in results["fuzz"]:
        assert r["w4a4_shape_ok"] and r["w4a16_shape_ok"], r
        assert r["w4a4_bad"] == 0 and r["w4a16_bad"] == 0, r


def test_nonfinite_activation_block_gives_nonfinite_output(results):
    assert results["nonfinite"]["bad_row_nonfinite"]
    assert results["nonfinite"]["good_rows_finite"]


def test_dequant_kernels_exact(results):
    assert results["dequant_weight_exact"]
    assert results["dequant_codes_exact"]


def test_silu_mul_kernel_matches_reference(results):
    for r in results["silu_mul"]:
        assert r["shape_ok"] and r["rel"] <= (1e-6 if r["dtype"] == "torch.float32" else 1e-3), r


def test_rms_norm_quantize_kernel_matches_reference(results):
    for r in results["rms_norm_quant"]:  # values may differ where a float32 sum order flips a rounding
        assert r["total_equal"] and r["values_mismatch"] <= 0.01, r
    assert {r["unit_offset"] for r in results["rms_norm_quant"]} == {False, True}  # Llama's norm and Gemma's


def test_prepare_restore_round_trip(results):
    assert all(results["roundtrip"])


def test_restore_weight_inverse_on_cpu():
    """restore_weight(prepare_weight(w)) == w, plain CPU torch (no kernel)."""
    import torch

    from fp4_compile import format as F
    from fp4_compile.ops import weight_layout as WL
    from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4

    n, k = 45, 112
    pw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    sw = torch.randint(0, 126, (n, k // 16), dtype=torch.uint8).view(torch.float8_e4m3fn)
    for kern in (TRITON_W4A4, MARLIN):
        wt, wst = kern.prepare_weight(pw, sw)
        assert wt.shape == (F.round_up(n, 32), F.round_up(k, WL.TILE_K) // 2)
        assert wst.shape == (F.round_up(n, 32), F.round_up(k, WL.TILE_K) // 16)
        scales = WL.untile_rows(wst.view(torch.uint8), WL.TILE_SCALE_BYTES)  # (prepared scales are tiled)
        assert (scales[n:] == 0).all() and (scales[:, k // 16:] == 0).all()
        p2, s2 = kern.restore_weight(wt, wst, n, k)
        assert torch.equal(p2, pw)
        assert torch.equal(s2.view(torch.uint8), sw.view(torch.uint8))


def test_cpu_tensors_raise_clear_error_without_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode accepts CPU tensors")
    import torch

    from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4

    x = torch.randn(2, 32)
    wt = torch.zeros(32, 16, dtype=torch.uint8)
    ws = torch.zeros(32, 2, dtype=torch.uint8).view(torch.float8_e4m3fn)
    one = torch.ones(1)
    for kern in (TRITON_W4A4, MARLIN):
        with pytest.raises(RuntimeError, match="emulation"):
            kern.linear(x, wt, ws, one, one, None, 32)
