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


def test_only_our_linears_let_the_kernel_after_the_quantization_launch_early(monkeypatch):
    """The quantization kernel may let the next kernel launch before it waits only where that kernel is
    our GEMM (it waits for the quantization's completion). After the public fp4::quantize any kernel can
    follow, such as one of Inductor's PDL kernels, which waits only for what the kernel just before it
    wrote: there the quantization waits first."""
    from fp4_compile.ops import cuda_quant, gpu_quant

    calls = []
    monkeypatch.setattr(cuda_quant, "use_cuda_quant", lambda *args: False)
    monkeypatch.setattr(gpu_quant, "check_device", lambda *args, **kwargs: None)
    monkeypatch.setattr(gpu_quant, "launch_quant_triton",
                        lambda x2, gs, mode, out_dtype=None, early_trigger=False: calls.append(early_trigger)
                        or (torch.zeros(x2.shape[0], x2.shape[1] // 2, dtype=torch.uint8),
                            torch.zeros(x2.shape[0], x2.shape[1] // 16, dtype=torch.uint8)))
    x, gs = torch.randn(2, 32), torch.ones(1)
    gpu_quant.quantize_nvfp4_gpu(x, gs)
    gpu_quant.fake_quantize_nvfp4_gpu(x, gs, torch.bfloat16)
    assert calls == [False, True]


def test_inductor_kernels_launch_with_pdl_unless_turned_off(monkeypatch):
    assert pdl.inductor_pdl_patch() == {"triton.enable_pdl": True}
    monkeypatch.setenv("FP4C_PDL", "0")
    assert pdl.inductor_pdl_patch() == {}
