"""Host (CPU) time per eager call of the Hopper backends' linear, and where it goes.

Eager prefill and decode without CUDA graphs are bound by host launch overhead when the GPU work
per call is short. For each M: microseconds of host time per call (many calls, no
synchronisation) of the whole call through ``torch.ops.fp4.linear`` and through the backend, and of
its parts on their own (the op dispatch, the checks, the quantization launch, the GEMM launch,
an allocation), an eager ``fp4.linear_group`` of three linears (what the compile pass makes of a
layer's q/k/v at decode M), ``fp4.linear_silu_mul`` and ``fp4.rms_norm_quantize`` (the other ops of a
compiled layer), then the top functions of a cProfile run of the op call.

python benchmarks/profile_host.py [--n 4096] [--k 4096] [--ms 1,2048] [--calls 2000] [--no-profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import make_fp4_weights, python_profile  # noqa: E402

from fp4_compile import format as F  # noqa: E402
from fp4_compile.backends import kernels_for  # noqa: E402
import triton  # noqa: E402

from fp4_compile.ops import library, nvcc  # noqa: E402
from fp4_compile.ops import triton_quant as TQ  # noqa: E402
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu  # noqa: E402
from fp4_compile.ops.rms_norm_quant import rms_norm_quantize_gpu  # noqa: E402
from fp4_compile.ops.silu_mul import silu_mul  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4, _cuda_gemm  # noqa: E402
from fp4_compile.ops.triton_gemm import dequant_mm  # noqa: E402


@torch.library.custom_op("fp4_profile::noop", mutates_args=())
def _noop(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, gs: torch.Tensor, alpha: torch.Tensor,
          bias: torch.Tensor | None, n: int, backend: str) -> torch.Tensor:
    """An op with fp4::linear's signature that does nothing: the cost of the op dispatch itself."""
    return x.new_empty(0)


@torch.library.custom_op("fp4_profile::backend_linear", mutates_args=())
def _backend_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, gs: torch.Tensor, alpha: torch.Tensor,
                    bias: torch.Tensor | None, n: int, backend: str) -> torch.Tensor:
    """The backend's linear behind a custom op, without fp4::linear's checks."""
    return kernels_for(backend).linear(x, w, s, gs, alpha, bias, n)


# The same behind a plain torch.library registration (no custom_op wrappers)
_LIB = torch.library.Library("fp4_profile", "FRAGMENT")
_LIB.define("lib_linear(Tensor x, Tensor w, Tensor s, Tensor gs, Tensor alpha, Tensor? bias, int n, str backend) "
            "-> Tensor")
_LIB.impl("lib_linear", lambda *a: kernels_for(a[-1]).linear(*a[:-1]), "CUDA")


