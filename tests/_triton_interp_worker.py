"""Worker for test_triton_interpret.py: runs the Hopper Triton kernels in Triton's interpreter.

Run as a subprocess with TRITON_INTERPRET=1 set before triton is imported; prints one JSON
line of results (fresh random data every run; the seed is included for reproduction).
"""

import json
import os
import random
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


def _scalar_index_of_one_element_arrays() -> None:
    """Triton 3.6's interpreter makes a scalar an index with ``int()`` of its 1-element array, which numpy
    2.5 refuses ('only 0-dimensional arrays can be converted', at every ``range(kt0, kt1)``; the GPU image
    pairs the two); Triton 3.9 squeezes the array first. Do as 3.9 does."""
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:  # another layout of the interpreter: leave it as it is
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_scalar_index_of_one_element_arrays()

import exact_bounds  # noqa: E402 (beside this file: the script's directory is on sys.path)

from fp4_compile import format as F  # noqa: E402
from fp4_compile.ops import triton_gemm as G  # noqa: E402
from fp4_compile.ops.hopper import MARLIN, TRITON_W4A4  # noqa: E402
from fp4_compile.ops.gpu_quant import quantize_nvfp4_gpu  # noqa: E402
from fp4_compile.ops.rms_norm_quant import rms_norm_quantize_gpu  # noqa: E402
from fp4_compile.ops.silu_mul import BLOCK as SILU_MUL_BLOCK, silu_mul  # noqa: E402

THRESHOLDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def ref_scaled_values(x, gs):
    """The reference's x * out_scale (clamped), float32 [M, K], for tie detection."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 16, 16)
    amax = blocks.abs().amax(-1)
    sf = torch.clamp(gs.reshape(()) * (amax * torch.tensor(1 / 6, dtype=torch.float32)), max=448.0)
    sf = sf.to(torch.float8_e4m3fn).float()
    inv = torch.reciprocal(gs.reshape(()))
    os_ = torch.where(sf == 0, torch.zeros_like(sf), torch.reciprocal(sf * inv))
    return torch.clamp(blocks * os_.unsqueeze(-1), -6, 6).reshape(m, k)


def check_quant(x, gs, swizzle):
    q, s = quantize_nvfp4_gpu(x, gs, swizzle)
    qr, sr = F.quantize_nvfp4(x, gs, swizzle=swizzle)
    res = {"scale_shape_ok": tuple(s.shape) == tuple(sr.shape) and s.dtype == sr.dtype,
           "scale_bytes_equal": bool(torch.equal(s.view(torch.uint8), sr.view(torch.uint8)))}
    m, k = x.shape
    codes, codes_r = F.unpack_e2m1(q).long(), F.unpack_e2m1(qr).long()
    finite_block = torch.isfinite(x.float().reshape(m, k // 16, 16)).all(-1)
    finite = finite_block.repeat_interleave(16, dim=1)
    v = ref_scaled_values(x, gs).abs().double()
    at_tie = (v.unsqueeze(-1) == THRESHOLDS).any(-1)
    differ = (codes != codes_r) & finite
    step = ((codes & 7) - (codes_r & 7)).abs()
    res["code_mismatch_not_tie"] = int((differ & ~at_tie).sum())
    res["code_mismatch_tie_bad_step"] = int((differ & at_tie & (step > 1)).sum())
    return res


def main():
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    out = {"seed": seed, "quant": [], "gemm": [], "roundtrip": []}

    # ---- quantization kernel: odd M, special blocks, ties
    for dt in (torch.float32, torch.float16):
        m, k = 37, 96
        x = (torch.randn(m, k) * torch.logspace(-3, 3, k)).to(dt)
        x[0, :16] = 0
        x[1, 3] = float("inf")
        x[2, 40] = float("nan")
        x[3, :16] *= 1e-6
        x[4, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, -2.5, 1, 2, 3, 4, 0.5])
        gs = F.global_scale_from_amax(x.float().abs().nan_to_num(0, 0, 0).amax()).reshape(1)
        for swz in (False, True):
            r = check_quant(x, gs, swz)
            r.update(dtype=str(dt), swizzle=swz)
            out["quant"].append(r)
        # exact rounding ties: with gs = 1 and amax 6, sf = 1 and out_scale = 1
        xt = torch.randn(4, 32).to(dt)
        xt[:, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, -2.5, 1, 2, 3, 4, 0.5])
        r = check_quant(xt, torch.tensor([1.0]), False)
        r.update(dtype=str(dt), swizzle=False, ties=True)
        out["quant"].append(r)

    # ---- GEMMs: W4A4 fused (in-kernel quant, pre-quant path at M > 64), mm, W4A16, split-K
    cases = [(1, 40, 80, None), (3, 64, 128, None), (17, 33, 48, None), (70, 40, 64, None),
             (5, 96, 256, G.GemmConfig(BM=16, BN=32, BK=32, SPLIT_K=3, num_stages=1)),
             (1, 64, 128, G.GemmConfig(BM=1, BN=32, BK=32, SPLIT_K=1, DOT=False, num_stages=1)),
             (20, 64, 96, G.GemmConfig(BM=16, BN=32, BK=32, SPLIT_K=1, SWAP=False, num_stages=1))]
    for m, n, k, cfg in cases:
        w = torch.randn(n, k)
        gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
        pw, sw = F.quantize_nvfp4(w, gw)
        wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
        bias = torch.randn(n)
        wv = F.block_values(pw, sw).double()
        for dt in (torch.float16, torch.float32):
            x = torch.randn(m, k).to(dt)
            gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
            alpha = (1 / (gx * gw)).float()
            px, sx = F.quantize_nvfp4(x, gx)
            ref = (F.block_values(px, sx).double() @ wv.t()) * alpha.double()
            rec = {"m": m, "n": n, "k": k, "dtype": str(dt), "config": repr(cfg)}
            if cfg is None:
                o = TRITON_W4A4.linear(x, wt, wst, gx, alpha, bias.to(dt), n)
                rec["w4a4_shape_ok"] = tuple(o.shape) == (m, n) and o.dtype == dt
                rec["w4a4"] = rel(o, ref + bias.double())
                qx, qs = quantize_nvfp4_gpu(x, gx)
                rec["mm"] = rel(TRITON_W4A4.mm(qx, qs, wt, wst, alpha, dt)[:, :n], ref)
                # as the layer calls it: codes padded to the weight's K, scales not
                qp = F.pad_activation_for_alignment(qx, wt.shape[1] * 2)
                rec["mm_padded_k"] = rel(TRITON_W4A4.mm(qp, qs, wt, wst, alpha, dt)[:, :n], ref)
                o16 = MARLIN.linear(x, wt, wst, None, (1 / gw).float(), None, n)
                ref16 = x.to(torch.float16).double() @ wv.t() / gw.double()
                rec["w4a16"] = rel(o16, ref16)
            else:
                a_mode = 1
                o = G.fp4_gemm(x, wt, wst, alpha, n=n, k=k, a_mode=a_mode, out_dtype=dt, global_scale=gx,
                               bias=None, compute_dtype=torch.float16, config=cfg, mode="w4a4")
                rec["w4a4"] = rel(o, ref)
            out["gemm"].append(rec)

    # ---- random shapes and launch configurations, element by element against float64 (exact_bounds.py)
    rng = random.Random(seed)
    out["fuzz"] = []
    for i in range(10):
        m, n, k = rng.choice((1, 2, 5, 16, 17, 33, 65, 70)), rng.randint(1, 80), 16 * rng.randint(1, 12)
        dt = (torch.float16, torch.float32)[i % 2]
        cfg = None if i < 4 else G.GemmConfig(BM=rng.choice((16, 32)), BN=rng.choice((32, 64)), BK=rng.choice((32, 64)),
                                              SPLIT_K=rng.choice((1, 2, 3)), num_stages=1)
        w = torch.randn(n, k)
        gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
        pw, sw = F.quantize_nvfp4(w, gw)
        wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
        wv = F.block_values(pw, sw).double()
        x = (torch.randn(m, k) * 10.0 ** rng.uniform(-3, 3)).to(dt)
        gx = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
        bias = torch.randn(n).to(dt) if rng.random() < 0.5 else None
        a44, a16 = (1 / (gx * gw)).float(), (1 / gw).float()
        xv44 = F.block_values(*F.quantize_nvfp4(x, gx)).double()
        xv16 = x.to(torch.float16).double()  # W4A16 in the interpreter: fp16 operands
        if cfg is None:
            o44 = TRITON_W4A4.linear(x, wt, wst, gx, a44, bias, n)
            o16 = MARLIN.linear(x, wt, wst, None, a16, bias, n)
        else:
            o44 = G.fp4_gemm(x, wt, wst, a44, n=n, k=k, a_mode=1, out_dtype=dt, global_scale=gx, bias=bias,
                             compute_dtype=torch.float16, config=cfg, mode="w4a4")
            o16 = G.fp4_gemm(x.to(torch.float16), wt, wst, a16, n=n, k=k, a_mode=0, out_dtype=dt, bias=bias,
                             compute_dtype=torch.float16, config=cfg, mode="w4a16")
        rec = {"m": m, "n": n, "k": k, "dtype": str(dt), "bias": bias is not None, "config": repr(cfg)}
        for name, o, xv, alpha in (("w4a4", o44, xv44, a44), ("w4a16", o16, xv16, a16)):
            ref, size = exact_bounds.product_and_size(xv, wv, alpha, bias)
            rec[name + "_shape_ok"] = tuple(o.shape) == (m, n) and o.dtype == dt
            rec[name + "_bad"] = int(exact_bounds.outside(o, ref, size).sum())
        out["fuzz"].append(rec)

    # ---- dequantization kernels (weights in the kernel layout; activation codes)
    from fp4_compile.ops.triton_quant import dequantize_codes_triton

    n, k = 40, 96
    w = torch.randn(n, k)
    pw, sw = F.quantize_nvfp4(w, F.global_scale_from_amax(w.abs().amax()).reshape(1))
    wt, wst = TRITON_W4A4.prepare_weight(pw, sw)
    wd = G.dequantize_weight(wt, wst, n, k, torch.float16)
    out["dequant_weight_exact"] = bool(torch.equal(wd.float(), F.block_values(pw, sw)))
    x = torch.randn(5, k)
    px, sx = F.quantize_nvfp4(x, F.global_scale_from_amax(x.abs().amax()).reshape(1))
    out["dequant_codes_exact"] = bool(torch.equal(dequantize_codes_triton(px, sx, torch.float16).float(),
                                                  F.block_values(px, sx)))

    # ---- non-finite activations give non-finite rows
    n, k = 32, 64
    w = torch.randn(n, k)
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    wt, wst = TRITON_W4A4.prepare_weight(*F.quantize_nvfp4(w, gw))
    x = torch.randn(3, k)
    x[1, 5] = float("inf")
    o = TRITON_W4A4.linear(x, wt, wst, torch.tensor([1.0]), torch.tensor([1.0]), None, n)
    out["nonfinite"] = {"bad_row_nonfinite": bool((~torch.isfinite(o[1])).all()),
                        "good_rows_finite": bool(torch.isfinite(o[[0, 2]]).all())}

    # ---- prepare/restore round trip (odd N, K)
    for n, k in ((7, 48), (40, 80), (64, 256)):
        w = torch.randn(n, k)
        pw, sw = F.quantize_nvfp4(w, F.global_scale_from_amax(w.abs().amax()).reshape(1))
        for kern in (TRITON_W4A4, MARLIN):
            wt, wst = kern.prepare_weight(pw, sw)
            p2, s2 = kern.restore_weight(wt, wst, n, k)
            out["roundtrip"].append(bool(torch.equal(p2, pw) and torch.equal(s2.view(torch.uint8), sw.view(torch.uint8))
                                         and wt.shape[0] % 32 == 0 and wt.shape[1] % 16 == 0))

    # ---- silu(gate) * up (the fallback of fp4::linear_silu_mul): odd widths, a strided gate, against
    # float64 with the SiLU rounded to the dtype
    out["silu_mul"] = []
    for dt in (torch.float32, torch.float16):
        for m, n in ((1, 7), (3, SILU_MUL_BLOCK + 40)):
            gate = (torch.randn(m, 2 * n) * 4).to(dt)[:, ::2]
            up = torch.randn(m, n).to(dt)
            got = silu_mul(gate, up)
            act = torch.nn.functional.silu(gate.double()).to(dt).double()
            out["silu_mul"].append({"dtype": str(dt), "m": m, "n": n, "shape_ok": got.shape == (m, n),
                                    "rel": rel(got, act * up.double())})

    # ---- RMSNorm (+ residual) and block values in one pass, against the op's CPU reference
    out["rms_norm_quant"] = []
    for dt in (torch.float32, torch.float16):
        for m, k, residual, unit_offset in ((1, 48, False, False), (3, 208, True, False), (2, 256, True, False),
                                            (3, 208, True, True), (1, 48, False, True)):  # (unit_offset: Gemma's)
            x = (torch.randn(m, k) * 4).to(dt)
            r = torch.randn(m, k).to(dt) if residual else None
            w = (torch.randn(k) / 4 + (0 if unit_offset else 1)).to(dt)
            gs = F.global_scale_from_amax(torch.tensor(40.0)).reshape(1)
            # (CPU: the reference)
            ref_values, ref_total = torch.ops.fp4.rms_norm_quantize(x, r, w, 1e-5, gs, unit_offset)
            values, total = rms_norm_quantize_gpu(x, r, w, 1e-5, gs, unit_offset)
            out["rms_norm_quant"].append({
                "dtype": str(dt), "m": m, "k": k, "residual": residual, "unit_offset": unit_offset,
                "total_equal": bool(torch.equal(total, ref_total)) if residual else total is None,
                "values_mismatch": float((values != ref_values).float().mean())})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
