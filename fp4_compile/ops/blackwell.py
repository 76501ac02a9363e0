"""Blackwell (sm_100 family) NVFP4 backends: native W4A4 on FP4 tensor cores.

Six kernels objects implementing :class:`fp4_compile.backends.BackendKernels`:

============================  =====================================================  =============
backend                       GEMM called                                            weight layout
============================  =====================================================  =============
``cutlass``                   our CUTLASS kernel, ``csrc/blackwell/nvfp4_gemm_sm100.cu`` padded + 128x4
                              (``torch.ops.fp4c_cutlass.nvfp4_mm``, built on first use)
``flashinfer-cutlass``        ``flashinfer.mm_fp4(..., backend="cutlass")``          padded + 128x4
``flashinfer-trtllm``         ``flashinfer.mm_fp4(..., backend="trtllm")``           padded + rows shuffled
                                                                                     (epilogue_tile_m=128)
``flashinfer-cudnn``          ``flashinfer.mm_fp4(..., backend="cudnn")``            padded + 128x4
``fbgemm``                    ``torch.ops.fbgemm.f4f4bf16``                          padded + 128x4 (uint8, 1-D)
``cublas``                    ``torch.nn.functional.scaled_mm`` on ``float4_e2m1fn_x2`` padded + 128x4
                              views, alpha folded in as the two-level global scale
============================  =====================================================  =============

"padded": N and K zero-padded to multiples of 32 (``format.pad_weight_for_alignment``);
"128x4": block scales in the swizzled layout of ``format.swizzle_blockscale``.

Nothing here imports FlashInfer, FBGEMM or the CUTLASS extension at import time, and
:func:`availability` only looks for packages (``importlib.util.find_spec``), so a
machine without them imports and uses ``fp4_compile`` normally.

Activations are always quantized by ``fp4::quantize`` (the project's Triton kernel on
CUDA, the reference on CPU), never by FlashInfer's ``fp4_quantize``: that one computes
garbage without an error below sm_100, and using one quantizer everywhere keeps a fused
``fp4::linear`` bit-identical to the eager chain it replaces.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pathlib
import shutil
import sysconfig

import torch

from .. import format as fmt
from .nvcc import aligned_rows, nvcc_path, nvcc_version
from .reference import linear_by_steps

# ---------------------------------------------------------------------------------------
# names, requirements and supported GPUs

CUTLASS_NAME = "cutlass"
FLASHINFER_CUTLASS_NAME = "flashinfer-cutlass"
FLASHINFER_TRTLLM_NAME = "flashinfer-trtllm"
FLASHINFER_CUDNN_NAME = "flashinfer-cudnn"
FBGEMM_NAME = "fbgemm"
CUBLAS_NAME = "cublas"

BACKEND_NAMES = (
    CUTLASS_NAME,
    FLASHINFER_CUTLASS_NAME,
    FLASHINFER_TRTLLM_NAME,
    FLASHINFER_CUDNN_NAME,
    FBGEMM_NAME,
    CUBLAS_NAME,
)

# Compute capabilities each backend runs on. The sm_100 family is major 10 (B200/GB200
# sm_100, B300/GB300 sm_103). Our CUTLASS kernel is built for sm_100a or sm_103a (the
# arch-specific tcgen05 block-scaled MMA); FBGEMM's wheels carry sm_100f code.
_SM100_FAMILY = "the sm_100 family (B200/GB200 sm_100, B300/GB300 sm_103)"
_ARCH_TEXT = {
    CUTLASS_NAME: "sm_100 or sm_103",
    FBGEMM_NAME: "sm_100 or sm_103",
}


def _capability_ok(name: str, cap: tuple[int, int]) -> bool:
    if name in (CUTLASS_NAME, FBGEMM_NAME):
        return cap in ((10, 0), (10, 3))
    return cap[0] == 10


#: Output dtypes each GEMM produces itself; any other requested dtype is computed in
#: bfloat16 and cast (bfloat16 rounding first: a float16 request from trtllm/fbgemm
#: keeps bf16's 8-bit mantissa; a float32 request gets bf16-rounded values).
NATIVE_OUT_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    CUTLASS_NAME: (torch.bfloat16, torch.float16),
    FLASHINFER_CUTLASS_NAME: (torch.bfloat16, torch.float16),
    FLASHINFER_TRTLLM_NAME: (torch.bfloat16,),
    FLASHINFER_CUDNN_NAME: (torch.bfloat16, torch.float16),
    FBGEMM_NAME: (torch.bfloat16,),
    CUBLAS_NAME: (torch.bfloat16, torch.float16, torch.float32),
}

TRTLLM_EPILOGUE_TILE_M = 128
TRTLLM_ROW_ALIGNMENT = 128  # FlashInfer's shuffle_matrix_sf_a asserts rows % 128 == 0


def _name(backend) -> str:
    name = str(getattr(backend, "value", backend))
    if name not in BACKEND_NAMES:
        raise ValueError(f"{name!r} is not a Blackwell backend; these are: {', '.join(BACKEND_NAMES)}")
    return name


# ---------------------------------------------------------------------------------------
# availability (never imports the libraries: find_spec and file checks only)


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _package_dir(module: str) -> pathlib.Path | None:
    spec = _find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None when there is none (monkeypatched in tests)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def _device_reason(name: str, device: torch.device) -> str | None:
    arch = _ARCH_TEXT.get(name, _SM100_FAMILY)
    if device.type != "cuda":
        return f"needs an NVIDIA Blackwell GPU of {arch}; device is {device}"
    cap = _capability(device)
    if cap is None:
        if torch.version.cuda is None:
            return f"needs an NVIDIA Blackwell GPU of {arch}; this torch is a CPU-only build"
        return f"needs an NVIDIA Blackwell GPU of {arch}; torch sees no CUDA device"
    if not _capability_ok(name, cap):
        return (
            f"needs an NVIDIA Blackwell GPU of {arch} (FP4 tensor cores); "
            f"this GPU is sm_{cap[0]}{cap[1]}"
        )
    return None


def _torch_cuda_version() -> tuple[int, int] | None:
    if torch.version.cuda is None:
        return None
    major, minor = (int(p) for p in torch.version.cuda.split(".")[:2])
    return major, minor


def _has_ninja() -> bool:
    return shutil.which("ninja") is not None or _find_spec("ninja") is not None


def cutlass_include_dirs() -> list[str] | None:
    """Include dirs of CUTLASS 4.x headers (with the sm_100 block-scaled GEMM), or None.

    Looked for, in order: ``$FP4C_CUTLASS_DIR``, ``$CUTLASS_PATH``, ``$CUTLASS_HOME`` (a
    CUTLASS checkout), the ``nvidia-cutlass`` wheel (``cutlass_library/source``), and the
    copy FlashInfer ships for its own JIT (``flashinfer/data/cutlass``).
    """
    roots: list[pathlib.Path] = []
    for var in ("FP4C_CUTLASS_DIR", "CUTLASS_PATH", "CUTLASS_HOME"):
        if os.environ.get(var):
            roots.append(pathlib.Path(os.environ[var]))
    lib = _package_dir("cutlass_library")
    if lib is not None:
        roots.append(lib / "source")
    fi = _package_dir("flashinfer")
    if fi is not None:
        roots.append(fi / "data" / "cutlass")
    for root in roots:
        include, util = root / "include", root / "tools" / "util" / "include"
        if (include / "cutlass" / "detail" / "sm100_blockscaled_layout.hpp").is_file() and (
            util / "cutlass" / "util" / "packed_stride.hpp"
        ).is_file():
            return [str(include), str(util)]
    return None


CUTLASS_SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "blackwell" / "nvfp4_gemm_sm100.cu"


def _flashinfer_reasons(name: str) -> list[str]:
    reasons = []
    if _find_spec("flashinfer") is None:
        return ["flashinfer-python is not installed (pip install 'fp4_compile[flashinfer]')"]
    if name in (FLASHINFER_CUTLASS_NAME, FLASHINFER_TRTLLM_NAME):
        # Both GEMM modules are C++/CUDA that FlashInfer JIT-builds unless the AOT cache is installed.
        if _find_spec("flashinfer_jit_cache") is None and nvcc_path() is None:
            reasons.append("FlashInfer JIT-builds this GEMM: needs nvcc (CUDA_HOME or PATH) or flashinfer-jit-cache")
    if name == FLASHINFER_CUDNN_NAME and _find_spec("cudnn") is None:
        reasons.append(
            "the cuDNN frontend is not installed (pip install nvidia-cudnn-frontend; FP4 needs >= 1.13, cuDNN >= 9.10)"
        )
    return reasons


def _fbgemm_reasons() -> list[str]:
    root = _package_dir("fbgemm_gpu")
    if root is None:
        return ["fbgemm-gpu-genai is not installed (pip install 'fp4_compile[fbgemm]')"]
    gen_ai = root / "experimental" / "gen_ai"
    if not (gen_ai.is_dir() and any(gen_ai.glob("*.so"))):
        return ["fbgemm_gpu is installed without its GenAI kernels (f4f4bf16): install fbgemm-gpu-genai"]
    return []


def _cublas_reasons() -> list[str]:
    reasons = []
    if not hasattr(torch, "float4_e2m1fn_x2"):
        reasons.append(f"torch {torch.__version__} has no float4_e2m1fn_x2 (needs torch >= 2.8)")
    cuda = _torch_cuda_version()
    if cuda is None:
        reasons.append("this torch is a CPU-only build (needs CUDA >= 12.8 for cuBLASLt NVFP4)")
    elif cuda < (12, 8):
        reasons.append(f"torch is built with CUDA {torch.version.cuda}; cuBLASLt NVFP4 needs CUDA >= 12.8")
    return reasons


def _cutlass_reasons() -> list[str]:
    reasons = []
    if torch.version.cuda is None:
        reasons.append("this torch is a CPU-only build (the CUTLASS extension links against torch's CUDA)")
    nvcc = nvcc_path()
    if nvcc is None:
        reasons.append("nvcc not found (set CUDA_HOME or put nvcc on PATH) to build the CUTLASS kernel")
    else:
        version = nvcc_version(nvcc)
        if version is not None and version < (12, 8):
            reasons.append(f"nvcc {version[0]}.{version[1]} cannot build sm_100a code (needs CUDA >= 12.8)")
    if not _has_ninja():
        reasons.append("ninja not found (pip install ninja): torch.utils.cpp_extension.load needs it")
    if cutlass_include_dirs() is None:
        reasons.append("CUTLASS 4.x headers not found (pip install nvidia-cutlass, or set FP4C_CUTLASS_DIR)")
    if not CUTLASS_SOURCE.is_file():
        reasons.append(f"kernel source missing: {CUTLASS_SOURCE}")
    return reasons


def availability(backend: object, device: torch.device | str | None = None) -> str | None:
    """None when Blackwell ``backend`` can run on ``device``, else every reason it cannot.

    ``device`` defaults to the current CUDA device (or the CPU when there is none). The
    check reads the GPU's compute capability and looks for packages and tools, but never
    imports FlashInfer or FBGEMM and never builds anything.
    """
    name = _name(backend)
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    reasons = []
    device_reason = _device_reason(name, device)
    if device_reason:
        reasons.append(device_reason)
    if name.startswith("flashinfer-"):
        reasons += _flashinfer_reasons(name)
    elif name == FBGEMM_NAME:
        reasons += _fbgemm_reasons()
    elif name == CUBLAS_NAME:
        reasons += _cublas_reasons()
    elif name == CUTLASS_NAME:
        reasons += _cutlass_reasons()
    return "; ".join(reasons) if reasons else None


# ---------------------------------------------------------------------------------------
# FlashInfer TRT-LLM row shuffle (epilogue_tile_m = 128)


def trtllm_shuffle_row_indices(
    rows: int, epilogue_tile_m: int = TRTLLM_EPILOGUE_TILE_M, device: torch.device | str | None = None
) -> torch.Tensor:
    """``idx`` with ``shuffled = t[idx]``: FlashInfer's ``get_shuffle_matrix_a_row_indices``.

    Rows move inside blocks of 32 (16 when ``epilogue_tile_m`` is not a multiple of 128):
    source row ``i`` of a block lands at ``(i % G) * 8 + i // G`` with ``G = block / 8``,
    i.e. each block is read as an ``[8, G]`` row grid and written transposed ``[G, 8]``.
    """
    block = 32 if epilogue_tile_m % 128 == 0 else 16
    if rows % block:
        raise ValueError(f"the TRT-LLM row shuffle needs rows % {block} == 0, got {rows} rows")
    groups = block // 8
    j = torch.arange(block, dtype=torch.long, device=device)
    within = (j % 8) * groups + j // 8  # destination j takes source (j % 8) * G + j // 8
    starts = torch.arange(0, rows, block, dtype=torch.long, device=device)
    return (starts[:, None] + within[None, :]).reshape(rows)


def trtllm_unshuffle_row_indices(
    rows: int, epilogue_tile_m: int = TRTLLM_EPILOGUE_TILE_M, device: torch.device | str | None = None
) -> torch.Tensor:
    """The inverse permutation: ``t == shuffled[inv]``."""
    idx = trtllm_shuffle_row_indices(rows, epilogue_tile_m, device)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(rows, dtype=torch.long, device=idx.device)
    return inv


# ---------------------------------------------------------------------------------------
# argument checks


def _check_operands(
    a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor
) -> None:
    if a.dtype != torch.uint8 or a.dim() != 2:
        raise TypeError(f"a must be packed 2-D uint8 [M, K/2], got {a.dtype} {tuple(a.shape)}")
    if a.shape[1] != weight.shape[1]:
        raise ValueError(
            f"a has K={a.shape[1] * 2} but the prepared weight has K={weight.shape[1] * 2}: "
            "pad activations in K first (fp4::pad_k)"
        )
    m, kp = a.shape[0], a.shape[1] * 2
    expected = fmt.round_up(m, fmt.SCALE_ROW_TILE) * fmt.round_up(kp // fmt.BLOCK_SIZE, fmt.SCALE_COL_TILE)
    if a_scale.numel() != expected or a_scale.element_size() != 1:
        raise ValueError(
            f"a_scale must be the 128x4-swizzled e4m3 scales of a [{m}, K={kp}] ({expected} bytes, from "
            f"fp4::quantize(..., swizzle=True)), got {a_scale.dtype} {tuple(a_scale.shape)}"
        )
    if alpha.dtype != torch.float32 or alpha.numel() != 1:
        raise TypeError(f"alpha must be float32 with one element, got {alpha.dtype} {tuple(alpha.shape)}")


# ---------------------------------------------------------------------------------------
# library callees (module-level so that tests can replace them with recording fakes)


def _flashinfer_mm_fp4():
    from flashinfer import mm_fp4

    return mm_fp4


def flashinfer_mm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  alpha: torch.Tensor, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``flashinfer.mm_fp4`` with the weight as its column-major ``b`` (``weight.t()``).

    Scales go in as 2-D uint8 views of the 128x4 layout: FlashInfer's CUTLASS runner
    checks for uint8, and its cuDNN runner builds the graph from 2-D scale shapes (a flat
    buffer, which ``mm`` accepts by size, raises there).
    """
    mm_fp4 = _flashinfer_mm_fp4()
    kp = a.shape[1] * 2
    a_descale = a_scale.view(torch.uint8).reshape(fmt.swizzled_scale_shape(a.shape[0], kp))
    b_descale = weight_scale.view(torch.uint8).reshape(fmt.swizzled_scale_shape(weight.shape[0], kp))
    return mm_fp4(a, weight.t(), a_descale, b_descale.t(), alpha, out_dtype, backend=backend)


