"""The cuBLASLt device-alpha GEMM (ops/cublaslt.py, csrc/hopper/cublaslt_gemm.cu).

Without a GPU: the shim compiles with nvcc without cuBLAS headers, the build is cached, and the
Python side refuses what it cannot run with a clear reason. With a GPU (``gpu`` marker): the
result against a float64 reference within one rounding of the output type, CUDA-graph replay with
a new alpha written in place, and strided inputs.
"""

import ctypes
import subprocess

import pytest
import torch

from fp4_compile.ops import cublaslt, nvcc
import exact_bounds
from nvcc_helpers import build_twice, needs_nvcc


@needs_nvcc
def test_shim_compiles_without_cublas_headers(tmp_path):
    cmd = cublaslt.compile_command(str(tmp_path / "lt.so"))
    assert "-gencode=arch=compute_90,code=sm_90" in cmd
    assert not any("cublas" in part.lower() and part.startswith("-I") for part in cmd)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-3000:]
    symbols = subprocess.run(["nm", "-D", str(tmp_path / "lt.so")], capture_output=True, text=True).stdout
    assert "cublas" not in symbols.replace("fp4c_cublaslt", "")  # no link-time cuBLAS dependency


@needs_nvcc
def test_build_is_cached_and_exports_the_api(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4C_BUILD_DIR", str(tmp_path))
    lib = build_twice(cublaslt.SOURCE, cublaslt.nvcc_flags(), "cublaslt_test", tmp_path)
    shim = cublaslt._declare(ctypes.CDLL(str(lib)))
    for name in ("fp4c_cublaslt_init", "fp4c_cublaslt_gemm", "fp4c_cublaslt_last_error", "fp4c_cublaslt_version",
                 "fp4c_cublaslt_library", "fp4c_cublaslt_plan_count"):
        assert hasattr(shim, name)
    assert shim.fp4c_cublaslt_plan_count() == 0
    # Not initialised: the GEMM refuses with a message instead of crashing.
    assert shim.fp4c_cublaslt_version() == 0 and shim.fp4c_cublaslt_library() == b""
    # Not initialised (a fresh copy of the library): the GEMM refuses with a message, no crash.
    err = shim.fp4c_cublaslt_gemm(0, 16, 16, 16, 16, 16, 16, None, 16, 16, 1, 1, 16, 14, 14, 16, 0, None)
    assert err == 1 and b"fp4c_cublaslt_init" in shim.fp4c_cublaslt_last_error()


@needs_nvcc
def test_init_reports_a_missing_library(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4C_BUILD_DIR", str(tmp_path))
    lib = cublaslt._declare(ctypes.CDLL(str(nvcc.build_shared_library(cublaslt.SOURCE, cublaslt.nvcc_flags(),
                                                                      "cublaslt_init_test"))))
    message = lib.fp4c_cublaslt_init(str(tmp_path / "no-such-libcublasLt.so").encode())
    if message is not None:  # a machine with cuBLASLt on the loader path loads that instead
        assert b"libcublasLt not found" in message and b"no-such-libcublasLt.so" in message


def test_cpu_tensors_are_refused_clearly():
    a = torch.randn(4, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cublaslt.gemm_alpha(a, a, torch.ones(1), out_dtype=torch.bfloat16)


def test_library_candidates_prefer_torchs_cuda_major(tmp_path, monkeypatch):
    for rel in ("nvidia/cublas/lib/libcublasLt.so.12", "nvidia/cu13/lib/libcublasLt.so.13", "nvidia/cu13/lib/other.so"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.setattr(cublaslt.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    found = [p for p in cublaslt.library_candidates() if p.startswith(str(tmp_path))]
    assert found == [str(tmp_path / "nvidia/cu13/lib/libcublasLt.so.13"),
                     str(tmp_path / "nvidia/cublas/lib/libcublasLt.so.12")]
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    found = [p for p in cublaslt.library_candidates() if p.startswith(str(tmp_path))]
    assert found[0] == str(tmp_path / "nvidia/cublas/lib/libcublasLt.so.12")


# ---------------------------------------------------------------------------------------------- GPU

DEV = "cuda"


def check_close(out, a, b, alpha, bias, out_dtype):
    """Every element of ``out`` within exact_bounds' bound of the float64 product: one rounding of out_dtype on
    top of fp32 sums in any order."""
    assert out.dtype == out_dtype and out.shape == (a.shape[0], b.shape[0])
    assert torch.isfinite(out).all()
    ref, size = exact_bounds.product_and_size(a, b, alpha, bias)
    bad = exact_bounds.outside(out, ref, size)
    assert not bad.any(), exact_bounds.describe(out, ref, bad)


def fresh(m, n, k, dt, out_dtype, with_bias):
    a = torch.randn(m, k, device=DEV).to(dt)
    b = torch.randn(n, k, device=DEV).to(dt)
    alpha = (torch.rand(1, device=DEV) * 2 + 0.25) * (1 if torch.rand(()) < 0.5 else -1) / k ** 0.5
    bias = torch.randn(n, device=DEV).to(out_dtype) if with_bias else None
    return a, b, alpha.float(), bias


def gpu_available():
    return torch.cuda.is_available() and cublaslt.unavailable_reason(torch.cuda.current_device()) is None


@pytest.mark.gpu
def test_library_info_names_the_loaded_library():
    """`fp4c backends` shows which libcublasLt the shim loaded: one of torch's CUDA major."""
    assert gpu_available()
    name, version = cublaslt.library_info()
    assert "cublasLt" in name, name
    major = int(torch.version.cuda.split(".")[0])
    assert version // 10000 == major, (name, version, torch.version.cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_kind", ["same", "fp32"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 17, 1024])
@pytest.mark.parametrize("n", [64, 4096 + 32, 1638])
@pytest.mark.parametrize("k", [16, 4096])
def test_against_float64(seed, dt, out_kind, with_bias, m, n, k):
    assert gpu_available(), cublaslt.unavailable_reason(torch.cuda.current_device())
    out_dtype = dt if out_kind == "same" else torch.float32
    a, b, alpha, bias = fresh(m, n, k, dt, out_dtype, with_bias)
    if with_bias and out_dtype != torch.float32 and n % cublaslt.BIAS_N_MULTIPLE:
        with pytest.raises(ValueError, match="multiple of 8"):  # cuBLASLt's bias epilogue would be wrong
            cublaslt.gemm_alpha(a, b, alpha, out_dtype=out_dtype, bias=bias)
        return
    out = cublaslt.gemm_alpha(a, b, alpha, out_dtype=out_dtype, bias=bias)
    torch.cuda.synchronize()
    check_close(out, a, b, alpha, bias, out_dtype)
    # Repeat with new data of the same shape: the cached plan is reused.
    a2, b2, alpha2, bias2 = fresh(m, n, k, dt, out_dtype, with_bias)
    check_close(cublaslt.gemm_alpha(a2, b2, alpha2, out_dtype=out_dtype, bias=bias2), a2, b2, alpha2, bias2,
                out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dt,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_cuda_graph_reads_alpha_at_replay(seed, dt, out_dtype):
    assert gpu_available()
    m, n, k = 1024, 4096 + 32, 4096
    a, b, alpha, bias = fresh(m, n, k, dt, out_dtype, True)
    cublaslt.prepare(a.device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (plan + heuristic) outside the capture
        cublaslt.gemm_alpha(a, b, alpha, out_dtype=out_dtype, bias=bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cublaslt.gemm_alpha(a, b, alpha, out_dtype=out_dtype, bias=bias)
    graph.replay()
    torch.cuda.synchronize()
    check_close(out, a, b, alpha, bias, out_dtype)
    for _ in range(2):
        a2, b2, alpha2, bias2 = fresh(m, n, k, dt, out_dtype, True)
        a.copy_(a2)
        b.copy_(b2)
        bias.copy_(bias2)
        alpha.fill_(float(alpha2))  # in place: the graph holds alpha's address, not its value
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_close(out, a2, b2, alpha2, bias2, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_strided_leading_dimension(seed, dt):
    assert gpu_available()
    m, n, k, wide = 333, 4096 + 32, 1024, 1024 + 64
    a_wide = torch.randn(m, wide, device=DEV).to(dt)
    b_wide = torch.randn(n, wide + 8, device=DEV).to(dt)
    a, b = a_wide[:, :k], b_wide[:, :k]
    assert not a.is_contiguous() and not b.is_contiguous()
    alpha = torch.tensor([0.03125], device=DEV)
    bias = torch.randn(n, device=DEV).to(dt)
    for out_dtype in (dt, torch.float32):
        check_close(cublaslt.gemm_alpha(a, b, alpha, out_dtype=out_dtype, bias=bias.to(out_dtype)), a, b, alpha,
                    bias.to(out_dtype), out_dtype)
    # a bias of another dtype is converted to the output's
    check_close(cublaslt.gemm_alpha(a, b, alpha, out_dtype=torch.float32, bias=bias), a, b, alpha,
                bias.float(), torch.float32)


@pytest.mark.gpu
def test_bad_inputs_are_refused_clearly():
    assert gpu_available()
    a = torch.randn(8, 32, device=DEV, dtype=torch.bfloat16)
    one = torch.ones(1, device=DEV)
    with pytest.raises(TypeError, match="both be bf16 or both fp16"):
        cublaslt.gemm_alpha(a, a.half(), one, out_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        cublaslt.gemm_alpha(a, a, one, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="share K"):
        cublaslt.gemm_alpha(a, a[:, :16], one, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one device"):
        cublaslt.gemm_alpha(a, a, torch.ones(1), out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        cublaslt.gemm_alpha(a, a.T.contiguous().T, one, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="aligned"):
        cublaslt.gemm_alpha(torch.randn(8 * 32 + 1, device=DEV, dtype=torch.bfloat16)[1:].view(8, 32), a, one,
                            out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="N=8"):
        cublaslt.gemm_alpha(a, a, one, out_dtype=torch.bfloat16, bias=torch.ones(9, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1024, 1638, 544), (1024, 33, 256), (2048, 4100, 4096)])
def test_dequant_mm_pads_n_for_a_bias(seed, dt, m, n, k):
    """The large-M path with a bias where N is not a multiple of 8 (which cuBLASLt's bias epilogue gets wrong
    with 16-bit outputs, NOTES.md v35c): every element within one rounding of the exact product."""
    assert gpu_available(), cublaslt.unavailable_reason(torch.cuda.current_device())
    from fp4_compile import format as F
    from fp4_compile.ops.hopper import MARLIN
    from fp4_compile.ops.triton_gemm import dequant_mm

    w = torch.randn(n, k, device=DEV)
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    pw, sw = F.quantize_nvfp4(w, gw)
    weight, weight_scale = MARLIN.prepare_weight(pw, sw)
    a = torch.randn(m, k, device=DEV).to(dt)
    alpha = (1 / gw).float()
    bias = torch.randn(n, device=DEV).to(dt)
    out = dequant_mm(a, weight, weight_scale, alpha, n=n, k=k, out_dtype=dt, bias=bias)
    check_close(out.contiguous(), a, F.block_values(pw, sw).to(dt), alpha, bias, dt)
