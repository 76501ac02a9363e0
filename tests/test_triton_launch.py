"""The package's Triton launches (ops/triton_launch.py): first launched inside a CUDA-graph capture, and on a
device that is not the current one.

On the GPU, in a fresh process (where no Triton kernel is loaded yet): a W4A16 layer at M = 513 warmed
up eagerly (its eager calls take the CUDA wgmma kernel) and then captured, where the backend takes the
Triton GEMM, which the capture has to load. Before ``launch_triton`` this capture failed ("operation
not permitted when stream is capturing"). With two GPUs: the Triton kernels on ``cuda:1`` while
``cuda:0`` is current. On the CPU: the launch helper without a capture.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from fp4_compile.ops import triton_launch


class _RecordingKernel:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs)) or "launched"


def test_launch_triton_outside_a_capture_is_the_plain_launch():
    kernel = _RecordingKernel()
    assert triton_launch.launch_triton(kernel, (3, 1), 1, 2, BLOCK=4) == "launched"
    assert kernel.calls == [((3, 1), (1, 2), {"BLOCK": 4})]


FRESH_PROCESS = textwrap.dedent("""
    import torch
    from fp4_compile import format as F
    from fp4_compile.ops import hopper
    m, n, k = 513, 2496, 8192
    w = torch.randn(n, k, device="cuda")
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    pw, sw = F.quantize_nvfp4(w, gw)
    wt, wst = hopper.MARLIN.prepare_weight(pw, sw)
    args = (wt, wst, gw, (1 / gw).float(), None, n, "marlin")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    eager = [torch.ops.fp4.linear(x, *args) for _ in range(2)]  # warm-up, as before any capture
    assert not hopper._cuda_gemm(x, wt, m, n, False), "the captured call should take a Triton kernel"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fp4.linear(x, *args)
    graph.replay()
    ref = x.double() @ F.block_values(pw, sw).double().t() / gw.double()
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 6e-3, err
    print("captured ok", err)
""")


@pytest.mark.gpu
def test_capture_loads_a_triton_kernel_that_eager_calls_never_launched():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "captured ok" in done.stdout


@pytest.mark.gpu
def test_triton_kernels_run_on_their_tensors_device():
    """``fp4::quantize`` below M = 1024 (the Triton kernel) and a W4A16 linear at M = 3000 (the Triton weight
    dequantization, then cuBLASLt) on ``cuda:1`` while ``cuda:0`` is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    from fp4_compile import format as F
    from fp4_compile.ops import hopper

    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    x = torch.randn(100, 4096, device=dev, dtype=torch.bfloat16)
    gs = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    q, s = torch.ops.fp4.quantize(x, gs)
    q_ref, s_ref = F.quantize_nvfp4(x, gs)
    assert torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8)) and torch.equal(q, q_ref)
    w = torch.randn(1000, 4096, device=dev)
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    pw, sw = F.quantize_nvfp4(w, gw)
    wt, wst = hopper.MARLIN.prepare_weight(pw, sw)
    x = torch.randn(3000, 4096, device=dev, dtype=torch.bfloat16)
    out = torch.ops.fp4.linear(x, wt, wst, gw, (1 / gw).float(), None, 1000, "marlin")
    ref = x.double() @ F.block_values(pw, sw).double().t() / gw.double()
    assert out.device == dev and float((out.double() - ref).norm() / ref.norm()) < 6e-3
    assert torch.cuda.current_device() == 0
