"""Hopper / Ampere (sm_80+) NVFP4 kernels behind the BackendKernels protocol.

``TRITON_W4A4`` (backend ``triton-w4a4``): the exact W4A4 emulation. Activations are quantized
to NVFP4 (bit-exact block scales) inside the GEMM for M <= 64, or by one quant kernel writing
the exact block values for larger M; both operands become exact bf16 ``e2m1 * sf`` values in
registers, bf16 tensor-core MMA with fp32 accumulation, ``alpha = 1/(gs_a*gs_w)`` and bias
in the fp32 epilogue. Equal to the Blackwell result up to the order of fp32 additions.

``MARLIN`` (backend ``marlin``): W4A16. Activations stay bf16/fp16 (fp32 inputs are rounded
to bf16), weights decoded as above, ``out = acc * alpha + bias`` with ``alpha = 1/gs_w``.

At M <= 8 (M <= 16 for N <= 1024) on sm_89/sm_90 with nvcc, both run the CUDA C++ small-M kernel
(``csrc/hopper/nvfp4_small_m.cu``, ``cuda_small_m.py``) instead: on the bf16/fp16 activations
(W4A16), or on the exact NVFP4 block values written by the quant kernel (W4A4). W4A4 from M = 8
(M = 9..16 up to N = 8192) feeds it the activations' codes in the weight word layout instead
(``cuda_small_m.use_codes``: 0.5625 bytes per activation read from L2, not 2). ``linear_group`` (the
linears of one activation) and ``linear_silu_mul`` (a gate/up pair and its SiLU*mul, in the kernel's
epilogue) run in one launch of it at decode sizes. For M = 17..2048
on sm_90 with nvcc, the same operands go to the warp-specialized wgmma kernel where it measured
faster (``csrc/hopper/nvfp4_wgmma.cu``, ``cuda_wgmma.py``: ``use_wgmma``). At larger M (``use_dequant``) the weight is
dequantized once per call to exact bf16/fp16 values and multiplied by cuBLASLt with alpha (a
device scalar) and the bias in its fp32 epilogue (``cublaslt.py``). Eager calls that the C++ fast path
will replay (``fast_linear``: later calls of the same shape skip this module) take the CUDA kernels at
every M they run, where host time outweighs the GPU time the other kernels would save.

All of them share one weight layout (``weight_layout.py``): uint8 ``[Np, Kp/2]`` (N padded to 32, K to
256) with the code bits of each 4-byte word placed for the in-register decode, and fp8 scales
``[Np, Kp/16]``, both tiled (each 16-row tile's 256-k row pieces contiguous). ``restore_weight`` is
its exact inverse (pure torch, runs on CPU).
On CPU tensors ``mm``/``linear`` raise unless TRITON_INTERPRET=1 (Triton's interpreter, for CI).
"""

from __future__ import annotations

import torch

from ..format import BLOCK_SIZE, check_linear_weight, pad_weight_for_alignment
from . import cublaslt, fast_linear, split_tickets
from . import triton_gemm as _G
from .cuda_quant import MODE_KERNEL_CODES, MODE_VALUES, quantize as quantize_cuda
from .cuda_small_m import (GATED_CODES_MIN_M, MAX_GROUP, small_m_gemm, small_m_gemm_group, use_codes, use_codes_group,
                           use_small_m, use_values_group)
from .cuda_wgmma import use_wgmma, wgmma_gemm
from .triton_gemm import check_cuda, dequant_mm, fp4_gemm, use_dequant
from .gpu_quant import fake_quantize_nvfp4_gpu
from .triton_quant import dequantize_codes_triton, interpreting
from .weight_layout import (ROW_PADDING, TILE_CODE_BYTES, TILE_K, TILE_SCALE_BYTES, from_kernel_layout, tile_rows,
                            to_kernel_layout, untile_rows)

WEIGHT_ALIGNMENT = ROW_PADDING


