// silu(gate) * up as F.silu(gate) * up computes it on CUDA, bit for bit: float math, the SiLU
// g / (1 + exp(-g)) (IEEE division, expf: ATen's kernel built without fast math) rounded to the inputs'
// dtype, then the product rounded. fp4::linear_silu_mul's second half where its GEMMs do not fuse it.
//
// Why CUDA beside ops/silu_mul.py's Triton kernel: host time. An eager prefill layer is bound by it, and
// the C++ fast path of fast_linear.cpp launches this kernel without Python (a Triton launch from Python
// cost about 20 us of host time per call on the H100 hosts, benchmarks/profile_host.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "grid_dependency.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kF16 = 1, kBF16 = 2;  // dtype codes (cuda_quant.DTYPE_CODES)

template <int DT>
struct Type;
template <>
struct Type<kF16> {
  using T = __half;
  __device__ static float to_float(T v) { return __half2float(v); }
  __device__ static T from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Type<kBF16> {
  using T = __nv_bfloat16;
  __device__ static float to_float(T v) { return __bfloat162float(v); }
  __device__ static T from_float(float v) { return __float2bfloat16_rn(v); }
};

template <int DT>
__device__ __forceinline__ typename Type<DT>::T silu_mul_one(typename Type<DT>::T g, typename Type<DT>::T u) {
  using C = Type<DT>;
  const float gf = C::to_float(g);
  const float act = C::to_float(C::from_float(__fdiv_rn(gf, __fadd_rn(1.0f, expf(-gf)))));
  return C::from_float(__fmul_rn(act, C::to_float(u)));
}

struct Args {
  const void* gate;
  int64_t ldg;  // elements
  const void* up;
  int64_t ldu;
  void* out;
  int64_t ldo;
  int m, n;
};

// Thread t of CTA (x, y) takes elements 8 (x * kThreads + t) .. + 7 of rows y, y + gridDim.y, ...:
// one 16-byte load of each input and one store where VEC (aligned rows, N a multiple of 8).
template <int DT, bool VEC>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(const Args a) {
  using T = typename Type<DT>::T;
  fp4c::wait_for_prior_grid();
  const int col = 8 * (blockIdx.x * kThreads + threadIdx.x);
  if (col >= a.n) return;
  for (int64_t r = blockIdx.y; r < a.m; r += gridDim.y) {
    const T* g = static_cast<const T*>(a.gate) + r * a.ldg + col;
    const T* u = static_cast<const T*>(a.up) + r * a.ldu + col;
    T* o = static_cast<T*>(a.out) + r * a.ldo + col;
    if constexpr (VEC) {
      uint4 gv = *reinterpret_cast<const uint4*>(g), uv = *reinterpret_cast<const uint4*>(u), ov;
      const T* gs = reinterpret_cast<const T*>(&gv);
      const T* us = reinterpret_cast<const T*>(&uv);
      T* os = reinterpret_cast<T*>(&ov);
#pragma unroll
      for (int i = 0; i < 8; ++i) os[i] = silu_mul_one<DT>(gs[i], us[i]);
      *reinterpret_cast<uint4*>(o) = ov;
    } else {
      for (int i = 0; i < 8 && col + i < a.n; ++i) o[i] = silu_mul_one<DT>(g[i], u[i]);
    }
  }
}

template <int DT>
cudaError_t launch(const Args& a, bool vec, bool pdl, cudaStream_t stream) {
  const unsigned vectors = static_cast<unsigned>((a.n + 7) / 8);
  const dim3 grid((vectors + kThreads - 1) / kThreads, a.m < 65535 ? a.m : 65535);
  return vec ? fp4c::launch(silu_mul_kernel<DT, true>, grid, dim3(kThreads), 0, pdl, stream, a)
             : fp4c::launch(silu_mul_kernel<DT, false>, grid, dim3(kThreads), 0, pdl, stream, a);
}

}  // namespace

extern "C" {

// out = silu(gate) * up for gate, up, out [M, N] with row strides ldg, ldu, ldo (elements, the last
// dimension contiguous); dtype 1 = float16, 2 = bfloat16; pdl: 1 = programmatic dependent launch
// (the kernel waits for the one before before it reads), 0 = a plain launch. Returns a cudaError_t.
int fp4c_silu_mul(const void* gate, int64_t ldg, const void* up, int64_t ldu, void* out, int64_t ldo, int dtype,
                  int M, int N, int pdl, cudaStream_t stream) {
  if (M < 0 || N < 0 || (dtype != kF16 && dtype != kBF16) || pdl < 0 || pdl > 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (M == 0 || N == 0) return static_cast<int>(cudaSuccess);
  const Args a{gate, ldg, up, ldu, out, ldo, M, N};
  const auto aligned = [](const void* p, int64_t ld) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 8 == 0;
  };
  const bool vec = N % 8 == 0 && aligned(gate, ldg) && aligned(up, ldu) && aligned(out, ldo);
  const cudaError_t err = dtype == kF16 ? launch<kF16>(a, vec, pdl != 0, stream)
                                        : launch<kBF16>(a, vec, pdl != 0, stream);
  return static_cast<int>(err);
}

}  // extern "C"