def _fbgemm_f4f4bf16():
    op = getattr(torch.ops.fbgemm, "f4f4bf16", None)
    if op is None:
        importlib.import_module("fbgemm_gpu")  # the genai wheel loads its kernels here
        op = getattr(torch.ops.fbgemm, "f4f4bf16", None)
    if op is None:
        importlib.import_module("fbgemm_gpu.experimental.gen_ai")
        op = getattr(torch.ops.fbgemm, "f4f4bf16", None)
    if op is None:
        raise RuntimeError("torch.ops.fbgemm.f4f4bf16 is not registered: install fbgemm-gpu-genai")
    return op


def fbgemm_mm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              alpha: torch.Tensor) -> torch.Tensor:
    """``torch.ops.fbgemm.f4f4bf16`` (bf16 out), NVFP4 selected by passing ``global_scale``.

    Its schema changed over releases: ``(..., global_scale, use_mx)`` in older wheels,
    ``(..., output, global_scale)`` in newer ones; keywords fit both.
    """
    op = _fbgemm_f4f4bf16()
    kwargs = {"global_scale": alpha}
    if "use_mx" in {arg.name for arg in op.default._schema.arguments}:
        kwargs["use_mx"] = False
    return op(a, weight, a_scale.reshape(-1).view(torch.uint8), weight_scale.reshape(-1).view(torch.uint8), **kwargs)


