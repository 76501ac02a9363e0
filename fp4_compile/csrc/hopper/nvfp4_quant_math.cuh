// The NVFP4 element math of the CUDA quantization kernel (nvfp4_quant.cu, whose header states the
// function: fp4_compile.format.quantize_nvfp4 bit for bit), shared with the small-M GEMM's epilogue
// that writes block values (nvfp4_small_m.cu).
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace fp4c {

constexpr float kMagic = 8388608.0f;  // 2^23: the float adder rounds to integers in [2^23, 2^24)

// 2^23 + E2M1 magnitude code (0..7) of a = |x| * out_scale >= 0, round to nearest even: rint(f(a)) with
// f(a) = min(2a, a + 2, a/2 + 4, 7) (nvfp4_quant.cu's header). Without SAT, valid for a < 7 only (then
// fma(a, 0.5, 2^23 + 4) < 2^23 + 7.5 already rounds to at most 2^23 + 7).
template <bool SAT>
__device__ __forceinline__ float e2m1_magic(float a) {
  const float r1 = __fmaf_rn(a, 2.0f, kMagic);         // rint(2a):      a in [0, 2]
  const float r2 = __fadd_rn(a, kMagic + 2.0f);        // rint(a + 2):   a in [2, 4]
  const float r3 = __fmaf_rn(a, 0.5f, kMagic + 4.0f);  // rint(a/2 + 4): a in [4, 6]
  const float r = fminf(r1, r2);
  return SAT ? fminf(r, fminf(r3, kMagic + 7.0f)) : fminf(r, r3);
}

// |e2m1| of the magic float r = 2^23 + code: max(code / 2, code - 2, 2 code - 8), each term exact
// (the E2M1 values 0, 0.5, 1, 1.5, 2, 3, 4, 6).
__device__ __forceinline__ float e2m1_magnitude(float r) {
  return fmaxf(fmaxf(__fmaf_rn(r, 0.5f, -0.5f * kMagic), __fadd_rn(r, -(kMagic + 2.0f))),
               __fmaf_rn(r, 2.0f, -(2.0f * kMagic + 8.0f)));
}

__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
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

// The reference's float ops for a scale byte: sf == 0 ? 0 : 1 / (sf * (1/gs)), NaN for 0x7F/0xFF.
__device__ __forceinline__ float out_scale(uint32_t byte, float gs) {
  const float sf = e4m3_value(byte);
  const float safe = __fmul_rn(sf, __frcp_rn(gs));
  return sf == 0.0f ? 0.0f : __frcp_rn(safe);
}

// The scale byte of a 16-element block whose max |x| is amax: e4m3(gs * (amax * (1/6))), 0x7F (NaN)
// for a block holding Inf or NaN.
__device__ __forceinline__ uint32_t scale_byte(float amax, float gs) {
  const float v = __fmul_rn(gs, __fmul_rn(amax, 0.16666666666666666f));
  return amax < INFINITY ? (e4m3x2(v, 0.0f) & 0xFFu) : 0x7Fu;
}

// The exact NVFP4 block value sign(x) * e2m1 * sf (without 1/gs) of an element x of a block whose
// max |x| is amax and scale byte `byte`: one element of the quantization kernel's mode 2 (NaN for a
// block holding Inf or NaN).
__device__ __forceinline__ float block_value(float x, uint32_t byte, float gs) {
  const float mag = e2m1_magnitude(e2m1_magic<true>(__fmul_rn(fabsf(x), out_scale(byte, gs))));
  return __uint_as_float(__float_as_uint(__fmul_rn(mag, e4m3_value(byte))) | (__float_as_uint(x) & 0x80000000u));
}

}  // namespace fp4c
