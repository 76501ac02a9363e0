// Device helpers shared by the NVFP4 x 16-bit mma.sync GEMMs of this folder (nvfp4_small_m.cu,
// nvfp4_mid_m.cu): e4m3 scale pairs to x2 registers, the in-register e2m1 decode, the m16n8k16 MMA,
// the streaming loads and the output conversions. See nvfp4_small_m.cu for the weight layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace fp4c {

constexpr int kWarpSize = 32;

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

// Pair j of one word (8 codes) -> x2 value e2m1 * sf * 2^-8 holding k = 8j + 2w + {0, 1} of the chunk.
// Bit placement: the sign to bit 15 of each 16-bit lane, the 3 magnitude bits to the lowest
// exponent bits and the top mantissa bit, which reads as e2m1 * 2^-126 (bf16) or * 2^-14 (fp16),
// subnormal 0.5 included; one x2 fma by the scale (sf * 2^118 or sf * 2^6) gives the value.
template <bool FP16, int J>
__device__ __forceinline__ uint32_t decode_pair(uint32_t w, const ScalePair<FP16>& s) {
  constexpr uint32_t kMag = FP16 ? 0x0E000E00u : 0x01C001C0u;
  constexpr int kMagBit = FP16 ? 9 : 6;
  constexpr int sh = 12 - 4 * J;          // brings nibble J (and J + 4) to the top of its lane
  constexpr int d = sh - (12 - kMagBit);  // where the magnitude bits must move
  const uint32_t p = w << sh;
  const uint32_t t = d >= 0 ? (w << d) : (w >> -d);
  const uint32_t v = (p & 0x80008000u) | (t & kMag);
  const uint32_t sc = J < 2 ? s.lo : s.hi;
  uint32_t r;
  if constexpr (FP16) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(sc), "r"(0x80008000u));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(sc), "r"(0x80008000u));
  }
  return r;
}

// All four pairs of a word: r[j] = decode_pair<j>.
template <bool FP16>
__device__ __forceinline__ void decode_word(uint32_t w, const ScalePair<FP16>& s, uint32_t (&r)[4]) {
  r[0] = decode_pair<FP16, 0>(w, s);
  r[1] = decode_pair<FP16, 1>(w, s);
  r[2] = decode_pair<FP16, 2>(w, s);
  r[3] = decode_pair<FP16, 3>(w, s);
}

template <bool FP16>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (FP16) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Weights are read once: stream them past L1 (no allocation). A lane's 16-byte chunk is one
// quarter of the 64 bytes its quad reads from a row per k-group; FP4C_WEIGHT_PREFETCH (bytes:
// 0, 64, 128, 256) asks L2 to fetch that much of the row at once, so the next groups of the same
// row are L2 hits and DRAM sees longer bursts.
#ifndef FP4C_WEIGHT_PREFETCH
#define FP4C_WEIGHT_PREFETCH 0
#endif
#if FP4C_WEIGHT_PREFETCH == 0
#define FP4C_PREFETCH_QUALIFIER ""
#elif FP4C_WEIGHT_PREFETCH == 64
#define FP4C_PREFETCH_QUALIFIER ".L2::64B"
#elif FP4C_WEIGHT_PREFETCH == 128
#define FP4C_PREFETCH_QUALIFIER ".L2::128B"
#elif FP4C_WEIGHT_PREFETCH == 256
#define FP4C_PREFETCH_QUALIFIER ".L2::256B"
#else
#error "FP4C_WEIGHT_PREFETCH must be 0, 64, 128 or 256"
#endif
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate" FP4C_PREFETCH_QUALIFIER ".v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// A lane's scale pair is 2 of the 8 bytes per row that its quad reads per k-group; kept in L1,
// the next three groups' pairs come from the same 32-byte sector.
__device__ __forceinline__ uint32_t load_u16_keep(const void* p) {
  unsigned short v;
  asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

// The activations are re-read by every CTA: keep them in L1/L2.
__device__ __forceinline__ uint4 load_keep(const void* p) {
  uint4 v;
  asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// float <-> output element type
template <typename OutT>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 to(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float from(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ __half to(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float from(__half v) { return __half2float(v); }
};

}  // namespace fp4c