def _as_e4m3(scales: torch.Tensor) -> torch.Tensor:
    """Block scales typed float8_e4m3fn: torch's NVFP4 recipe checks (scaled_mm and _scaled_mm)
    reject the uint8 view that ``fp4::mm`` accepts for the other backends."""
    return scales if scales.dtype == torch.float8_e4m3fn else scales.view(torch.float8_e4m3fn)


@functools.lru_cache(maxsize=None)
def _ones(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def cublas_mm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              alpha: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt NVFP4 through torch's scaled_mm on ``float4_e2m1fn_x2`` views.

    With ``torch.nn.functional.scaled_mm`` (torch >= 2.10) alpha is the second-level
    (TensorWise) scale of ``a`` and 1 that of the weight, so cuBLAS applies it in its
    epilogue. Older torch: ``torch._scaled_mm`` to float32, times alpha, then the cast.
    """
    fp4 = torch.float4_e2m1fn_x2
    mat_a, mat_b = a.view(fp4), weight.view(fp4).t()
    a_scale, weight_scale = _as_e4m3(a_scale), _as_e4m3(weight_scale)
    functional = torch.nn.functional
    if hasattr(functional, "scaled_mm"):
        block, tensor = functional.ScalingType.BlockWise1x16, functional.ScalingType.TensorWise
        swizzled, plain = functional.SwizzleType.SWIZZLE_32_4_4, functional.SwizzleType.NO_SWIZZLE
        return functional.scaled_mm(
            mat_a,
            mat_b,
            [a_scale, alpha.reshape(1)],
            [block, tensor],
            [weight_scale, _ones(alpha.device)],
            [block, tensor],
            swizzle_a=[swizzled, plain],
            swizzle_b=[swizzled, plain],
            output_dtype=out_dtype,
        )
    out = torch._scaled_mm(mat_a, mat_b, a_scale, weight_scale, out_dtype=torch.float32)
    return (out * alpha.reshape(())).to(out_dtype)


def cutlass_nvcc_flags(arch: str) -> list[str]:
    """nvcc flags of our CUTLASS kernel for ``arch`` ("100a" or "103a")."""
    return [
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-O3",
        "-DNDEBUG",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "--diag-suppress=2908",  # CUTLASS 4.x: implicit capture of `this` (C++20 deprecation)
    ]


def cutlass_compile_command(output: str, arch: str = "100a", extra_include_dirs: tuple[str, ...] = ()) -> list[str]:
    """A compile-only nvcc command for the kernel with the build's flags (used by the tests)."""
    from torch.utils import cpp_extension

    includes = cutlass_include_dirs()
    nvcc = nvcc_path()
    if includes is None or nvcc is None:
        raise RuntimeError("nvcc or CUTLASS headers not found")
    torch_includes = cpp_extension.include_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        nvcc,
        *cutlass_nvcc_flags(arch),
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-DTORCH_EXTENSION_NAME=fp4c_compile_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "--compiler-options=-fPIC",
        *(f"-I{d}" for d in (*extra_include_dirs, *torch_includes, *includes, sysconfig.get_paths()["include"])),
        "-c",
        str(CUTLASS_SOURCE),
        "-o",
        output,
    ]


