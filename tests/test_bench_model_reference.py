"""bench_model.py's reference models, which check the compiled GPU models' outputs (benchmarks/NOTES.md v26c):
they must compute what each backend promises by other means, so they are tested here, where no GPU is."""

import os
import sys
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_model  # noqa: E402

import fp4_compile  # noqa: E402
from fp4_compile import NVFP4Linear  # noqa: E402


def _quantized_mlp() -> nn.Module:
    mlp = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False)).to(torch.bfloat16)
    return fp4_compile.quantize_model(mlp, backend="emulation", progress=False)


def test_w4a4_layers_run_on_the_emulation_backend(seed):
    model = _quantized_mlp()
    ref = bench_model.reference_model(model)
    assert all(isinstance(ref[i], NVFP4Linear) and ref[i].backend.value == "emulation" for i in (0, 2))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))
    assert ref[0].weight is not model[0].weight  # a copy: the timed model keeps its layout


def test_w4a16_layers_are_float64_products_of_the_block_values(seed):
    model = _quantized_mlp()
    with mock.patch.object(NVFP4Linear, "semantics", property(lambda self: "W4A16")):
        ref = bench_model.reference_model(model)
    assert isinstance(ref[0], bench_model.W4A16Reference) and isinstance(ref[2], bench_model.W4A16Reference)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    layer = model[0]
    want = (x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()).to(torch.bfloat16)
    with torch.no_grad():  # the dequantized weight divides by the global scale in fp32: an ulp of bf16 apart at most
        torch.testing.assert_close(ref[0](x), want, rtol=2**-7, atol=0)
        assert ref[2](torch.randn(7, 48, dtype=torch.bfloat16)).dtype == torch.bfloat16
