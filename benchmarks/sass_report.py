"""Offline sm_90 compile of the GEMM kernel variants (no GPU needed): registers, spills, SASS mix.

Uses Triton's bundled ptxas/nvdisasm. python benchmarks/sass_report.py [--dump DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fp4_compile.ops.triton_gemm import _fp4_gemm_kernel  # noqa: E402
from fp4_compile.ops.triton_quant import _quant_kernel  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTRS = {"a_ptr": "*bf16", "as_ptr": "*u8", "w_ptr": "*i32", "ws_ptr": "*i16", "out_ptr": "*bf16", "bias_ptr": "*bf16",
        "alpha_ptr": "*fp32", "gs_ptr": "*fp32", "part_ptr": "*fp32", "lock_ptr": "*i32"}
INTS = ["M", "N", "K", "stride_am", "stride_asm", "stride_wn", "stride_wsn", "stride_om", "stride_part", "split_k"]
DIV16 = {"K", "stride_am", "stride_wn", "stride_wsn", "stride_om", "N", "stride_part"}


def compile_gemm(num_warps=4, num_stages=4, **cx):
    sig = dict(PTRS)
    sig.update({k: "i32" for k in INTS})
    consts = dict(A_MODE=0, BM=16, BN=64, BK=256, IS_SPLIT=False, GROUP_M=8, DOT=True, SWAP=True, USE_ASM=True,
                  EVEN_K=True, HAS_BIAS=False, IS_FP16=False, W_EVICT="evict_first")
    consts.update(cx)
    consts.setdefault("BMQ", consts["BM"])
    if consts["A_MODE"] == 1:
        sig["a_ptr"] = "*bf16"
    for k in consts:
        sig[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n.endswith("ptr") or n in DIV16}
    src = ASTSource(fn=_fp4_gemm_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                          "num_stages": num_stages})


def compile_quant(num_warps=4, **cx):
    sig = {"x_ptr": "*bf16", "gs_ptr": "*fp32", "q_ptr": "*u8", "s_ptr": "*u8", "v_ptr": "*bf16"}
    for k in ("M", "KB", "stride_xm", "stride_qm", "stride_sm", "stride_vm", "MP", "KBP"):
        sig[k] = "i32"
    consts = dict(BLOCK_M=8, BLOCK_G=16, MODE=0)
    consts.update(cx)
    for k in consts:
        sig[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if n.endswith("ptr") or n in ("stride_xm", "stride_qm", "stride_vm", "KB")}
    src = ASTSource(fn=_quant_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def analyse(k, dump=None, name="k"):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        open(path, "wb").write(k.asm["cubin"])
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        open(os.path.join(dump, name + ".sass"), "w").write(sass)
        open(os.path.join(dump, name + ".ttgir"), "w").write(k.asm["ttgir"])
        open(os.path.join(dump, name + ".ptx"), "w").write(k.asm["ptx"])
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    ops = collections.Counter()
    for line in sass.splitlines():
        mm = re.match(r"\s*(?:/\*[0-9a-f]+\*/)?\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if mm:
            ops[mm.group(1)] += 1
    out = {"regs": int(m.group(1)) if m else None, "stack": int(m.group(2)) if m else None,
           "shared": int(m.group(3)) if m else None, "local": int(m.group(4)) if m else None}
    keys = ["HGMMA", "HMMA", "LDG", "LDGSTS", "LDS", "LDSM", "STS", "LDL", "STL", "LOP3", "SHF", "PRMT", "HFMA2",
            "FFMA", "FMUL", "IMAD", "F2FP", "BAR", "SYNCS", "UTMALDG"]
    out.update({kk: ops.get(kk, 0) for kk in keys})
    out["total"] = sum(ops.values())
    return out


VARIANTS = {
    "m1_w4a4_fp16": dict(A_MODE=1, BM=16, BMQ=1, BN=64, BK=256, IS_FP16=True),
    "m1_w4a16": dict(A_MODE=0, BM=16, BMQ=1, BN=64, BK=256),
    "m16_w4a16": dict(A_MODE=0, BM=16, BN=64, BK=256),
    "m16_w4a4_fp16": dict(A_MODE=1, BM=16, BN=64, BK=256, IS_FP16=True),
    "m16_w4a4_bf16": dict(A_MODE=1, BM=16, BN=64, BK=256),
    "m16_bn128_bk128": dict(A_MODE=0, BM=16, BN=128, BK=128),
    "m1_fma": dict(A_MODE=0, BM=1, BN=32, BK=256, DOT=False, num_stages=3),
    "m64": dict(A_MODE=1, BM=64, BN=128, BK=128, num_stages=3),
    "m4096_swap": dict(A_MODE=0, BM=128, BN=128, BK=64, num_warps=8, num_stages=4, W_EVICT=""),
    "m4096_swap_bn256": dict(A_MODE=0, BM=128, BN=256, BK=64, num_warps=8, num_stages=3, W_EVICT=""),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    for name, cx in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        try:
            k = compile_gemm(**cx)
            print(name, analyse(k, args.dump, name), flush=True)
        except Exception as e:  # noqa: BLE001
            print(name, "FAILED", repr(e)[:300], flush=True)
    for name, cx in {"quant": {}, "quant_values": dict(MODE=2)}.items():
        if args.only and args.only not in name:
            continue
        k = compile_quant(**cx)
        print(name, analyse(k, args.dump, name), flush=True)


if __name__ == "__main__":
    main()
