// fp4_compile: NVFP4 x NVFP4 GEMM for Blackwell (sm_100a / sm_103a), built on demand.
//
//   out[m, n] = alpha * sum_k e2m1(a[m,k]) * sfa[m,k/16] * e2m1(w[n,k]) * sfw[n,k/16]
//
// a   uint8 [M, K/2]   packed e2m1, element 2j in the low nibble of byte j (row-major, K-major)
// w   uint8 [N, K/2]   same packing; the weight as nn.Linear stores it (= column-major B)
// sfa fp8   128x4-swizzled block scales of a, zero-padded to [round_up(M,128), round_up(K/16,4)]
// sfw fp8   the same for w, [round_up(N,128), round_up(K/16,4)]
// alpha float32 [1] on the device (read by the epilogue, no host sync)
// out bf16 or fp16 [M, N], row-major
//
// N and K must be multiples of 32 (the caller pads weights once at load and activations in
// K per call). The 128x4 scale layout is CUTLASS's Sm1xxBlkScaledConfig layout, which is
// what format.swizzle_blockscale produces.
//
// Registered as torch.ops.fp4c_cutlass.nvfp4_mm (CUDA). Python side: fp4_compile/ops/blackwell.py
// (load_cutlass_extension, CutlassKernels).
// Compile-only check: tests/test_blackwell.py::test_cutlass_source_compiles_for_sm100a.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#if !defined(CUTLASS_ARCH_MMA_SM100_SUPPORTED)
#error "fp4_compile's NVFP4 CUTLASS GEMM needs nvcc >= 12.8 (sm_100a support)"
#endif

namespace fp4c {

using namespace cute;

// One kernel configuration: a 1-SM tcgen05 block-scaled MMA tile and its epilogue.
template <typename ElementOut, typename MmaTile, typename Cluster, typename MainloopSchedule,
          typename EpilogueSchedule>
struct Nvfp4GemmConfig {
  using ElementA = cutlass::nv_float4_t<cutlass::float_e2m1_t>;  // e2m1 data + ue4m3 scale per 16
  using ElementB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
  using LayoutA = cutlass::layout::RowMajor;     // a [M, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // B [K, N] column-major == w [N, K] row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignA = 32;  // elements: 16 bytes of packed e2m1
  static constexpr int kAlignB = 32;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using ElementAccumulator = float;
  using ArchTag = cutlass::arch::Sm100;
  using OperatorClass = cutlass::arch::OpClassBlockScaledTensorOp;

