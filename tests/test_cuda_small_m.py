"""The CUDA small-M kernel on a machine without a GPU: it compiles for sm_90 without spills into a
library with its C entry points, and dispatch stays on the Triton/CPU paths where the kernel cannot
run."""

import ctypes
import inspect
import subprocess

import pytest
import torch

from fp4_compile.ops import cuda_small_m, nvcc, triton_gemm, triton_quant
import background_jobs
from nvcc_helpers import ptxas_report


@pytest.mark.background_job("small_m_sm90")
def test_kernel_compiles_for_sm90_without_spills_and_exports_the_launcher():
    build = background_jobs.result("small_m_sm90")
    report, lib = ptxas_report(build), build.output
    # {bf16, fp16} x {16-bit, fp32 out} x (activation values: {16, 32 rows} x (M <= 8: 2 or 4 stages,
    # M <= 16: 2); activation codes: 16 rows, 2 stages, M <= 8 or 16; grouped and gated launches: on
    # values or codes, M <= 8 or 16), and the kernels on codes at M <= 16 again with their first weight loads
    # before the PDL wait (after our quantization)
    assert len(report.kernels) == 68
    assert report.spills and all(s == ("0", "0") for s in report.spills), report
    assert max(report.registers) <= 255
    # the package's own build command (plus -Xptxas -v; its cache: test_cublaslt's build_twice)
    exported = ctypes.CDLL(str(lib))
    assert hasattr(exported, "fp4c_nvfp4_small_m_gemm") and hasattr(exported, "fp4c_nvfp4_small_m_gemm_group")


def test_group_size_matches_the_kernel():
    assert f"constexpr int kMaxGroup = {cuda_small_m.MAX_GROUP};" in cuda_small_m.SOURCE.read_text()


def test_build_failure_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4C_BUILD_DIR", str(tmp_path))
    bad = tmp_path / "bad.cu"
    bad.write_text("this is not C++\n")
    if nvcc.nvcc_path() is None:
        with pytest.raises(RuntimeError, match="nvcc not found"):
            nvcc.build_shared_library(bad, [], "bad")
    else:
        with pytest.raises(RuntimeError, match="nvcc failed"):
            nvcc.build_shared_library(bad, [], "bad")
    assert not list(tmp_path.glob("*.so"))


