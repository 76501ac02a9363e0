// The element math of NVFP4 activation quantization (fp4_compile.format.quantize_nvfp4 bit for bit; the
// algorithm and why it is fast: nvfp4_quant.cu's header), shared by the quantization kernels of
// nvfp4_quant.cu and the W4A4 wgmma kernel that quantizes its own activations (nvfp4_wgmma.cu). A thread
// owns a pair of adjacent 16-element blocks: 16 words of 16-bit inputs (or 32 of fp32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "grid_dependency.cuh"

namespace fp4c {
namespace quant {

constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;  // input dtype codes

constexpr float kMagic = 8388608.0f;  // 2^23: the float adder rounds to integers in [2^23, 2^24)

// ---------------------------------------------------------------------------------------------
// element math

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

// ---------------------------------------------------------------------------------------------
// one pair of blocks

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

// Elements e, e+1 rounded: the magic floats 2^23 + code magnitude (e2m1_magic) and x's sign bits
// (15: e, 31: e+1). os: the two blocks' out_scale.
struct RoundedPair {
  float lo, hi;
  uint32_t signs;
};
template <int DT, bool SAT>
__device__ __forceinline__ RoundedPair round_pair(const uint32_t* w, const float* os, int e) {
  const ElementPair x = element_pair<DT>(w, e);
  const float o = os[e / 16];
  return {e2m1_magic<SAT>(__fmul_rn(fabsf(x.lo), o)), e2m1_magic<SAT>(__fmul_rn(fabsf(x.hi), o)), x.signs};
}

// The block values of one pair of blocks: sign(x) * e2m1(code) * sf, written to v (exact in bf16 and
// fp16). From the magic float r = 2^23 + code, |e2m1| = max(code / 2, code - 2, 2 code - 8) (the
// E2M1 values 0, 0.5, 1, 1.5, 2, 3, 4, 6), each term exact; the sign is x's (as the Triton kernel's,
// which takes it from x * out_scale, out_scale >= 0); a block holding Inf/NaN has sf = NaN.
// Chunk c of `chunks` holds elements 8c .. 8c+7 (block c / 2); chunks 2, 3 only where valid1.
template <int DT, bool SAT, bool FP16_OUT>
__device__ __forceinline__ void values_pair(const uint32_t* w, const float* os, const float* sf, bool valid1,
                                            uint4 (&chunks)[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (c >= 2 && !valid1) break;
    uint32_t out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const ElementPair x = element_pair<DT>(w, 8 * c + 2 * k);
      const float o = os[c / 2], f = sf[c / 2];
      const float r[2] = {e2m1_magic<SAT>(__fmul_rn(fabsf(x.lo), o)), e2m1_magic<SAT>(__fmul_rn(fabsf(x.hi), o))};
      float v[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float mag = fmaxf(fmaxf(__fmaf_rn(r[h], 0.5f, -0.5f * kMagic), __fadd_rn(r[h], -(kMagic + 2.0f))),
                                __fmaf_rn(r[h], 2.0f, -(2.0f * kMagic + 8.0f)));
        const uint32_t sign = h == 0 ? (x.signs << 16) & 0x80000000u : x.signs & 0x80000000u;
        v[h] = __uint_as_float(__float_as_uint(__fmul_rn(mag, f)) | sign);
      }
      if constexpr (FP16_OUT) {
        const __half2 p = __floats2half2_rn(v[0], v[1]);
        out[k] = *reinterpret_cast<const uint32_t*>(&p);
      } else {
        const __nv_bfloat162 p = __floats2bfloat162_rn(v[0], v[1]);
        out[k] = *reinterpret_cast<const uint32_t*>(&p);
      }
    }
    chunks[c] = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

// The reference's float ops for a scale byte: sf == 0 ? 0 : 1 / (sf * (1/gs)), NaN for 0x7F/0xFF.
__device__ __forceinline__ float out_scale(uint32_t byte, float gs) {
  const float sf = e4m3_value(byte);
  const float safe = __fmul_rn(sf, __frcp_rn(gs));
  return sf == 0.0f ? 0.0f : __frcp_rn(safe);
}

// The scales of a pair of blocks (w: their words), as every mode computes them: the scale bytes (a
// block holding Inf/NaN: 0x7F, `bad`), their out_scale (from the CTA's shared table `s_os` where TABLE,
// else computed) and whether the E2M1 rounding needs the saturating min (warp-uniform over the active lanes).
struct PairScales {
  uint32_t b0, b1;
  float os[2];
  bool bad[2];
  bool sat;
};
template <int DT, bool TABLE>
__device__ __forceinline__ PairScales pair_scales(const uint32_t* w, float gs, const float* s_os) {
  float amax[2];
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    if constexpr (DT == kF32) {
      float m = fabsf(__uint_as_float(w[16 * b]));
#pragma unroll
      for (int i = 1; i < 16; ++i) m = max_nan(m, fabsf(__uint_as_float(w[16 * b + i])));
      amax[b] = m;
    } else {
      amax[b] = amax16<DT>(w + 8 * b);
    }
  }
  PairScales p;
  const float v0 = __fmul_rn(gs, __fmul_rn(amax[0], 0.16666666666666666f));
  const float v1 = __fmul_rn(gs, __fmul_rn(amax[1], 0.16666666666666666f));
  p.bad[0] = !(amax[0] < INFINITY);
  p.bad[1] = !(amax[1] < INFINITY);
  const uint32_t cv = e4m3x2(v0, v1);
  p.b0 = p.bad[0] ? 0x7Fu : (cv & 0xFFu);
  p.b1 = p.bad[1] ? 0x7Fu : (cv >> 8);
  p.os[0] = TABLE ? s_os[p.b0] : out_scale(p.b0, gs);
  p.os[1] = TABLE ? s_os[p.b1] : out_scale(p.b1, gs);
  // Without the saturating min, a block needs max a = amax * out_scale < 7 (NaN: bad, any path).
  const bool sat = __fmul_rn(amax[0], p.os[0]) >= 7.0f || __fmul_rn(amax[1], p.os[1]) >= 7.0f;
  p.sat = __any_sync(__activemask(), sat);
  return p;
}

// The block values of a pair of blocks with scales `p` (chunks as values_pair's).
template <int DT, bool FP16_OUT>
__device__ __forceinline__ void pair_values(const uint32_t* w, const PairScales& p, bool valid1, uint4 (&chunks)[4]) {
  const float sf[2] = {e4m3_value(p.b0), e4m3_value(p.b1)};
  if (p.sat) {
    values_pair<DT, true, FP16_OUT>(w, p.os, sf, valid1, chunks);
  } else {
    values_pair<DT, false, FP16_OUT>(w, p.os, sf, valid1, chunks);
  }
}

// The 16 words of block pair `pair` of a 16-bit row (the second block's zero where !valid1). Through L1:
// a lane's four 16-byte loads share two 32-byte sectors, and every CTA of an SM reads the norm's weight.
// Coherent (grid_dependency.cuh): the kernel before writes x and the residual.
__device__ __forceinline__ void load_pair_words(const void* row, int pair, bool valid1, uint32_t (&w)[16]) {
  const char* src = static_cast<const char*>(row) + 64 * static_cast<int64_t>(pair);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 t = make_uint4(0u, 0u, 0u, 0u);
    if (i < 2 || valid1) t = fp4c::coherent_load_v4(src + 16 * i);
    w[4 * i] = t.x;
    w[4 * i + 1] = t.y;
    w[4 * i + 2] = t.z;
    w[4 * i + 3] = t.w;
  }
}

}  // namespace quant
}  // namespace fp4c
