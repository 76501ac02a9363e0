"""One W4A16 linear (28672x4096, M=1), one quant call (4096x4096), or one call of the wgmma kernel
or of cuBLAS bf16 (N K M given), for an ncu profile:

ncu --kernel-name regex:_fp4_gemm_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy python3 benchmarks/profile_one.py gemm
ncu --kernel-name regex:nvfp4_wgmma --launch-skip 2 --launch-count 1 ... profile_one.py wgmma 28672 4096 1024
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops.hopper import MARLIN  # noqa: E402
from fp4_compile.ops.gpu_quant import quantize_nvfp4_gpu  # noqa: E402

what = sys.argv[1] if len(sys.argv) > 1 else "gemm"
if what == "gemm":
    n, k, m = 28672, 4096, int(sys.argv[2]) if len(sys.argv) > 2 else 1
    w = torch.randn(n, k, device="cuda")
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    wt, wst = MARLIN.prepare_weight(*F.quantize_nvfp4(w, gw))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        MARLIN.linear(x, wt, wst, None, (1 / gw).float(), None, n)
elif what == "wgmma":
    from fp4_compile.ops.cuda_wgmma import wgmma_gemm

    n, k, m = (int(v) for v in sys.argv[2:5])
    w = torch.randn(n, k, device="cuda")
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    wt, wst = MARLIN.prepare_weight(*F.quantize_nvfp4(w, gw))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        wgmma_gemm(x, wt, wst, (1 / gw).float(), n=n, out_dtype=torch.bfloat16)
elif what == "bf16":  # cuBLAS bf16 of the same shape (N K M), the reference for the wgmma profiles
    n, k, m = (int(v) for v in sys.argv[2:5])
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ w.t()
else:
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    gs = torch.ones(1, device="cuda")
    for _ in range(3):
        quantize_nvfp4_gpu(x, gs, False)
torch.cuda.synchronize()
print("done")
