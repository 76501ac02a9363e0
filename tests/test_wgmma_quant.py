"""The W4A4 wgmma launch that quantizes its own activations (``fp4c_nvfp4_wgmma_gemm_quant``, QuantArgs in
csrc/hopper/nvfp4_wgmma.cu) on a GPU: bit for bit the quantization kernel's block values followed by the same
GEMM launch, in one wave and persistent, with a split tail, N and K off the kernel's multiples, M off the tile;
across CUDA-graph replays (its counters back at zero after each); and the W4A4 linear's dispatch takes it.
Fresh random activations over four decades of magnitude every run."""

from __future__ import annotations

import pytest
import torch

from fp4_compile import format as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - collection on CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from fp4_compile.ops import cuda_wgmma, hopper, split_tickets  # noqa: E402
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu  # noqa: E402
from fp4_compile.ops.hopper import TRITON_W4A4  # noqa: E402

DEV = "cuda"
TILE = cuda_wgmma.QUANT_TILE


def _need_wgmma():
    reason = cuda_wgmma.unavailable_reason(torch.cuda.current_device())
    if reason is not None:
        pytest.skip(reason)


def _case(n: int, k: int, m: int, dt: torch.dtype, gen: torch.Generator):
    """A prepared random W4A4 layer [n, k], activations [m, k] in dt with per-column magnitudes over four
    decades, a calibrated global scale that some blocks exceed, alpha and a bias."""
    w = torch.randn(n, k, device=DEV, generator=gen)
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    wt, wst = TRITON_W4A4.prepare_weight(*F.quantize_nvfp4(w, gw))
    magnitudes = torch.logspace(-2, 2, k, device=DEV)[torch.randperm(k, device=DEV, generator=gen)]
    x = (torch.randn(m, k, device=DEV, generator=gen) * magnitudes).to(dt)
    gx = F.global_scale_from_amax(x.float().abs().amax() / 2).reshape(1)
    bias = torch.randn(n, device=DEV, generator=gen).to(dt)
    return x, wt, wst, gx, (1 / (gx * gw)).float(), bias


def _separate(x, wt, wst, gx, alpha, bias, n, **launch):
    """The same product through the quantization kernel and then the GEMM."""
    values = fake_quantize_nvfp4_gpu(x, gx, x.dtype)
    return cuda_wgmma.wgmma_gemm(values, wt, wst, alpha, n=n, out_dtype=x.dtype, bias=bias, tile=TILE, splits=1,
                                 **launch)


def _counters_are_zero() -> bool:
    torch.cuda.synchronize()
    return all(int(buf.abs().sum()) == 0 for buf in split_tickets._buffers.values())


# one wave (128 tiles), persistent with a split tail (6144x4096 at M = 1024: 192 tiles), persistent over many
# bands, N and K off the multiples (K = 4112: an odd block count and a last chunk of 16), M off the tile
@pytest.mark.parametrize("n,k,m", [(4096, 4096, 1024), (6144, 4096, 1024), (4096, 14336, 2048), (1000, 4112, 777),
                                   (4096, 4096, 4097), (300, 512, 33)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_equals_the_quantization_kernel_then_the_gemm(seed, n, k, m, dt):
    _need_wgmma()
    gen = torch.Generator(device=DEV)
    gen.manual_seed(seed)
    x, wt, wst, gx, alpha, bias = _case(n, k, m, dt, gen)
    for split_tail in (True, False):
        fused = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=dt, bias=bias, tile=TILE, splits=1,
                                      split_tail=split_tail, global_scale=gx)
        separate = _separate(x, wt, wst, gx, alpha, bias, n, split_tail=split_tail)
        assert torch.isfinite(fused).all()
        assert torch.equal(fused, separate), (split_tail, int((fused != separate).sum()))
    assert _counters_are_zero()


def test_graph_replays(seed):
    """Captured once, replayed on new activations: each replay equals the separate launches (the counters
    start from zero every time)."""
    _need_wgmma()
    gen = torch.Generator(device=DEV)
    gen.manual_seed(seed)
    n, k, m = 6144, 4096, 1500
    x, wt, wst, gx, alpha, bias = _case(n, k, m, torch.bfloat16, gen)
    cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=x.dtype, bias=bias, tile=TILE, splits=1,
                          global_scale=gx)  # build, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_wgmma.wgmma_gemm(x, wt, wst, alpha, n=n, out_dtype=x.dtype, bias=bias, tile=TILE, splits=1,
                                    global_scale=gx)
    for _ in range(3):
        x.copy_(_case(n, k, m, torch.bfloat16, gen)[0])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, _separate(x, wt, wst, gx, alpha, bias, n))
    assert _counters_are_zero()


def test_the_w4a4_linear_takes_it(seed, monkeypatch):
    """At M = 1024 on a 4096x4096 layer the W4A4 linear runs the quantizing launch, and its output is the
    output with FP4C_WGMMA_QUANT=0 (the quantization kernel, then the GEMM)."""
    _need_wgmma()
    gen = torch.Generator(device=DEV)
    gen.manual_seed(seed)
    n, k, m = 4096, 4096, 1024
    x, wt, wst, gx, alpha, bias = _case(n, k, m, torch.bfloat16, gen)
    assert cuda_wgmma.quantizes_in_launch(x, n, k)
    calls = []
    real = cuda_wgmma.wgmma_gemm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("global_scale") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(hopper, "wgmma_gemm", spy)
    monkeypatch.setitem(hopper._GEMM_KINDS, spy, hopper._GEMM_KINDS[real])
    fused = TRITON_W4A4.linear(x, wt, wst, gx, alpha, bias, n)
    monkeypatch.setenv("FP4C_WGMMA_QUANT", "0")
    separate = TRITON_W4A4.linear(x, wt, wst, gx, alpha, bias, n)
    assert calls == [True, False]
    assert torch.equal(fused, separate)
