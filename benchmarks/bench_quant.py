"""NVFP4 activation quantization kernel: GB/s vs measured copy bandwidth (M=4096, K=4096 / 14336).

Bytes = read x (bf16) + write codes (K/2) + write scales (K/16), or + write the bf16 block values.
CUDA graph over rotating inputs; "eager_us" also times back-to-back eager calls. Each variant
through the library's dispatch ("dispatch": the CUDA kernel of ``cuda_quant.py`` for codes at
M >= 1024 and for eager block values, so its graph time of block values is Triton's and its eager
time the CUDA kernel's; else Triton), through the Triton kernel ("triton"), and at M >= 1024 through
the CUDA kernel at each grid size ("cudaN": N CTAs per SM; block values at every M).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import measured_env, print_table, time_eager_us, time_graph_us, write_json  # noqa: E402

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import cuda_quant, triton_gemm  # noqa: E402,F401  (triton_gemm: the tuned quant config)
from fp4_compile.ops.gpu_quant import fake_quantize_nvfp4_gpu, quantize_nvfp4_gpu  # noqa: E402


CTAS_PER_SM = (2, 4, 8, 16)


def main():
    info, bw, _ = measured_env(tensor_core=False)
    rows = []
    for m, k in ((4096, 4096), (4096, 14336), (1, 4096), (16, 4096), (64, 4096), (256, 4096)):
        nbytes_in = m * k * 2
        copies = max(2, (256 * 2**20) // nbytes_in) if m >= 1024 else 8
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        gs = F.global_scale_from_amax(xs[0].float().abs().amax()).reshape(1)
        moved = m * k * 2 + m * k // 2 + m * k // 16
        cuda = cuda_quant.unavailable_reason(torch.cuda.current_device()) is None
        impls = ["dispatch", "triton"] + ([f"cuda{c}" for c in CTAS_PER_SM] if cuda else [])
        for impl, variant in [(i, v) for i in impls for v in ("linear", "swizzled", "values")]:
            if impl.startswith("cuda") and m < 1024 and (variant != "values" or impl != "cuda16"):
                continue  # small M: the block values at the default grid only
            if variant == "values" and impl.startswith("cuda"):
                calls = [lambda x=x, c=int(impl[4:]): cuda_quant.quantize(
                    x, gs, cuda_quant.MODE_VALUES, ctas_per_sm=c, out_dtype=torch.bfloat16) for x in xs]
                vbytes = m * k * 4
            elif variant == "values":
                calls = [lambda x=x: fake_quantize_nvfp4_gpu(x, gs, torch.bfloat16) for x in xs]
                vbytes = m * k * 4
            elif impl.startswith("cuda"):
                calls = [lambda x=x, s=variant == "swizzled", c=int(impl[4:]): cuda_quant.quantize(
                    x, gs, cuda_quant.MODE_SWIZZLED if s else cuda_quant.MODE_LINEAR, ctas_per_sm=c) for x in xs]
                vbytes = moved
            else:
                calls = [lambda x=x, s=variant == "swizzled": quantize_nvfp4_gpu(x, gs, s) for x in xs]
                vbytes = moved
            use = cuda_quant.use_cuda_quant
            if impl == "triton":
                cuda_quant.use_cuda_quant = lambda *args: False
            try:
                t = time_graph_us(calls)
                te = time_eager_us(calls)
            finally:
                cuda_quant.use_cuda_quant = use
            gbs = vbytes / (t * 1e-6) / 1e9
            rows.append({"m": m, "k": k, "impl": impl, "variant": variant, "us": round(t, 2),
                         "eager_us": round(te, 2), "GBps": round(gbs, 1), "copy_frac": round(gbs / bw, 3)})
            print(rows[-1], flush=True)
        del xs
    path = write_json("bench_quant.json", {"env": info, "rows": rows})
    print(f"wrote {path}")
    print_table(rows, ["m", "k", "impl", "variant", "us", "eager_us", "GBps", "copy_frac"],
                f"NVFP4 quantization kernel, {info['gpu']}, copy {bw:.0f} GB/s")


if __name__ == "__main__":
    main()
