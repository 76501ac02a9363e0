// NVFP4 weight decode shared by the Hopper GEMMs (nvfp4_small_m.cu, nvfp4_wgmma.cu): e4m3 scale
// pairs to x2 scale registers, one 32-bit word of the kernels' weight layout (8 e2m1 codes) to four
// x2 16-bit values e2m1 * sf * 2^-8, and float <-> output element conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fp4c {

template <bool FP16>
struct ScalePair {
  uint32_t lo, hi;  // broadcast x2 registers: sf[2c] * 2^s, sf[2c+1] * 2^s (s = 6 fp16, 118 bf16)
};

// Two e4m3 scale bytes (block 2c in the low byte) -> broadcast x2 scale registers.
template <bool FP16>
__device__ __forceinline__ ScalePair<FP16> make_scales(uint32_t pair) {
  ScalePair<FP16> s;
  if constexpr (FP16) {
    asm("{\n"
        ".reg .b16 sl;\n"
        ".reg .b32 h, c;\n"
        "cvt.u16.u32 sl, %2;\n"
        "cvt.rn.f16x2.e4m3x2 h, sl;\n"
        "mov.b32 c, 0x54005400;\n"  // 64, 64
        "mul.rn.f16x2 h, h, c;\n"
        "prmt.b32 %0, h, h, 0x1010;\n"
        "prmt.b32 %1, h, h, 0x3232;\n"
        "}\n"
        : "=r"(s.lo), "=r"(s.hi)
        : "r"(pair));
  } else {
    asm("{\n"
        ".reg .b16 sl, sh;\n"
        ".reg .b32 h;\n"
        ".reg .f32 f0, f1;\n"
        "cvt.u16.u32 sl, %2;\n"
        "cvt.rn.f16x2.e4m3x2 h, sl;\n"
        "mov.b32 {sl, sh}, h;\n"
        "cvt.f32.f16 f0, sl;\n"
        "cvt.f32.f16 f1, sh;\n"
        "mul.rn.f32 f0, f0, 0f7A800000;\n"  // 2^118: 448 * 2^118 < 2^127
        "mul.rn.f32 f1, f1, 0f7A800000;\n"
        "cvt.rn.bf16x2.f32 %0, f0, f0;\n"
        "cvt.rn.bf16x2.f32 %1, f1, f1;\n"
        "}\n"
        : "=r"(s.lo), "=r"(s.hi)
        : "r"(pair));
  }
  return s;
}

// One word (8 codes) -> 4 x2 values e2m1 * sf * 2^-8; r[j] holds k = 8j + 2w + {0, 1} of the chunk.
// Bit placement (ops/weight_layout.py, which checks these constants): each code's sign goes to bit
// 15 of its 16-bit lane and its 3 magnitude bits to the lowest exponent bits and the top mantissa
// bit, which reads as e2m1 * 2^-126 (bf16), subnormal 0.5 included. The layout stores r[0..2] at
// shifts 0, 3, 6 of that mask, and r[3] in the 8 bits left over, gathered by three carry-free
// rotated copies (one 32x32->64 multiply whose high word brings back the wrapped bits: 8 integer
// instructions per word; or three rotations: 10). fp16 moves the magnitude up 3 bits
// (v * 9 = v | v << 3) for e2m1 * 2^-14. One x2 fma by the scale (sf * 2^118 or sf * 2^6) gives
// the value.
constexpr uint32_t kBf16Bits = 0x81C081C0u;
constexpr uint32_t kFp16Bits = 0x8E008E00u;
constexpr uint32_t kFp16Mult = 9u;  // v * 9 = v | v << 3: magnitude bits 8..6 -> 11..9
constexpr uint32_t kGroup3Bits = 0x6C006C00u;
constexpr int kGroup3Rot0 = 2, kGroup3Rot1 = 8, kGroup3Rot2 = 13;  // r[3]: copies rotated left by these
constexpr uint32_t kGroup3Mult = (1u << kGroup3Rot0) | (1u << kGroup3Rot1) | (1u << kGroup3Rot2);

// How r[3]'s bits are gathered (same result): one 32x32->64 multiply, the fewest instructions, for
// the small-M kernel (up to 5% faster there at M = 1); or three funnel-shift rotations on the ALU pipe
// for the wgmma kernel, where the multiply's time on the FMA pipe made the kernel 10-15% slower at
// M >= 128 (benchmarks/NOTES.md v12b).
enum class Gather { kMultiply, kRotate };

template <bool FP16, Gather G = Gather::kMultiply>
__device__ __forceinline__ void decode_word(uint32_t w, const ScalePair<FP16>& s, uint32_t (&r)[4]) {
  uint32_t v3;
  if constexpr (G == Gather::kMultiply) {
    const uint64_t p = uint64_t(w & kGroup3Bits) * kGroup3Mult;
    v3 = (uint32_t(p) | uint32_t(p >> 32)) & kBf16Bits;
  } else {
    const uint32_t u = w & kGroup3Bits;
    v3 = (__funnelshift_l(u, u, kGroup3Rot0) | __funnelshift_l(u, u, kGroup3Rot1) |
          __funnelshift_l(u, u, kGroup3Rot2)) & kBf16Bits;
  }
  uint32_t v[4];
  if constexpr (FP16) {  // r[0..2]: isolate, then one multiply shifts by s and adds the << 3 copy
    v[0] = ((w & kBf16Bits) * kFp16Mult) & kFp16Bits;
    v[1] = ((w & (kBf16Bits >> 3)) * (kFp16Mult << 3)) & kFp16Bits;
    v[2] = ((w & (kBf16Bits >> 6)) * (kFp16Mult << 6)) & kFp16Bits;
    v[3] = (v3 * kFp16Mult) & kFp16Bits;
  } else {
    v[0] = w & kBf16Bits;
    v[1] = (w << 3) & kBf16Bits;
    v[2] = (w << 6) & kBf16Bits;
    v[3] = v3;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t sc = j < 2 ? s.lo : s.hi;
    if constexpr (FP16) {
      asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r[j]) : "r"(v[j]), "r"(sc), "r"(0x80008000u));
    } else {
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r[j]) : "r"(v[j]), "r"(sc), "r"(0x80008000u));
    }
  }
}

// Byte offsets in the tiled weight layout (ops/weight_layout.py, tile_rows): each 16-row tile's 256-k row
// pieces (128 code bytes, 16 scale bytes) are contiguous, tile by tile. Row r (r >= 0) of a weight whose rows
// hold `row_bytes` bytes starts at tiled_row(r, row_bytes, piece bytes); its 128-k group g (`bytes` of the
// row: 64 of codes, 8 of scales) is tiled_group(g, bytes) further. (32-bit group math: int64 here took up to
// 27 more registers in the decode kernel.)
__device__ __forceinline__ int64_t tiled_row(int64_t r, int64_t row_bytes, int piece) {
  return (r >> 4) * 16 * row_bytes + (r & 15) * piece;
}
__device__ __forceinline__ int tiled_group(int g, int bytes) { return (g >> 1) * 32 * bytes + (g & 1) * bytes; }

// float <-> output element type
template <typename OutT>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
// (16-bit types: pack(lo, hi) rounds two floats into one 32-bit pair, lo in the low half)
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 to(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float from(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ __half to(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float from(__half v) { return __half2float(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

}  // namespace fp4c
