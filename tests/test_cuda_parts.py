"""When the optional built CUDA parts (small-M GEMM, wgmma GEMM, quantization, cuBLASLt shim, the
eager fast path) are off: one mechanism, ``fp4_compile.ops.nvcc.unavailable_reason``, decides it for
all five, and one helper, ``nvcc.launch_on``, launches the kernels (no GPU needed)."""

import pytest
import torch

from fp4_compile.ops import cublaslt, cuda_quant, cuda_small_m, cuda_wgmma, fast_linear, nvcc

PARTS = [(cuda_small_m, "FP4C_SMALL_M_KERNEL"), (cuda_wgmma, "FP4C_WGMMA_KERNEL"), (cuda_quant, "FP4C_CUDA_QUANT"),
         (cublaslt, "FP4C_CUBLASLT"), (fast_linear, "FP4C_FAST_LINEAR")]


@pytest.fixture
def fresh_reasons():
    for module, _ in PARTS:
        module.unavailable_reason.cache_clear()
    yield
    for module, _ in PARTS:
        module.unavailable_reason.cache_clear()


@pytest.mark.parametrize("module,env_var", PARTS, ids=lambda v: getattr(v, "__name__", v))
def test_turned_off_by_environment(monkeypatch, fresh_reasons, module, env_var):
    monkeypatch.setenv(env_var, "0")
    assert f"{env_var}=0" in module.unavailable_reason(0)


@pytest.mark.parametrize("module,env_var", PARTS, ids=lambda v: getattr(v, "__name__", v))
def test_no_cuda_is_a_reason(monkeypatch, fresh_reasons, module, env_var):
    monkeypatch.delenv(env_var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert module.unavailable_reason(0) == "no CUDA device"


def _cuda_device(monkeypatch, capability):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(nvcc, "nvcc_path", lambda: "/usr/bin/nvcc")


def test_other_architectures_and_failed_builds_are_reasons(monkeypatch):
    _cuda_device(monkeypatch, (8, 0))
    assert nvcc.unavailable_reason("part", "FP4C_TEST_PART", 0, lambda cap: None) == \
        "built for sm_89/sm_90 only, this GPU is sm_80"

    def fail(cap):
        raise RuntimeError("nvcc failed")

    _cuda_device(monkeypatch, (9, 0))
    assert nvcc.unavailable_reason("part", "FP4C_TEST_PART", 0, fail) == "build or load failed: nvcc failed"
    assert nvcc.unavailable_reason("part", "FP4C_TEST_PART", 0, lambda cap: None) is None
    _cuda_device(monkeypatch, (12, 0))  # capabilities=None: any GPU
    assert nvcc.unavailable_reason("part", "FP4C_TEST_PART", 0, lambda cap: None, capabilities=None) is None


def test_wgmma_kernel_is_hopper_only(monkeypatch):
    """wgmma exists on sm_90a alone: an Ada GPU (which runs the small-M kernel) is a reason."""
    monkeypatch.delenv("FP4C_WGMMA_KERNEL", raising=False)
    _cuda_device(monkeypatch, (8, 9))
    cuda_wgmma.unavailable_reason.cache_clear()
    try:
        assert cuda_wgmma.unavailable_reason(0) == "built for sm_90 only, this GPU is sm_89"
    finally:
        cuda_wgmma.unavailable_reason.cache_clear()


def test_launch_on_switches_device_only_when_needed(monkeypatch):
    """nvcc.launch_on: the launch gets the device's capability and current raw stream; the current
    device is switched (a context manager, host time on every eager call) only for another device."""
    switched = []

    class Switch:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            switched.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    monkeypatch.setattr(nvcc, "device_capability", lambda index: (9, index))
    seen = []
    assert nvcc.launch_on(torch.device("cuda", 0), lambda cap, stream: seen.append((cap, stream)) or 0) == 0
    assert seen == [((9, 0), 1000)] and switched == []
    assert nvcc.launch_on(torch.device("cuda", 1), lambda cap, stream: seen.append((cap, stream)) or 7) == 7
    assert seen[-1] == ((9, 1), 1001) and switched == [1]


def test_aligned_rows_copies_what_the_kernels_cannot_read():
    """The kernels read rows in 16-byte vectors from 16-byte aligned rows. ``contiguous()`` keeps a contiguous
    tensor as it is, so a single row sliced 8 bytes into a wider one reached the quantization kernel misaligned
    (a CUDA fault on an H200, NOTES.md v49): ``aligned_rows`` copies it."""
    wide = torch.randn(3, 1040 + 8, dtype=torch.bfloat16)
    assert wide.data_ptr() % 16 == 0
    aligned = wide[:, :1040]                    # rows 2096 bytes apart: 16-byte multiples
    assert nvcc.aligned_rows(aligned) is aligned
    row = wide[:1, 4:4 + 1040]                  # one row, 8 bytes in: contiguous() would keep it
    assert row.is_contiguous() and row.contiguous().data_ptr() % 16 == 8
    fixed = nvcc.aligned_rows(row)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, row)
    odd_rows = torch.randn(3, 1044, dtype=torch.bfloat16)[:, :1040]  # rows 2088 bytes apart
    assert nvcc.aligned_rows(odd_rows).stride(0) == 1040
    one_row = torch.randn(1, 1044, dtype=torch.bfloat16)[:, :1040]   # one row: its stride is never used
    assert nvcc.aligned_rows(one_row) is one_row
    scales = torch.zeros(4, 40, dtype=torch.uint8)[:, 1:33]           # 2-byte alignment asked: 1 byte in
    assert nvcc.aligned_rows(scales, 2, 2).data_ptr() % 2 == 0
    transposed = torch.randn(64, 3, dtype=torch.bfloat16).t()
    assert nvcc.aligned_rows(transposed).is_contiguous()
    flat = torch.zeros(40, dtype=torch.uint8)[8:40]                    # 1-D (flat swizzled scales): base only
    assert nvcc.aligned_rows(flat, 1).data_ptr() % 16 == 0 and nvcc.aligned_rows(flat[8:], 1).data_ptr() % 16 == 0
