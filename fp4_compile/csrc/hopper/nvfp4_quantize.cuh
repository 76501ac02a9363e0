// NVFP4 quantization element math shared by the quantization kernel (nvfp4_quant.cu) and the small-M
// GEMM's in-kernel quantization (nvfp4_small_m.cu): fp4_compile.format.quantize_nvfp4, bit for bit, in
// the same order of float32 operations as triton_quant.py (nvfp4_quant.cu's header says why each
// step is written as it is).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fp4c {
namespace quantize {

constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;  // input dtype codes

constexpr float kMagic = 8388608.0f;  // 2^23: the float adder rounds to integers in [2^23, 2^24)

// 2^23 + E2M1 magnitude code (0..7) of a = |x| * out_scale >= 0; see the header. Without SAT, valid
// for a < 7 only (then fma(a, 0.5, 2^23 + 4) < 2^23 + 7.5 already rounds to at most 2^23 + 7).
template <bool SAT>
__device__ __forceinline__ float e2m1_magic(float a) {
  const float r1 = __fmaf_rn(a, 2.0f, kMagic);         // rint(2a):      a in [0, 2]
  const float r2 = __fadd_rn(a, kMagic + 2.0f);        // rint(a + 2):   a in [2, 4]
  const float r3 = __fmaf_rn(a, 0.5f, kMagic + 4.0f);  // rint(a/2 + 4): a in [4, 6]
  const float r = fminf(r1, r2);
  return SAT ? fminf(r, fminf(r3, kMagic + 7.0f)) : fminf(r, r3);
}

// Byte 3 of the result: the packed pair (lo code, hi code) with both sign bits, from the two magic
// floats (bits 2^23 + code: shifting left by 24 / 28 keeps exactly the code) and the sign bits of
// the elements (bit 15: lo, bit 31: hi, as in a bf16x2/f16x2 word); the low bytes hold garbage.
// (m * 0x1001 moves bit 15 to 27 and keeps bit 31; the fields are disjoint, so nothing carries.)
__device__ __forceinline__ uint32_t pack_pair(float r_lo, float r_hi, uint32_t signs) {
  const uint32_t codes = (__float_as_uint(r_lo) << 24) + (__float_as_uint(r_hi) << 28);
  return codes + (signs & 0x80008000u) * 0x1001u;
}

// Byte 3 of each of b0..b3 -> one word (element pairs in memory order).
__device__ __forceinline__ uint32_t bytes4(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0073), __byte_perm(b2, b3, 0x0073), 0x5410);
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

// The amax of block b (0, 1) of a pair: 16-bit inputs as x2 words w[16], fp32 inputs w[32].
template <int DT>
__device__ __forceinline__ float block_amax(const uint32_t* w, int b) {
  if constexpr (DT == kF32) {
    float m = fabsf(__uint_as_float(w[16 * b]));
#pragma unroll
    for (int i = 1; i < 16; ++i) m = max_nan(m, fabsf(__uint_as_float(w[16 * b + i])));
    return m;
  } else {
    return amax16<DT>(w + 8 * b);
  }
}

// The two blocks' e4m3 scale bytes (block 0 low): sf = e4m3_rne(min(gs * (amax / 6), 448)), and the
// NaN byte 0x7F for a block holding Inf/NaN (bad).
__device__ __forceinline__ uint32_t scale_bytes(const float (&amax)[2], float gs, bool (&bad)[2]) {
  const float v0 = __fmul_rn(gs, __fmul_rn(amax[0], 0.16666666666666666f));
  const float v1 = __fmul_rn(gs, __fmul_rn(amax[1], 0.16666666666666666f));
  bad[0] = !(amax[0] < INFINITY);
  bad[1] = !(amax[1] < INFINITY);
  const uint32_t cv = e4m3x2(v0, v1);
  return (bad[0] ? 0x7Fu : (cv & 0xFFu)) | (bad[1] ? 0x7Fu : (cv >> 8)) << 8;
}

// The reference's float ops for a scale byte: sf == 0 ? 0 : 1 / (sf * (1/gs)).
__device__ __forceinline__ float out_scale(uint32_t byte, float gs) {
  const float sf = e4m3_value(byte);
  const float safe = __fmul_rn(sf, __frcp_rn(gs));
  return sf == 0.0f ? 0.0f : __frcp_rn(safe);
}

template <int DT>
struct Elem;
template <>
struct Elem<kBF16> {
  static constexpr int kBytes = 2;
};
template <>
struct Elem<kF16> {
  static constexpr int kBytes = 2;
};
template <>
struct Elem<kF32> {
  static constexpr int kBytes = 4;
};

// Elements e, e+1 of a pair of blocks as float32, with their sign bits at bits 15 (e) and 31 (e+1).
struct ElementPair {
  float lo, hi;
  uint32_t signs;
};
template <int DT>
__device__ __forceinline__ ElementPair element_pair(const uint32_t* w, int e) {
  if constexpr (DT == kF32) {
    return {__uint_as_float(w[e]), __uint_as_float(w[e + 1]), __byte_perm(w[e], w[e + 1], 0x7632)};
  } else {
    const float2 p = unpack<DT>(w[e / 2]);
    return {p.x, p.y, w[e / 2]};
  }
}

// The packed codes of a pair of blocks, linear (word j: elements 8j .. 8j+7, element e in bits
// 4(e % 8) .. 4(e % 8) + 3); a bad block (Inf/NaN) is zero codes. os: the blocks' out_scale.
template <int DT, bool SAT>
__device__ __forceinline__ void encode_words(const uint32_t* w, const float* os, const bool* bad, uint32_t (&out)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // output word j: elements 8j .. 8j+7 (block j / 2)
    uint32_t bytes[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const ElementPair x = element_pair<DT>(w, 8 * j + 2 * k);
      const float o = os[j / 2];
      const float rl = e2m1_magic<SAT>(__fmul_rn(fabsf(x.lo), o));
      const float rh = e2m1_magic<SAT>(__fmul_rn(fabsf(x.hi), o));
      bytes[k] = pack_pair(rl, rh, x.signs);
    }
    out[j] = bad[j / 2] ? 0u : bytes4(bytes[0], bytes[1], bytes[2], bytes[3]);
  }
}

// Linear packed words (word i: elements 8i .. 8i+7, element e in bits 4(e % 8) .. 4(e % 8) + 3) ->
// the GEMMs' word layout (ops/weight_layout.py): word t holds the code of element
// 8j + 2t + h of the chunk (placed register j, lane h) with its bits where the decode wants them:
// for j < 3 the magnitude at bits 6 - 3j .. 8 - 3j and the sign at 15 - 3j (+16 for lane 1); j = 3
// in the bits left over (kPlaced3, from weight_layout.code_bit_positions; tests check both).
__device__ constexpr int kPlaced3[2][4] = {{30, 26, 27, 13}, {14, 10, 11, 29}};  // [lane][mantissa, e0, e1, sign]
__device__ __forceinline__ void to_kernel_words(const uint32_t (&lin)[4], uint32_t (&kw)[4]) {
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    uint32_t w = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int e = 8 * j + 2 * t + h;
        const uint32_t c = (lin[e >> 3] >> (4 * (e & 7))) & 0xFu;
        if (j < 3) {
          w |= (c & 7u) << (6 - 3 * j + 16 * h) | (c >> 3) << (15 - 3 * j + 16 * h);
        } else {
#pragma unroll
          for (int b = 0; b < 4; ++b) w |= ((c >> b) & 1u) << kPlaced3[h][b];
        }
      }
    kw[t] = w;
  }
}

}  // namespace quantize
}  // namespace fp4c