def test_build_timeout_is_a_build_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4C_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(nvcc, "nvcc_path", lambda: "/usr/bin/nvcc")

    def hang(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(nvcc.subprocess, "run", hang)
    monkeypatch.setattr(nvcc, "nvcc_version", lambda: (13, 0))
    with pytest.raises(RuntimeError, match="did not finish"):
        nvcc.build_shared_library(cuda_small_m.SOURCE, [], "slow")
    assert not list(tmp_path.iterdir())


def test_cpu_tensors_never_take_the_kernel():
    x = torch.randn(1, 64)
    assert not cuda_small_m.use_small_m(x, 1, 4096)
    assert not cuda_small_m.use_codes(torch.randn(8, 64), 8, 4096)


def test_w4a4_takes_activation_codes_where_measured_faster():
    """M = 8 at every N; M = 9..16 (two n8-tiles) up to CODES_TWO_TILES_MAX_N; never below M = 8."""
    for n in (1024, 4096, 6144, 28672):
        assert not cuda_small_m.dispatches_codes(4, n) and not cuda_small_m.dispatches_codes(7, n)
        assert cuda_small_m.dispatches_codes(8, n)
        assert cuda_small_m.dispatches_codes(16, n) == (n <= cuda_small_m.CODES_TWO_TILES_MAX_N)
        assert not cuda_small_m.dispatches_codes(17, n)


def test_eager_calls_the_fast_path_replays_take_every_m_up_to_16():
    """host_bound (an eager call that fast_linear will replay): the kernel at M = 1..16 on values (but for the
    calls at M = 9..16 that the wgmma kernel, asked first, takes: test_cuda_wgmma), and on codes from M = 8 at
    every N; graph-time choices otherwise."""
    for n in (1024, 4096, 6144, 14336, 28672):
        assert all(cuda_small_m.dispatches(m, n, host_bound=True) for m in range(1, 17))
        assert not cuda_small_m.dispatches(17, n, host_bound=True)
        assert cuda_small_m.dispatches_codes(16, n, host_bound=True)
        assert not cuda_small_m.dispatches_codes(7, n, host_bound=True)
    assert not cuda_small_m.dispatches(16, 4096) and cuda_small_m.dispatches(16, 1024)


def test_activation_codes_are_checked():
    w = torch.zeros(32, 32, dtype=torch.uint8)
    s = torch.zeros(32, 4, dtype=torch.uint8)
    codes, scales = torch.zeros(2, 32, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)
    gemm = cuda_small_m.small_m_gemm
    with pytest.raises(ValueError, match="need k"):
        gemm(codes, w, s, torch.ones(1), n=32, out_dtype=torch.bfloat16, x_scale=scales)
    with pytest.raises(TypeError, match="uint8 with e4m3 scales"):
        gemm(codes.float(), w, s, torch.ones(1), n=32, out_dtype=torch.bfloat16, x_scale=scales, k=64)
    with pytest.raises(ValueError, match=r"\[M, >= 48\]"):  # K = 80: rounded up to 96
        gemm(codes, w, s, torch.ones(1), n=32, out_dtype=torch.bfloat16, x_scale=scales, k=80)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        gemm(codes, w, s, torch.ones(1), n=32, out_dtype=torch.bfloat16, x_scale=scales, k=64)


def test_cpu_tensors_are_refused_clearly():
    w = torch.zeros(32, 32, dtype=torch.uint8)
    s = torch.zeros(32, 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_small_m.small_m_gemm(torch.randn(1, 64, dtype=torch.bfloat16), w, s, torch.ones(1), n=32,
                                  out_dtype=torch.bfloat16)


def test_group_is_checked():
    w = torch.zeros(32, 32, dtype=torch.uint8)
    s = torch.zeros(32, 4, dtype=torch.uint8)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    member = (w, s, torch.ones(1), 32, None)
    with pytest.raises(ValueError, match="2..4 GEMMs"):
        cuda_small_m.small_m_gemm_group([x], [member], out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="2..4 GEMMs"):
        cuda_small_m.small_m_gemm_group([x] * 5, [member] * 5, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="warps per CTA must be 1..8"):
        cuda_small_m.small_m_gemm_group([x] * 2, [member] * 2, out_dtype=torch.bfloat16, warps=9)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_small_m.small_m_gemm_group([x] * 2, [member] * 2, out_dtype=torch.bfloat16)


def test_launch_config_keeps_the_grid_one_wave_of_warps():
    """Warps per CTA: the largest of 8, 4, 2, 1 whose grid (one CTA per 16 weight rows) fits 16 warps per
    SM at once, never more than the K groups (128 k each); the H100 picks that measured fastest."""
    picks = {(n, k): cuda_small_m.launch_config(1, n, k, 132)[2]
             for n, k in ((28672, 4096), (14336, 4096), (6144, 4096), (4096, 4096), (4096, 14336), (1024, 4096))}
    assert picks == {(28672, 4096): 1, (14336, 4096): 2, (6144, 4096): 4, (4096, 4096): 8, (4096, 14336): 8,
                     (1024, 4096): 8}
    assert cuda_small_m.launch_config(1, 4096, 256, 132)[2] == 2  # two K groups
    assert cuda_small_m.launch_config(1, 8192, 4096, 114)[2] == 2  # fewer SMs (H100 PCIe): 512 CTAs x 2 <= 1824
    assert cuda_small_m.launch_config(1, 10**6, 4096, 132)[2] == 1
    # on activation codes: 8 warps up to N = 4096, else 4
    assert [cuda_small_m.launch_config(8, n, 4096, 132, codes=True)[2] for n in (4096, 6144, 28672)] == [8, 4, 4]


def test_launch_config_on_fast_dram_takes_two_warps_at_m_up_to_4():
    """An H200 (fast DRAM): 2 warps where the rule gives 1, at M <= 4 only, never more than the K groups;
    the other picks and the codes rule unchanged."""
    def warps(m, n, k, codes=False):
        return cuda_small_m.launch_config(m, n, k, 132, codes=codes, fast_dram=True)[2]

    assert [warps(m, 28672, 4096) for m in (1, 4, 5, 8)] == [2, 2, 1, 1]
    assert warps(1, 10**6, 128) == 1  # one K group
    for n, k in ((14336, 4096), (6144, 4096), (4096, 4096), (4096, 14336), (1024, 4096)):
        for m in (1, 4, 8, 16):
            assert warps(m, n, k) == cuda_small_m.launch_config(m, n, k, 132)[2]
    assert warps(8, 28672, 4096, codes=True) == 4


def test_device_launch_config_reads_the_devices_dram_bandwidth(monkeypatch):
    """A device's launch takes the fast-DRAM rule from its bandwidth: none reported (torch without the fields,
    or no CUDA) and an H100's give the H100 rule, an H200's the 2 warps."""
    if not torch.cuda.is_available():
        assert triton_gemm.dram_bytes_per_s(0) == 0.0
    monkeypatch.setattr(cuda_small_m, "num_sms", lambda index: 132)
    for bandwidth, warps in ((0.0, 1), (3.35e12, 1), (4.8e12, 2)):
        monkeypatch.setattr(cuda_small_m, "dram_bytes_per_s", lambda index: bandwidth)
        assert cuda_small_m.device_launch_config(1, 28672, 4096, 0) == (16, 2, warps)


def test_launch_config_covers_the_weight_padding():
    # rows per CTA (16 or 32) must divide the weight's row padding (32)
    for m in (1, 8, 16):
        for n, k in ((32, 64), (4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (100000, 16)):
            rows, stages, warps = cuda_small_m.launch_config(m, n, k)
            assert 32 % rows == 0 and stages in ((2, 4) if m <= 8 else (2,)) and 1 <= warps <= 8


def test_weight_and_scales_are_checked_before_a_launch():
    """Views the kernel would misread or fault on (a misaligned load kills the CUDA context) are refused
    with a message, on any device."""
    n, kp = 64, 256
    weight = torch.zeros(n, kp // 2, dtype=torch.uint8)
    scales = torch.zeros(n, kp // 16, dtype=torch.uint8)
    x = torch.zeros(1, kp, dtype=torch.bfloat16)
    cuda_small_m._check_shapes(x, weight, scales, 1, n, kp)
    with pytest.raises(ValueError, match="weight_scale must be contiguous"):
        cuda_small_m._check_shapes(x, weight, scales[:, :8], 1, n, kp)
    with pytest.raises(ValueError, match="weight_scale must be contiguous"):
        cuda_small_m._check_shapes(x, weight, torch.zeros(kp // 16, n, dtype=torch.uint8).t(), 1, n, kp)
    with pytest.raises(ValueError, match="2-byte aligned"):
        cuda_small_m._check_shapes(x, weight, torch.zeros(n * kp // 16 + 1, dtype=torch.uint8)[1:].view(n, -1),
                                   1, n, kp)
    with pytest.raises(ValueError, match="16-byte"):
        cuda_small_m._check_shapes(x, torch.zeros(n * kp // 2 + 8, dtype=torch.uint8)[8:].view(n, -1), scales,
                                   1, n, kp)
    with pytest.raises(ValueError, match="prepared .tiled. weight"):
        cuda_small_m._check_shapes(x, weight[:48], scales[:48], 1, 48, kp)  # rows not padded to 32
    with pytest.raises(ValueError, match="bad shapes"):
        cuda_small_m._check_shapes(x, weight, scales, 1, n + 32, kp)
    with pytest.raises(ValueError, match="takes 1"):
        cuda_small_m._check_shapes(x, weight, scales, 17, n, kp)


def test_weights_before_the_wait_only_right_after_our_quantization(monkeypatch):
    """pdl 2 (the GEMM's first weight loads before griddepcontrol.wait) is safe only where the kernel before is
    our quantization kernel, whose early trigger comes after its own wait (so the kernels that may have written
    the weights have completed): both quantization kernels keep that order, and the launchers ask for it only
    after them."""
    monkeypatch.setattr(cuda_small_m, "use_pdl", lambda device: True)
    assert cuda_small_m.dependent_launch_mode(torch.device("cuda", 0), after_quantization=True) == 2
    assert cuda_small_m.dependent_launch_mode(torch.device("cuda", 0), after_quantization=False) == 1
    monkeypatch.setattr(cuda_small_m, "use_pdl", lambda device: False)
    assert cuda_small_m.dependent_launch_mode(torch.device("cuda", 0), after_quantization=True) == 0
    quant = (cuda_small_m.SOURCE.parent / "nvfp4_quant.cu").read_text()
    body = quant[quant.index("nvfp4_quant_kernel(const Args a) {"):]
    assert body.index("fp4c::wait_for_prior_grid();") < body.index("if (a.early) fp4c::allow_dependents();")
    kernel = inspect.getsource(triton_quant._quant_kernel.fn)
    assert kernel.index("gdc_wait()") < kernel.index("gdc_launch_dependents()")