def _value_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type that carries a dtype's activations: fp16 for fp16, else bf16 (the CUDA
    small-M kernel's operand; NVFP4 block values are exact in both)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _compute_dtype(dtype: torch.dtype, w4a4: bool = False) -> torch.dtype:
    """MMA operand type. W4A4 runs in fp16 for any input dtype: both operands' block values
    (e2m1 * sf, magnitudes in [2^-10, 2688]) are exact in fp16, and fp16 scales are one
    instruction from e4m3. W4A16 keeps the activation type (bf16 for fp32 inputs)."""
    if interpreting() or w4a4:
        return torch.float16  # (bf16 is not usable in Triton's interpreter)
    return _value_dtype(dtype)


def _activation_scale(input_global_scale: torch.Tensor | None) -> torch.Tensor:
    """W4A4's activation global scale as the kernels take it: float32 [1]."""
    if input_global_scale is None:
        raise ValueError("triton-w4a4 linear needs the activation global scale (a float32 tensor of one element)")
    return input_global_scale.reshape(1).float()


# The fast path's name for each CUDA GEMM (fast_linear.remember).
_GEMM_KINDS = {small_m_gemm: fast_linear.GEMM_SMALL_M, wgmma_gemm: fast_linear.GEMM_WGMMA}


def _cuda_gemm(x: torch.Tensor, weight: torch.Tensor, m: int, n: int, w4a4: bool, host_bound: bool = False):
    """The CUDA C++ GEMM that takes an [m, K] x [n, K] call (the wgmma kernel, else the small-M
    kernel), or None. Both take ``(x, weight, weight_scale, alpha, *, n, out_dtype, bias)``.
    ``w4a4``: ``x`` will be the activations' block values, written by a kernel just before;
    ``host_bound``: see ``use_wgmma``. (Below M = 17 the wgmma kernel claims only the eager calls
    that it runs faster than the small-M kernel.)"""
    if use_wgmma(weight, m, after_quantization=w4a4, host_bound=host_bound):
        return wgmma_gemm
    if use_small_m(x, m, n, host_bound):
        return small_m_gemm
    return None