def host_us(fn, calls: int) -> tuple[float, float]:
    """(host us per call, host + GPU us per call) of ``calls`` calls issued back to back. With few
    calls the host never waits for a full launch queue, so the first is the host's own time."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--ms", default="1,64,2048")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--no-profile", action="store_true", help="only the table, no cProfile listings")
    args = ap.parse_args()
    n, k = args.n, args.k
    wt, wst, gw = make_fp4_weights(n, k, 1, MARLIN)[0]
    for m in [int(v) for v in args.ms.split(",")]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        alpha44, alpha16 = (1 / (gx * gw)).float(), (1 / gw).float()
        xq = fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16)
        cuda_gemm = _cuda_gemm(xq, wt, m, n, w4a4=True)
        if cuda_gemm is not None:
            gemm = lambda: cuda_gemm(xq, wt, wst, alpha44, n=n, out_dtype=torch.bfloat16)  # noqa: E731
        else:
            gemm = lambda: dequant_mm(xq, wt, wst, alpha44, n=n, k=k, out_dtype=torch.bfloat16)  # noqa: E731
        v = torch.empty((m, k), dtype=torch.bfloat16, device="cuda")
        norm_w = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        bm, bg, warps = TQ._quant_blocks(m, k // 16)
        grid = (triton.cdiv(m, bm), triton.cdiv(k // 16, bg))
        parts = {
            "op w4a4 (torch.ops.fp4.linear)": lambda: torch.ops.fp4.linear(x, wt, wst, gx, alpha44, None, n,
                                                                           "triton-w4a4"),
            "op w4a16": lambda: torch.ops.fp4.linear(x, wt, wst, gw, alpha16, None, n, "marlin"),
            # three linears of one input (a layer's q/k/v), as the compile pass groups them at decode M;
            # against three times the rows above
            "op w4a4 group of 3 (torch.ops.fp4.linear_group)": lambda: torch.ops.fp4.linear_group(
                x, [wt] * 3, [wst] * 3, [gx] * 3, [alpha44] * 3, [None] * 3, [n] * 3, "triton-w4a4"),
            "op w4a16 group of 3": lambda: torch.ops.fp4.linear_group(
                x, [wt] * 3, [wst] * 3, [gw] * 3, [alpha16] * 3, [None] * 3, [n] * 3, "marlin"),
            # a gated MLP's first half and the norm before a layer's W4A4 linears (the compile passes' ops)
            "op w4a4 gate/up + silu*mul (fp4.linear_silu_mul)": lambda: torch.ops.fp4.linear_silu_mul(
                x, [wt] * 2, [wst] * 2, [gx] * 2, [alpha44] * 2, [None] * 2, n, "triton-w4a4"),
            "op w4a16 gate/up + silu*mul": lambda: torch.ops.fp4.linear_silu_mul(
                x, [wt] * 2, [wst] * 2, [gw] * 2, [alpha16] * 2, [None] * 2, n, "marlin"),
            "op rms_norm_quantize (residual)": lambda: torch.ops.fp4.rms_norm_quantize(x, x, norm_w, 1e-5, gx),
            "op rms_norm_quantize (residual, Gemma's)": lambda: torch.ops.fp4.rms_norm_quantize(
                x, x, norm_w, 1e-5, gx, True),
            "  rms_norm_quantize_gpu": lambda: rms_norm_quantize_gpu(x, x, norm_w, 1e-5, gx),
            "  silu_mul": lambda: silu_mul(gate, gate),
            "backend w4a4 (TRITON_W4A4.linear)": lambda: TRITON_W4A4.linear(x, wt, wst, gx, alpha44, None, n),
            "backend w4a16 (MARLIN.linear)": lambda: MARLIN.linear(x, wt, wst, None, alpha16, None, n),
            "custom op around the backend (w4a4)": lambda: torch.ops.fp4_profile.backend_linear(
                x, wt, wst, gx, alpha44, None, n, "triton-w4a4"),
            "Library op around the backend (w4a4)": lambda: torch.ops.fp4_profile.lib_linear(
                x, wt, wst, gx, alpha44, None, n, "triton-w4a4"),
            "  op dispatch (a no-op custom op)": lambda: torch.ops.fp4_profile.noop(x, wt, wst, gx, alpha44, None, n,
                                                                                "triton-w4a4"),
            "  op checks (fp4::linear's)": lambda: (library._check_activation(x, gx),
                                                   library._check_weight(wt, wst, alpha44),
                                                   F.check_same_device(x=x, weight=wt, weight_scale=wst,
                                                                       alpha=alpha44, bias=None)),
            "  quantization to block values": lambda: fake_quantize_nvfp4_gpu(x, gx, torch.bfloat16),
            f"  GEMM ({getattr(cuda_gemm, '__name__', 'dequant_mm')})": gemm,
            "  torch.empty [M, N]": lambda: torch.empty((m, n), dtype=torch.bfloat16, device="cuda"),
            "  backend checks (_check_linear_args)": lambda: TRITON_W4A4._check_linear_args(x, wt, wst, n),
            "  GEMM choice (_cuda_gemm)": lambda: _cuda_gemm(xq, wt, m, n, w4a4=True),
            "  GEMM operand checks (gemm_operands)": lambda: nvcc.gemm_operands("x", xq, wt, wst, alpha44, None,
                                                                               torch.bfloat16),
            "  launch_on with a no-op launch": lambda: nvcc.launch_on(x.device, lambda c, s: 0),
            "  Triton quant kernel launch alone": lambda: TQ._quant_kernel[grid](
                x, gx, v, v, v, m, k // 16, x.stride(0), v.stride(0), v.stride(0), v.stride(0), m, k // 16,
                BLOCK_M=bm, BLOCK_G=bg, MODE=TQ.MODE_VALUES, num_warps=warps, **TQ.pdl_launch_args(x.device)),
            "  pdl_launch_args": lambda: TQ.pdl_launch_args(x.device),
            "  x.device": lambda: x.device,
            "  gs.reshape(1).float()": lambda: gx.reshape(1).float(),
        }
        print(f"=== M={m}, N={n}, K={k}: us per call: host ({args.calls} calls), host (100 calls), "
              "host + GPU (100 calls)")
        for name, fn in parts.items():
            many, _ = host_us(fn, args.calls)
            few, total = host_us(fn, 100)
            print(f"{name:44s} {many:8.1f} {few:8.1f} {total:8.1f}")
        if not args.no_profile:
            print(python_profile(parts["op w4a4 (torch.ops.fp4.linear)"], calls=200, sort="tottime", lines=25))


if __name__ == "__main__":
    main()