_cutlass_build_error: BaseException | None = None


def load_cutlass_extension() -> None:
    """Build (first time: minutes) and load the CUTLASS kernel for the current GPU.

    Registers ``torch.ops.fp4c_cutlass.nvfp4_mm``. Built with ninja by
    ``torch.utils.cpp_extension.load`` into ``$FP4C_BUILD_DIR`` (default: torch's
    extension cache, reused across processes); ``FP4C_VERBOSE_BUILD=1`` shows the
    compiler output. A failed build is not retried in the same process.
    """
    global _cutlass_build_error
    if hasattr(torch.ops.fp4c_cutlass, "nvfp4_mm"):
        return
    if _cutlass_build_error is not None:
        raise RuntimeError(f"the CUTLASS NVFP4 kernel failed to build earlier: {_cutlass_build_error}")
    try:
        _build_and_load_cutlass()
    except BaseException as error:
        _cutlass_build_error = error
        raise


def _build_and_load_cutlass() -> None:
    reasons = _cutlass_reasons()
    if reasons:
        raise RuntimeError("cannot build the CUTLASS NVFP4 kernel: " + "; ".join(reasons))
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) not in ((10, 0), (10, 3)):
        raise RuntimeError(f"the CUTLASS NVFP4 kernel needs sm_100 or sm_103, this GPU is sm_{major}{minor}")
    arch = f"{major}{minor}a"
    build_dir = os.environ.get("FP4C_BUILD_DIR")
    if build_dir:
        build_dir = os.path.join(build_dir, f"nvfp4_gemm_sm{arch}")
        os.makedirs(build_dir, exist_ok=True)
    load(
        name=f"fp4c_nvfp4_gemm_sm{arch}",
        sources=[str(CUTLASS_SOURCE)],
        extra_include_paths=cutlass_include_dirs(),
        extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=cutlass_nvcc_flags(arch),
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("FP4C_VERBOSE_BUILD") == "1",
    )


