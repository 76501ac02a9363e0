"""The eager fast path of ``fp4::linear`` on Hopper (``csrc/hopper/fast_linear.cpp``): build, load, plans.

An eager call of the Python implementation costs about 100-150 us of host time on the H100 hosts
(checks, dispatch decisions, two ctypes launches), more than the GPU time of most decode and
prefill linears: without CUDA graphs the GPU waits for the host (benchmarks/NOTES.md, v10 and v19).
The C++ extension registers a CUDA kernel for ``fp4::linear`` that replays, for a call whose key
(backend, device, dtype, bias or not, M, K, N, and the weight's padded Np and Kp) it has seen, the
launches the Python implementation chose for that key. The choices stay here, in Python: after an
eager call on the CUDA kernels, ``remember`` records its ``Plan`` (kernels' C entry points and launch
parameters). Calls the extension cannot replay exactly (unseen keys, CUDA-graph capture, strided rows,
other dtypes) run ``fp4::_linear_python``, the Python implementation, with its checks and errors.

Built on first use with ``torch.utils.cpp_extension`` (g++ against this torch's headers, ninja; about
10 s once, then cached under ``nvcc.build_dir()``). ``FP4C_FAST_LINEAR=0`` turns it off; a failed
build does the same, once, with a warning naming the cause.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import pathlib
from typing import NamedTuple

import torch

from . import cuda_quant, cuda_small_m, cuda_wgmma, nvcc
from .pdl import use_pdl

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "fast_linear.cpp"
# Plan.gemm_kind
GEMM_SMALL_M = 0
GEMM_WGMMA = 1
# The activation dtypes the extension takes (cuda_quant's codes for them, part of a plan's key).
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}


class Plan(NamedTuple):
    """What the extension replays for a key; the field order of ``struct Plan`` in fast_linear.cpp."""
    quant_fn: int           # fp4c_nvfp4_quant's address (0: the GEMM takes x itself, W4A16)
    quant_mode: int         # 0 (none), cuda_quant.MODE_VALUES or cuda_quant.MODE_KERNEL_CODES
    quant_ctas_per_sm: int
    gemm_fn: int            # fp4c_nvfp4_small_m_gemm's or fp4c_nvfp4_wgmma_gemm's address
    gemm_kind: int          # GEMM_SMALL_M or GEMM_WGMMA
    p0: int                 # small-M: rows per warp, stages, warps; wgmma: bn, wm, splits, tail tiles, tail splits
    p1: int
    p2: int
    p3: int
    p4: int
    fixup_floats: int       # wgmma: fp32 partial tiles of a K split through memory (0: none)
    tickets: int            # wgmma: split tickets of that split
    pdl: int                # programmatic dependent launch


def _address(library: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(library, name), ctypes.c_void_p).value


@functools.lru_cache(maxsize=None)
def _load(capability: tuple[int, int] | None = None) -> None:
    """Build (cached) and load the extension: it registers ``fp4_fast::*`` and fp4::linear's CUDA kernel."""
    from torch.utils import cpp_extension

    key = hashlib.sha256(SOURCE.read_bytes() + repr((torch.__version__, torch.version.cuda)).encode()).hexdigest()
    name = f"fp4c_fast_linear_{key[:16]}"
    build = nvcc.build_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O2"], with_cuda=True,
                       is_python_module=False, build_directory=str(build), verbose=False)


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why the fast path is off on this CUDA device (None: on; built on the first call)."""
    reason = nvcc.unavailable_reason("eager fast path of fp4::linear", "FP4C_FAST_LINEAR", device_index, _load)
    if reason is None:
        _name_kernels(device_index)
    return reason


def _name_kernels(device_index: int) -> None:
    """Give the extension the pointwise kernels of ``fp4::rms_norm_quantize`` and ``fp4::linear_silu_mul``
    on this device (where they are built), with the launch choices of their Python launchers."""
    from . import silu_mul
    from .rms_norm_quant import CUDA_MAX_K, TRIGGER_MAX_M

    capability = nvcc.device_capability(device_index)
    norm_fn = (_address(cuda_quant._library(capability), "fp4c_rms_norm_values")
               if cuda_quant.unavailable_reason(device_index) is None else 0)
    silu_mul_fn = (_address(silu_mul._library(capability), "fp4c_silu_mul")
                   if silu_mul.unavailable_reason(device_index) is None else 0)
    torch.ops.fp4_fast.set_kernels(device_index, norm_fn, silu_mul_fn, int(use_pdl(torch.device("cuda", device_index))),
                                   TRIGGER_MAX_M, CUDA_MAX_K)


def plan(x2: torch.Tensor, weight: torch.Tensor, n: int, quant_mode: int, gemm_kind: int) -> Plan:
    """The plan of an eager call of ``x2 [M, K]`` times ``weight`` (N = ``n``, output in x2's dtype) that
    runs the CUDA quantization kernel in ``quant_mode`` (0: none) and then the GEMM ``gemm_kind``, with
    the launch parameters that the Python launchers (``cuda_small_m``, ``cuda_wgmma``) pick."""
    index = nvcc.device_index(x2.device)
    capability = nvcc.device_capability(index)
    m, k = x2.shape
    quant_fn = _address(cuda_quant._library(capability), "fp4c_nvfp4_quant") if quant_mode else 0
    pdl = int(use_pdl(x2.device))
    if gemm_kind == GEMM_SMALL_M:
        params = cuda_small_m.device_launch_config(m, n, k, index, codes=quant_mode == cuda_quant.MODE_KERNEL_CODES)
        return Plan(quant_fn, quant_mode, cuda_quant.CTAS_PER_SM,
                    _address(cuda_small_m._library(capability), "fp4c_nvfp4_small_m_gemm"), GEMM_SMALL_M,
                    *params, 0, 0, 0, 0, pdl)
    launch = cuda_wgmma.launch_params(m, n, k, index, x2.dtype)
    return Plan(quant_fn, quant_mode, cuda_quant.CTAS_PER_SM,
                _address(cuda_wgmma._library(capability), "fp4c_nvfp4_wgmma_gemm"), GEMM_WGMMA,
                launch.bn, launch.wm, launch.splits, launch.tail, launch.tail_splits, launch.fixup_floats,
                launch.tickets, pdl)


def replays(x2: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Will the fast path replay later calls like this eager one (on the CUDA kernels)?"""
    if x2.dtype not in DTYPE_CODES or (bias is not None and bias.dtype != x2.dtype) or x2.device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing() and unavailable_reason(nvcc.device_index(x2.device)) is None


def remember(backend: str, x2: torch.Tensor, weight: torch.Tensor, n: int, bias: torch.Tensor | None,
             quant_mode: int, gemm_kind: int) -> None:
    """After an eager Python call of ``backend`` that ran the CUDA quantization kernel in ``quant_mode``
    (0: none) and the GEMM ``gemm_kind``: record its plan, so that later calls with the same key take
    the fast path. Calls the extension would not replay the same way are not recorded."""
    if not replays(x2, bias):  # (captured calls may take other kernels)
        return
    index = nvcc.device_index(x2.device)
    if quant_mode and cuda_quant.unavailable_reason(index) is not None:
        return
    m, k = x2.shape
    torch.ops.fp4_fast.set_plan(backend, index, DTYPE_CODES[x2.dtype], int(bias is not None), m, k, n,
                                weight.shape[0], weight.shape[1] * 2, list(plan(x2, weight, n, quant_mode, gemm_kind)))


class GroupPlan(NamedTuple):
    """How an eager ``fp4::linear_group`` / ``fp4::linear_silu_mul`` call ran (``struct GroupPlan`` in
    fast_linear.cpp)."""
    kind: int               # GROUP_MEMBERS or GROUP_LAUNCH
    quant_fn: int           # GROUP_LAUNCH: fp4c_nvfp4_quant's address (0: the activations as they are)
    quant_mode: int         # 0, cuda_quant.MODE_VALUES or cuda_quant.MODE_KERNEL_CODES
    quant_ctas_per_sm: int
    group_fn: int           # fp4c_nvfp4_small_m_gemm_group's address
    warps: int
    pdl: int


# GroupPlan.kind: each member as its own fp4::linear (then silu_mul), or one launch of the group entry
GROUP_MEMBERS = 0
GROUP_LAUNCH = 1


def remember_group(backend: str, x2: torch.Tensor, members: list[tuple], gated: bool,
                   quant_mode: int | None = None) -> None:
    """After an eager Python call of ``fp4::linear_group`` (``gated``: ``fp4::linear_silu_mul``) of ``x2``
    with ``members`` (weight, weight_scale, input_global_scale, alpha, bias, out_features each): later calls
    with its key run the same way from the extension. ``quant_mode`` None: the members ran as their own
    linears; else the call was one launch of the small-M kernel's group entry on the activations quantized
    once in that mode (0: taken as they are), with the warps ``small_m_gemm_group`` picks."""
    if x2.dim() != 2 or not replays(x2, None):
        return
    weights, weight_scales, gss, alphas, biases, ns = (list(field) for field in zip(*members))
    if quant_mode is None:
        plan = GroupPlan(GROUP_MEMBERS, 0, 0, 0, 0, 0, 0)
    else:
        index = nvcc.device_index(x2.device)
        if quant_mode and cuda_quant.unavailable_reason(index) is not None:
            return
        capability = nvcc.device_capability(index)
        m, k = x2.shape
        warps = cuda_small_m.group_warps(m, ns, k, index, codes=quant_mode == cuda_quant.MODE_KERNEL_CODES)
        quant_fn = _address(cuda_quant._library(capability), "fp4c_nvfp4_quant") if quant_mode else 0
        plan = GroupPlan(GROUP_LAUNCH, quant_fn, quant_mode, cuda_quant.CTAS_PER_SM,
                         _address(cuda_small_m._library(capability), "fp4c_nvfp4_small_m_gemm_group"), warps,
                         int(use_pdl(x2.device)))
    torch.ops.fp4_fast.set_group_plan(x2, weights, weight_scales, gss, alphas, biases, ns, int(gated), backend,
                                      list(plan))


def loaded() -> bool:
    """Has this process loaded the extension (so that fp4::linear's CUDA kernel is the fast path)?"""
    return _load.cache_info().currsize > 0


def forget_plans() -> None:
    """Drop every recorded plan (tests that steer the Python path's choices start from none)."""
    if loaded():
        torch.ops.fp4_fast.clear_plans()


def replayed_calls() -> int:
    """Calls the fast path has replayed in this process."""
    return torch.ops.fp4_fast.replayed_calls() if loaded() else 0


__all__ = ["Plan", "GroupPlan", "plan", "replays", "remember", "remember_group", "unavailable_reason", "loaded",
           "forget_plans", "replayed_calls", "GEMM_SMALL_M", "GEMM_WGMMA", "GROUP_MEMBERS", "GROUP_LAUNCH"]