  // ElementC = void: no source operand is read (beta is never used).
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, OperatorClass, MmaTile, Cluster, cutlass::epilogue::collective::EpilogueTileAuto,
      ElementAccumulator, ElementAccumulator, void, LayoutD, kAlignD, ElementOut, LayoutD, kAlignD,
      EpilogueSchedule>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, OperatorClass, ElementA, LayoutA, kAlignA, ElementB, LayoutB, kAlignB,
      ElementAccumulator, MmaTile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue, void>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

template <typename ElementOut>
using Nvfp4Gemm1Sm =
    Nvfp4GemmConfig<ElementOut, Shape<_128, _128, _256>, Shape<_1, _1, _1>,
                    cutlass::gemm::KernelTmaWarpSpecialized1SmNvf4Sm100,
                    cutlass::epilogue::TmaWarpSpecialized1Sm>;

template <typename Config>
void run_nvfp4_gemm(at::Tensor& out, at::Tensor const& a, at::Tensor const& w,
                    at::Tensor const& sfa, at::Tensor const& sfw, at::Tensor const& alpha,
                    int m, int n, int k, cudaStream_t stream) {
  using Gemm = typename Config::Gemm;
  using Kernel = typename Gemm::GemmKernel;
  using Mainloop = typename Kernel::CollectiveMainloop;
  using ElementD = typename Kernel::ElementD;
  using BlkScaledConfig = typename Mainloop::Sm1xxBlkScaledConfig;

  auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {m, k, 1});
  auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {n, k, 1});
  auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, {m, n, 1});
  auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {m, n, 1});
  auto layout_sfa = BlkScaledConfig::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
  auto layout_sfb = BlkScaledConfig::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {reinterpret_cast<typename Mainloop::ArrayElementA const*>(a.data_ptr()), stride_a,
       reinterpret_cast<typename Mainloop::ArrayElementB const*>(w.data_ptr()), stride_b,
       reinterpret_cast<typename Mainloop::ElementSF const*>(sfa.data_ptr()), layout_sfa,
       reinterpret_cast<typename Mainloop::ElementSF const*>(sfw.data_ptr()), layout_sfb},
      {{}, nullptr, stride_c, reinterpret_cast<ElementD*>(out.data_ptr()), stride_d}};
  args.epilogue.thread.alpha_ptr = alpha.data_ptr<float>();
  args.epilogue.thread.beta = 0.0f;

  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fp4_compile NVFP4 CUTLASS GEMM cannot run M=", m,
              " N=", n, " K=", k, ": ", cutlass::cutlassGetStatusString(status));
  size_t workspace_size = Gemm::get_workspace_size(args);
  auto workspace = at::empty({static_cast<int64_t>(workspace_size)}, a.options().dtype(at::kByte));
  status = gemm.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fp4_compile NVFP4 CUTLASS GEMM initialize failed: ",
              cutlass::cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fp4_compile NVFP4 CUTLASS GEMM run failed: ",
              cutlass::cutlassGetStatusString(status));
}

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// out = alpha * (a . w^T) in out_dtype (bfloat16 or float16), shape [M, N].
at::Tensor nvfp4_mm(at::Tensor const& a, at::Tensor const& w, at::Tensor const& sfa, at::Tensor const& sfw,
                    at::Tensor const& alpha, at::ScalarType out_dtype) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && sfa.is_cuda() && sfw.is_cuda() && alpha.is_cuda(),
              "nvfp4_mm: all tensors must be CUDA tensors");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2, "nvfp4_mm: a and w must be 2-D");
  TORCH_CHECK(a.scalar_type() == at::kByte && w.scalar_type() == at::kByte,
              "nvfp4_mm: a and w must be packed uint8 e2m1");
  TORCH_CHECK(sfa.element_size() == 1 && sfw.element_size() == 1, "nvfp4_mm: scales must be 1-byte e4m3");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.numel() == 1, "nvfp4_mm: alpha must be float32[1]");
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous() && sfa.is_contiguous() && sfw.is_contiguous(),
              "nvfp4_mm: all tensors must be contiguous");
  int64_t m = a.size(0), n = w.size(0), k = a.size(1) * 2;
  TORCH_CHECK(w.size(1) * 2 == k, "nvfp4_mm: K mismatch, a has K=", k, ", w has K=", w.size(1) * 2);
  TORCH_CHECK(n % 32 == 0 && k % 32 == 0, "nvfp4_mm: N and K must be multiples of 32, got N=", n, " K=", k);
  int64_t kb = round_up(k / 16, 4);
  TORCH_CHECK(sfa.numel() == round_up(m, 128) * kb, "nvfp4_mm: sfa must hold ", round_up(m, 128) * kb,
              " swizzled scales, got ", sfa.numel());
  TORCH_CHECK(sfw.numel() == round_up(n, 128) * kb, "nvfp4_mm: sfw must hold ", round_up(n, 128) * kb,
              " swizzled scales, got ", sfw.numel());
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "nvfp4_mm: out_dtype must be bfloat16 or float16, got ", out_dtype);
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0) return out;

  c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  if (out_dtype == at::kBFloat16) {
    run_nvfp4_gemm<Nvfp4Gemm1Sm<cutlass::bfloat16_t>>(out, a, w, sfa, sfw, alpha, mi, ni, ki, stream);
  } else {
#if defined(FP4C_BF16_ONLY)
    TORCH_CHECK(false, "nvfp4_mm: this build has the bfloat16 kernel only");
#else
    run_nvfp4_gemm<Nvfp4Gemm1Sm<cutlass::half_t>>(out, a, w, sfa, sfw, alpha, mi, ni, ki, stream);
#endif
  }
  return out;
}

}  // namespace fp4c

TORCH_LIBRARY(fp4c_cutlass, m) {
  m.def("nvfp4_mm(Tensor a, Tensor w, Tensor sfa, Tensor sfw, Tensor alpha, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fp4c_cutlass, CUDA, m) { m.impl("nvfp4_mm", &fp4c::nvfp4_mm); }