def _cutlass_op():
    load_cutlass_extension()
    return torch.ops.fp4c_cutlass.nvfp4_mm


def cutlass_mm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               alpha: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """fp4_compile's own CUTLASS sm_100a GEMM (``out_dtype`` bfloat16 or float16)."""
    return _cutlass_op()(a, weight, a_scale, weight_scale, alpha, out_dtype)


# ---------------------------------------------------------------------------------------
# kernels objects


class _BlackwellKernels:
    """Shared layout (N, K padded to 32, 128x4 scales) and the fused linear."""

    name: str = ""

    def __repr__(self) -> str:
        return f"<fp4_compile Blackwell kernels {self.name!r}>"

    # weight layout -------------------------------------------------------------------
    def prepare_weight(self, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt.check_linear_weight(packed, scales)
        packed, scales = fmt.pad_weight_for_alignment(packed, scales, fmt.ALIGNMENT)
        return packed.contiguous(), fmt.swizzle_blockscale(scales.contiguous())

    def _swizzled_scales_2d(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        shape = fmt.swizzled_scale_shape(weight.shape[0], weight.shape[1] * 2)
        return weight_scale.contiguous().view(torch.float8_e4m3fn).reshape(shape)

    def restore_weight(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int, in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = weight.shape[0], weight.shape[1] * 2
        scales = fmt.unswizzle_blockscale(self._swizzled_scales_2d(weight, weight_scale), rows, k)
        return (
            weight[:out_features, : in_features // 2].contiguous(),
            scales[:out_features, : in_features // fmt.BLOCK_SIZE].contiguous(),
        )

    # GEMM -----------------------------------------------------------------------------
    def _gemm(self, a, a_scale, weight, weight_scale, alpha, out_dtype) -> torch.Tensor:
        raise NotImplementedError

    def mm(
        self,
        a: torch.Tensor,
        a_scale: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        alpha: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        _check_operands(a, a_scale, weight, weight_scale, alpha)
        if a.shape[0] == 0:
            return a.new_zeros((0, weight.shape[0]), dtype=out_dtype)
        native = NATIVE_OUT_DTYPES[self.name]
        compute_dtype = out_dtype if out_dtype in native else torch.bfloat16
        # the libraries read 16-byte aligned operands (TMA); contiguous() keeps a contiguous view at any offset
        a, a_scale = (aligned_rows(t.contiguous(), row_bytes_multiple=1) for t in (a, a_scale))
        out = self._gemm(a, a_scale, weight, weight_scale, alpha, compute_dtype)
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_global_scale: torch.Tensor,
        alpha: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
    ) -> torch.Tensor:
        # fp4::quantize is the project's own kernel on CUDA (gpu_quant.py; never FlashInfer's).
        return linear_by_steps(self, torch.ops.fp4.quantize, x, weight, weight_scale, input_global_scale, alpha,
                               bias, out_features, swizzle=True)


class CutlassKernels(_BlackwellKernels):
    name = CUTLASS_NAME

    def _gemm(self, a, a_scale, weight, weight_scale, alpha, out_dtype):
        return cutlass_mm(a, a_scale, weight, weight_scale, alpha, out_dtype)


class FlashInferKernels(_BlackwellKernels):
    """``flashinfer.mm_fp4`` with backend ``cutlass`` or ``cudnn`` (128x4 weight scales)."""

    def __init__(self, name: str, flashinfer_backend: str) -> None:
        self.name = name
        self.flashinfer_backend = flashinfer_backend

    def _gemm(self, a, a_scale, weight, weight_scale, alpha, out_dtype):
        return flashinfer_mm(a, a_scale, weight, weight_scale, alpha, out_dtype, self.flashinfer_backend)


class FlashInferTrtllmKernels(FlashInferKernels):
    """``mm_fp4(backend="trtllm")``: weight rows and scale rows shuffled for epilogue_tile_m=128.

    The same permutation as FlashInfer's ``shuffle_matrix_a`` (packed weight) and
    ``shuffle_matrix_sf_a`` (linear scales, rows shuffled, then 128x4-interleaved). N is
    padded to 128 rows (``shuffle_matrix_sf_a`` accepts nothing else), K to 32.
    """

    def __init__(self) -> None:
        super().__init__(FLASHINFER_TRTLLM_NAME, "trtllm")

    def prepare_weight(self, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt.check_linear_weight(packed, scales)
        packed, scales = fmt.pad_weight_for_alignment(packed, scales, fmt.ALIGNMENT)
        rows = fmt.round_up(packed.shape[0], TRTLLM_ROW_ALIGNMENT)
        if rows != packed.shape[0]:
            packed = torch.nn.functional.pad(packed, (0, 0, 0, rows - packed.shape[0]))
            scales = torch.nn.functional.pad(scales.view(torch.uint8), (0, 0, 0, rows - scales.shape[0])).view(
                scales.dtype
            )
        idx = trtllm_shuffle_row_indices(rows, TRTLLM_EPILOGUE_TILE_M, packed.device)
        return packed[idx].contiguous(), fmt.swizzle_blockscale(scales[idx].contiguous())

    def restore_weight(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int, in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = weight.shape[0], weight.shape[1] * 2
        inv = trtllm_unshuffle_row_indices(rows, TRTLLM_EPILOGUE_TILE_M, weight.device)
        scales = fmt.unswizzle_blockscale(self._swizzled_scales_2d(weight, weight_scale), rows, k)
        return (
            weight[inv][:out_features, : in_features // 2].contiguous(),
            scales[inv][:out_features, : in_features // fmt.BLOCK_SIZE].contiguous(),
        )


class FbgemmKernels(_BlackwellKernels):
    """``torch.ops.fbgemm.f4f4bf16``; weight scales stored as the flat uint8 view it takes."""

    name = FBGEMM_NAME

    def prepare_weight(self, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, weight_scale = super().prepare_weight(packed, scales)
        return weight, weight_scale.view(torch.uint8).reshape(-1)

    def _gemm(self, a, a_scale, weight, weight_scale, alpha, out_dtype):
        return fbgemm_mm(a, a_scale, weight, weight_scale, alpha)


class CublasKernels(_BlackwellKernels):
    name = CUBLAS_NAME

    def _gemm(self, a, a_scale, weight, weight_scale, alpha, out_dtype):
        return cublas_mm(a, a_scale, weight, weight_scale, alpha, out_dtype)


# The attributes fp4_compile.backends names ("fp4_compile.ops.blackwell:<Backend.name>").
CUTLASS = CutlassKernels()
FLASHINFER_CUTLASS = FlashInferKernels(FLASHINFER_CUTLASS_NAME, "cutlass")
FLASHINFER_TRTLLM = FlashInferTrtllmKernels()
FLASHINFER_CUDNN = FlashInferKernels(FLASHINFER_CUDNN_NAME, "cudnn")
FBGEMM = FbgemmKernels()
CUBLAS = CublasKernels()

KERNELS: dict[str, _BlackwellKernels] = {
    CUTLASS_NAME: CUTLASS,
    FLASHINFER_CUTLASS_NAME: FLASHINFER_CUTLASS,
    FLASHINFER_TRTLLM_NAME: FLASHINFER_TRTLLM,
    FLASHINFER_CUDNN_NAME: FLASHINFER_CUDNN,
    FBGEMM_NAME: FBGEMM,
    CUBLAS_NAME: CUBLAS,
}


def kernels(backend: object) -> _BlackwellKernels:
    """The kernels object of a Blackwell backend (name or ``Backend``)."""
    return KERNELS[_name(backend)]