class _HopperKernels:
    """Shared weight handling of the two backends."""

    name = ""
    semantics = ""

    def prepare_weight(self, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_linear_weight(packed, scales)
        packed, scales = pad_weight_for_alignment(packed, scales, WEIGHT_ALIGNMENT, TILE_K)
        weight = tile_rows(to_kernel_layout(packed), TILE_CODE_BYTES)
        scales = tile_rows(scales.view(torch.uint8), TILE_SCALE_BYTES).view(scales.dtype)
        if weight.device.type == "cuda":
            split_tickets.reserve(weight.device)  # allocated here, outside graph capture
            if cublaslt.available(weight.device):
                cublaslt.prepare(weight.device)  # the large-M GEMM's workspace, also outside capture
        return weight, scales.contiguous()

    def restore_weight(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int, in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.shape[1] % 16:
            raise TypeError(f"weight must be uint8 [Np, Kp/2] in {self.name} layout, got {tuple(weight.shape)}")
        packed = from_kernel_layout(untile_rows(weight, TILE_CODE_BYTES))
        scales = untile_rows(weight_scale.view(torch.uint8), TILE_SCALE_BYTES).view(weight_scale.dtype)
        return (
            packed[:out_features, : in_features // 2].contiguous(),
            scales[:out_features, : in_features // BLOCK_SIZE].contiguous(),
        )

    def linear_group(self, x: torch.Tensor, members: list[tuple]) -> list[torch.Tensor] | None:
        """``fp4::linear_group``: the linears of ``x`` (``members``: weight, weight_scale, input_global_scale,
        alpha, bias, out_features each) in one launch of the small-M kernel where the backend's
        ``_group_gemm`` takes them; None otherwise (the op then calls ``linear`` per member).
        Graph-captured decode is where it pays: a separate launch costs each member its launch, ramp and
        tail (NOTES.md v20, v21)."""
        if not 2 <= len(members) <= MAX_GROUP:
            return None
        return self._grouped(x, members, gated=False)

    def linear_silu_mul(self, x: torch.Tensor, members: list[tuple]) -> torch.Tensor | None:
        """``fp4::linear_silu_mul``: silu(gate) * up (``members``: gate's and up's arguments, as
        ``linear_group``'s) in one launch of the small-M kernel where the backend would launch the two as one
        group (``_group_gemm`` with ``gated``): each CTA computes 8 gate rows and their 8 up rows and writes
        the product, so neither projection leaves the CTA and the SiLU*mul takes no launch. None otherwise."""
        if members[0][5] != members[1][5]:
            return None
        outs = self._grouped(x, members, gated=True)
        return None if outs is None else outs[0]

    def _grouped(self, x: torch.Tensor, members: list[tuple], gated: bool) -> list[torch.Tensor] | None:
        """The checks, the flattening of ``x`` and the launch (``_group_gemm``) of ``linear_group`` and
        ``linear_silu_mul``; None where the members' padded K differ or the backend does not group them."""
        lead, k = x.shape[:-1], x.shape[-1]
        for weight, weight_scale, *_, n in members:
            self._check_linear_args(x, weight, weight_scale, n)
        if len({weight.shape[1] for weight, *_ in members}) != 1:
            return None
        outs = self._group_gemm(x.reshape(-1, k), members, gated=gated)
        return None if outs is None else [out.reshape(*lead, out.shape[1]) for out in outs]

    @staticmethod
    def _gemm_members(members: list[tuple]) -> list[tuple]:
        """``small_m_gemm_group``'s members from ``linear_group``'s."""
        return [(weight, weight_scale, alpha.reshape(1).float(), n, bias)
                for weight, weight_scale, _, alpha, bias, n in members]

    @staticmethod
    def _check_linear_args(x, weight, weight_scale, out_features):
        check_cuda(x, weight, weight_scale)
        if x.shape[-1] % BLOCK_SIZE:
            raise ValueError(f"x: K={x.shape[-1]} must be a multiple of {BLOCK_SIZE}")
        if x.shape[-1] > weight.shape[1] * 2:
            raise ValueError(f"x has K={x.shape[-1]} but the weight holds only {weight.shape[1] * 2}")
        if out_features > weight.shape[0]:
            raise ValueError(f"out_features={out_features} exceeds the weight's {weight.shape[0]} rows")


class TritonW4A4Kernels(_HopperKernels):
    name = "triton-w4a4"
    semantics = "W4A4"

    def mm(self, a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
           alpha: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """W4A4 GEMM on quantized operands: a uint8 [M, Ka/2], a_scale fp8 linear [M, Ka/16] -> [M, Np]."""
        check_cuda(a, a_scale, weight, weight_scale, alpha)
        if a.dtype != torch.uint8:
            raise TypeError(f"a must be packed uint8, got {a.dtype}")
        m, ka = a.shape[0], a.shape[1] * 2
        if ka > weight.shape[1] * 2:
            raise ValueError(f"a has K={ka} but the weight holds only {weight.shape[1] * 2}")
        a_scale = a_scale.reshape(m, -1)
        if a_scale.shape[1] < ka // BLOCK_SIZE:
            # the layer pads only the packed codes to the weight's K (fp4::pad_k); the missing
            # blocks are zeros, whose scale is zero
            a_scale = torch.nn.functional.pad(a_scale.view(torch.uint8), (0, ka // BLOCK_SIZE - a_scale.shape[1]))
        if a_scale.shape[1] != ka // BLOCK_SIZE:
            raise ValueError(
                f"{self.name} takes linear activation scales [M, K/16] = [{m}, {ka // BLOCK_SIZE}], "
                f"got {tuple(a_scale.shape)}"
            )
        n = weight.shape[0]
        alpha = alpha.reshape(1).float()
        cuda_gemm = _cuda_gemm(a, weight, m, n, w4a4=True)
        if cuda_gemm is not None:
            vals = dequantize_codes_triton(a, a_scale, _value_dtype(out_dtype))
            return cuda_gemm(vals, weight, weight_scale, alpha, n=n, out_dtype=out_dtype)
        if m <= _G.FUSED_QUANT_MAX_M:
            return fp4_gemm(a, weight, weight_scale, alpha, n=n, k=ka, a_mode=2, out_dtype=out_dtype,
                            a_scale=a_scale.view(torch.uint8), compute_dtype=_compute_dtype(out_dtype, w4a4=True),
                            mode="mm")
        # larger M: the activation block values once (exact), then the GEMM of the linear path
        if use_dequant("w4a4+pq", m, n, ka, out_dtype, a.device):
            vals = dequantize_codes_triton(a, a_scale, _value_dtype(out_dtype))
            return dequant_mm(vals, weight, weight_scale, alpha, n=n, k=ka, out_dtype=out_dtype)
        cdt = _compute_dtype(out_dtype, w4a4=True)
        vals = dequantize_codes_triton(a, a_scale, cdt)
        return fp4_gemm(vals, weight, weight_scale, alpha, n=n, k=ka, a_mode=0, out_dtype=out_dtype,
                        compute_dtype=cdt, mode="w4a4+pq")

    def linear(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_global_scale: torch.Tensor | None, alpha: torch.Tensor, bias: torch.Tensor | None,
               out_features: int) -> torch.Tensor:
        """Fused: quantize x (exact NVFP4) + GEMM * alpha + bias, output [..., out_features] in x.dtype."""
        self._check_linear_args(x, weight, weight_scale, out_features)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        cdt = _compute_dtype(x.dtype, w4a4=True)
        gs = _activation_scale(input_global_scale)
        alpha = alpha.reshape(1).float()
        host_bound = fast_linear.replays(x2, bias)
        if use_codes(x2, m, out_features, host_bound):
            codes, scales = quantize_cuda(x2, gs, MODE_KERNEL_CODES, early_trigger=True)
            out = small_m_gemm(codes, weight, weight_scale, alpha, n=out_features, out_dtype=x.dtype, bias=bias,
                               x_scale=scales, k=k, after_quantization=True)
            fast_linear.remember(self.name, x2, weight, out_features, bias, MODE_KERNEL_CODES,
                                 fast_linear.GEMM_SMALL_M)
        elif (cuda_gemm := _cuda_gemm(x2, weight, m, out_features, True, host_bound)) is not None:
            xq = fake_quantize_nvfp4_gpu(x2, gs, _value_dtype(x.dtype))
            after = {"after_quantization": True} if cuda_gemm is small_m_gemm else {}
            out = cuda_gemm(xq, weight, weight_scale, alpha, n=out_features, out_dtype=x.dtype, bias=bias, **after)
            fast_linear.remember(self.name, x2, weight, out_features, bias, MODE_VALUES, _GEMM_KINDS[cuda_gemm])
        elif m <= _G.FUSED_QUANT_MAX_M:
            out = fp4_gemm(x2, weight, weight_scale, alpha, n=out_features, k=k, a_mode=1, out_dtype=x.dtype,
                           global_scale=gs, bias=bias, compute_dtype=cdt, mode="w4a4")
        elif use_dequant("w4a4+pq", m, out_features, k, x.dtype, x.device):
            xq = fake_quantize_nvfp4_gpu(x2, gs, _value_dtype(x.dtype))
            out = dequant_mm(xq, weight, weight_scale, alpha, n=out_features, k=k, out_dtype=x.dtype, bias=bias)
        else:
            xq = fake_quantize_nvfp4_gpu(x2, gs, cdt)
            out = fp4_gemm(xq, weight, weight_scale, alpha, n=out_features, k=k, a_mode=0, out_dtype=x.dtype,
                           bias=bias, compute_dtype=cdt, mode="w4a4+pq")
        return out.reshape(*lead, out_features)

    def _group_gemm(self, x2: torch.Tensor, members: list[tuple], gated: bool = False) -> list[torch.Tensor] | None:
        """One launch on activation codes from CODES_MIN_M rows (``use_codes_group``), else on block values
        (``use_values_group``), else None; the activations quantized once per global-scale tensor (``gated``:
        ``small_m_gemm_group``'s, where gate and up share that tensor, on codes from GATED_CODES_MIN_M rows)."""
        if gated and members[0][2] is not members[1][2]:
            return None
        codes = use_codes_group(x2, x2.shape[0])
        if gated and codes and x2.shape[0] < GATED_CODES_MIN_M:
            return None
        if not codes and not use_values_group(x2, x2.shape[0], [n for *_, n in members]):
            return None
        quantized = {}
        for _, _, gs, *_ in members:
            if id(gs) in quantized:
                continue
            gs32 = _activation_scale(gs)
            quantized[id(gs)] = (quantize_cuda(x2, gs32, MODE_KERNEL_CODES, early_trigger=True) if codes else
                                 (fake_quantize_nvfp4_gpu(x2, gs32, _value_dtype(x2.dtype)), None))
        xs, scales = zip(*(quantized[id(gs)] for _, _, gs, *_ in members))
        outs = small_m_gemm_group(list(xs), self._gemm_members(members), out_dtype=x2.dtype,
                                  x_scales=list(scales) if codes else None, k=x2.shape[1] if codes else None,
                                  gated=gated)
        if len(quantized) == 1:  # (the fast path quantizes once, with the first member's scale)
            fast_linear.remember_group(self.name, x2, members, gated, MODE_KERNEL_CODES if codes else MODE_VALUES)
        return outs


class MarlinKernels(_HopperKernels):
    name = "marlin"
    semantics = "W4A16"

    @staticmethod
    def _activations(x2: torch.Tensor) -> torch.Tensor:
        """W4A16: the activations themselves, in the MMA's type."""
        cdt = _compute_dtype(x2.dtype)
        return x2 if x2.dtype == cdt else x2.to(cdt)

    def _group_gemm(self, x2: torch.Tensor, members: list[tuple], gated: bool = False) -> list[torch.Tensor] | None:
        """One launch on the activations where ``use_values_group`` takes the group, else None (``gated``:
        ``small_m_gemm_group``'s)."""
        if not use_values_group(x2, x2.shape[0], [n for *_, n in members]):
            return None
        outs = small_m_gemm_group([self._activations(x2)] * len(members), self._gemm_members(members),
                                  out_dtype=x2.dtype, gated=gated)
        fast_linear.remember_group(self.name, x2, members, gated, 0)
        return outs

    def mm(self, a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
           alpha: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError(
            "marlin is a W4A16 backend: it has no GEMM on quantized activations; call linear() "
            "(fp4::linear) with the float activations instead"
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_global_scale: torch.Tensor | None, alpha: torch.Tensor, bias: torch.Tensor | None,
               out_features: int) -> torch.Tensor:
        """W4A16: out = (x @ dequant(w)^T) * alpha + bias, alpha = 1/weight_global_scale; x.dtype out."""
        self._check_linear_args(x, weight, weight_scale, out_features)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        cdt = _compute_dtype(x.dtype)
        xa = self._activations(x2)
        alpha = alpha.reshape(1).float()
        cuda_gemm = _cuda_gemm(xa, weight, xa.shape[0], out_features, False, fast_linear.replays(x2, bias))
        if cuda_gemm is not None:
            out = cuda_gemm(xa, weight, weight_scale, alpha, n=out_features, out_dtype=x.dtype, bias=bias)
            fast_linear.remember(self.name, x2, weight, out_features, bias, 0, _GEMM_KINDS[cuda_gemm])
        elif use_dequant("w4a16", xa.shape[0], out_features, k, x.dtype, x.device):
            out = dequant_mm(xa, weight, weight_scale, alpha, n=out_features, k=k, out_dtype=x.dtype, bias=bias)
        else:
            out = fp4_gemm(xa, weight, weight_scale, alpha, n=out_features, k=k, a_mode=0,
                           out_dtype=x.dtype, bias=bias, compute_dtype=cdt, mode="w4a16")
        return out.reshape(*lead, out_features)


TRITON_W4A4 = TritonW4A4Kernels()
MARLIN = MarlinKernels()

__all__ = ["TRITON_W4A4", "MARLIN", "WEIGHT_ALIGNMENT"]
