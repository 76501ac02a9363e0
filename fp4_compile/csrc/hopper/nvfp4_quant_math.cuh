// NVFP4 quantization element math shared by the quantization kernel (nvfp4_quant.cu) and the
// small-M GEMM's fused W4A4 path (nvfp4_small_m.cu). The function is fp4_compile.format's
// quantize_nvfp4, bit for bit, in the reference's order of float32 operations (see
// nvfp4_quant.cu's header for why the E2M1 rounding below is exact). sm_89+ (e4m3 conversions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace fp4c {

constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;  // input dtype codes
constexpr float kMagic = 8388608.0f;  // 2^23: the float adder rounds to integers in [2^23, 2^24)

// 2^23 + E2M1 magnitude code (0..7) of a = |x| * out_scale >= 0 (nvfp4_quant.cu's header: why this
// is exact). Without SAT, valid for a < 7 only (then fma(a, 0.5, 2^23 + 4) < 2^23 + 7.5 already
// rounds to at most 2^23 + 7).
template <bool SAT>
__device__ __forceinline__ float e2m1_magic(float a) {
  const float r1 = __fmaf_rn(a, 2.0f, kMagic);         // rint(2a):      a in [0, 2]
  const float r2 = __fadd_rn(a, kMagic + 2.0f);        // rint(a + 2):   a in [2, 4]
  const float r3 = __fmaf_rn(a, 0.5f, kMagic + 4.0f);  // rint(a/2 + 4): a in [4, 6]
  const float r = fminf(r1, r2);
  return SAT ? fminf(r, fminf(r3, kMagic + 7.0f)) : fminf(r, r3);
}

// The E2M1 magnitude (fp32) of the code in 2^23 + c: max(c / 2, c - 2, 2c - 8), each exact.
__device__ __forceinline__ float e2m1_magnitude(float r) {
  const float l1 = __fmaf_rn(r, 0.5f, -0.5f * kMagic);
  const float l2 = __fadd_rn(r, -(kMagic + 2.0f));
  const float l3 = __fmaf_rn(r, 2.0f, -(2.0f * kMagic + 8.0f));
  return fmaxf(fmaxf(l1, l2), l3);
}

__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// |x| max of 8 bf16x2 / f16x2 words (NaN propagating), as float32: max|x| = max(|max x|, |min x|),
// two trees of 3-input VHMNMX (no per-word abs), then max(max, -min) per half and the final |.|
// in fp32 (max(+0, -0) may be -0: the abs makes the amax of a zero block +0, as the reference's).
template <int DT>
__device__ __forceinline__ float amax16(const uint32_t* w) {
  using T2 = typename std::conditional<DT == kBF16, __nv_bfloat162, __half2>::type;
  T2 hi[8], lo[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) hi[i] = lo[i] = *reinterpret_cast<const T2*>(&w[i]);
#pragma unroll
  for (int s = 4; s >= 1; s >>= 1) {
#pragma unroll
    for (int i = 0; i < s; ++i) {
      hi[i] = __hmax2_nan(hi[i], hi[i + s]);
      lo[i] = __hmin2_nan(lo[i], lo[i + s]);
    }
  }
  const T2 m = __hmax2_nan(hi[0], __hneg2(lo[0]));
  const uint32_t b = *reinterpret_cast<const uint32_t*>(&m);
  float f0, f1;
  if constexpr (DT == kBF16) {
    f0 = __uint_as_float(b << 16);
    f1 = __uint_as_float(b & 0xFFFF0000u);
  } else {
    const float2 f = __half22float2(m);
    f0 = f.x;
    f1 = f.y;
  }
  return max_nan(fabsf(f0), fabsf(f1));
}

// x word j of a block -> the two elements as float32.
template <int DT>
__device__ __forceinline__ float2 unpack(uint32_t w) {
  if constexpr (DT == kBF16) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
}

// Two e4m3 scale bytes of v0 (low byte) and v1: RNE, saturating at 448.
__device__ __forceinline__ uint32_t e4m3x2(float v0, float v1) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(v1), "f"(v0));
  return r;
}

__device__ __forceinline__ float e4m3_value(uint32_t byte) {
  uint32_t h;
  asm("{\n.reg .b16 b;\ncvt.u16.u32 b, %1;\ncvt.rn.f16x2.e4m3x2 %0, b;\n}" : "=r"(h) : "r"(byte));
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xFFFFu)));
}

}  // namespace fp4c
