"""Backend names, selection, the override, the errors and the emulation weight layout."""

import pytest
import torch
from torch import nn

from fp4_compile import Backend, BackendError, NVFP4Linear, convert_to_kernel_format, select_backend
from fp4_compile.backends import SPECS, describe_backends, kernels_for, resolve_backend

VLLM_NAMES = ["cutlass", "flashinfer-cutlass", "flashinfer-trtllm", "flashinfer-cudnn", "fbgemm", "marlin", "emulation"]


def test_all_vllm_names_accepted():
    for name in VLLM_NAMES + ["cublas", "triton-w4a4"]:
        assert Backend(name).value == name and Backend(name) in SPECS


def test_cpu_selects_emulation(monkeypatch):
    monkeypatch.delenv("FP4_GEMM_BACKEND", raising=False)
    assert select_backend("cpu") is Backend.EMULATION


def test_env_override(monkeypatch):
    monkeypatch.setenv("FP4_GEMM_BACKEND", "emulation")
    assert select_backend("cpu") is Backend.EMULATION
    monkeypatch.setenv("FP4_GEMM_BACKEND", "flashinfer-trtllm")
    with pytest.raises(BackendError) as info:
        select_backend("cpu")
    message = str(info.value)
    for name in VLLM_NAMES:  # every backend listed, with why it is (not) available
        assert name in message
    assert "needs an NVIDIA Blackwell GPU" in message and "emulation" in message
    monkeypatch.setenv("FP4_GEMM_BACKEND", "bogus")
    with pytest.raises(BackendError, match="unknown NVFP4 backend 'bogus'"):
        select_backend("cpu")


@pytest.mark.parametrize("name", ["triton-w4a4", "marlin", "cutlass", "fbgemm", "cublas"])
def test_unavailable_backend_raises(name):
    with pytest.raises(BackendError, match=f"'{name}' is not available"):
        resolve_backend(name, "cpu")
    with pytest.raises(BackendError):
        NVFP4Linear.from_linear(nn.Linear(32, 8), backend=name)


def test_describe_backends():
    rows = describe_backends("cpu")
    assert [r["backend"] for r in rows] == [b.value for b in SPECS]
    emu = next(r for r in rows if r["backend"] == "emulation")
    assert emu["available"] == "yes" and emu["semantics"] == "W4A4"
    assert next(r for r in rows if r["backend"] == "marlin")["semantics"] == "W4A16"


def test_emulation_layout_round_trip(seed):
    layer = NVFP4Linear.from_linear(nn.Linear(48, 20))
    packed, scales = layer.linear_weight()
    w, s = kernels_for("emulation").prepare_weight(packed, scales)
    back = kernels_for("emulation").restore_weight(w, s, 20, 48)
    assert torch.equal(back[0], packed) and torch.equal(back[1].view(torch.uint8), scales.view(torch.uint8))
    convert_to_kernel_format("emulation", layer)
    assert torch.equal(layer.linear_weight()[0], packed)


def test_import_is_lazy():
    # (torch._dynamo itself imports triton when it is installed; our kernels load on first use)
    import subprocess
    import sys

    code = (
        "import sys, fp4_compile; "
        "bad = [m for m in ('fp4_compile.ops.triton_gemm', 'fp4_compile.ops.blackwell', 'flashinfer', "
        "'fbgemm_gpu', 'transformers', 'compressed_tensors') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
