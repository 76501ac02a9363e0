"""ops/pdl.py: when our kernels use programmatic dependent launch (the GPU side is
test_gpu_kernels.py::test_programmatic_dependent_launch)."""

import torch

from fp4_compile.ops import pdl, triton_quant


def test_never_on_cpu_tensors():
    assert not pdl.use_pdl(torch.device("cpu"))


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    assert pdl.use_pdl(torch.device("cuda", 0))
    monkeypatch.setenv("FP4C_PDL", "0")
    assert not pdl.use_pdl(torch.device("cuda", 0))


def test_only_from_sm90(monkeypatch):
    monkeypatch.setattr(pdl, "device_capability", lambda index: (8, 9))
    assert not pdl.use_pdl(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "device_capability", lambda index: (9, 0))
    assert pdl.use_pdl(torch.device("cuda", 0))


def test_quant_kernel_launch_arguments(monkeypatch):
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    monkeypatch.setattr(triton_quant, "TRITON_PDL", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_quant.pdl_launch_args(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no grid dependencies
    assert triton_quant.pdl_launch_args(torch.device("cuda", 0)) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_quant, "TRITON_PDL", False)  # a Triton without launch_pdl
    assert triton_quant.pdl_launch_args(torch.device("cuda", 0)) == {"PDL": False}
