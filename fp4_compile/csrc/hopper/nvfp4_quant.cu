// NVFP4 activation quantization on sm_89/sm_90: x [M, K] (bf16/fp16/fp32) -> packed E2M1 codes
// + e4m3 block scales (linear or 128x4 swizzled), the exact block values e2m1 * sf (bf16/fp16)
// that the Hopper W4A4 GEMMs take, or the codes in the Hopper GEMMs' weight word layout
// (ops/weight_layout.py) with linear scales, which the small-M GEMM decodes like its weights.
//
// The function is fp4_compile.format.quantize_nvfp4, bit for bit (shared NVFP4.md), in the same
// order of float32 operations as triton_quant.py's _block_scales / _scaled / _e2m1_code:
//   amax = max |x| over 16 elements (NaN propagates), t = amax * (1/6), v = gs * t,
//   sf = e4m3_rne(min(v, 448)) (a block holding Inf/NaN: NaN byte 0x7F),
//   out_scale = sf == 0 ? 0 : 1 / (sf * (1/gs))     (both divisions IEEE round-to-nearest),
//   code = e2m1_rne(min(|x * out_scale|, 6)) with the sign bit of x * out_scale.
//
// Why it is fast (the Triton kernel is bound by integer ALU work, ~27 SASS per element):
// - one thread owns two adjacent 16-element blocks (32 elements): the amax needs no shuffles, the
//   loads are 16-byte vectors, the 16 code bytes are one 16-byte store, and one
//   cvt.rn.satfinite.e4m3x2.f32 rounds both scales (satfinite = min(., 448) then RNE);
// - out_scale depends only on the scale byte: each CTA tabulates 1/(sf*(1/gs)) for the 256 bytes
//   once in shared memory (exactly the reference's float ops), so a block costs one LDS instead of
//   a decode, a multiply and an IEEE reciprocal;
// - E2M1 rounding runs on the FP32 pipe: with a = |x| * out_scale the code is
//   rint(f(a)), f(a) = min(2a, a + 2, a/2 + 4, 7) (slopes 2, 1, 1/2: the E2M1 steps 0.5, 1, 2), and
//   rint commutes with min, so code + 2^23 = min(fma(a, 2, 2^23), a + (2^23 + 2), fma(a, 0.5, 2^23 + 4))
//   -- each term rounded once by the adder at integer spacing, ties to even code = ties to even
//   mantissa, exactly the E2M1 RNE thresholds. The saturating min with 2^23 + 7 is only needed when
//   a block's largest a reaches 7 (448 clamp, coarse subnormal scales): a warp-uniform branch.
//
// Only sm_89 and sm_90 are built (cvt.rn.satfinite.e4m3x2.f32 / cvt.rn.f16x2.e4m3x2 need sm_89);
// E2M1 conversion instructions (sm_100a) are not used.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "grid_dependency.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kModeLinear = 0;
constexpr int kModeSwizzled = 1;
constexpr int kModeValues = 2;
constexpr int kModeKernelCodes = 3;
constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;  // input dtype codes

constexpr float kMagic = 8388608.0f;  // 2^23: the float adder rounds to integers in [2^23, 2^24)

struct Args {
  const void* x;
  int64_t ldx;  // elements
  uint8_t* q;
  int64_t ldq;  // bytes
  uint8_t* s;
  int64_t lds;  // bytes (linear mode)
  const float* gs;
  int m, kb;     // rows, 16-element blocks per row
  int mg, pg;    // rows and block pairs covered by the grid (swizzled: padded to 128 rows, 4 blocks)
  int kbp;       // swizzled: round_up(kb, 4)
  int log_tx;    // threads of a CTA along the pairs of a row: 1 << log_tx
  int q16;       // 1: every row of q is 16-byte aligned (one 16-byte store per pair)
  void* v;       // block values [M, K] (kModeValues), row stride ldv elements, fp16 if v_fp16 else bf16
  int64_t ldv;
  int v16;       // 1: every row of v is 16-byte aligned (16-byte stores)
  int early;     // 1: let the kernel after us launch once we have waited (only where it is our GEMM)
};

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

// 16-bit inputs: w[16] = the 32 elements as x2 words (block b: w[8b .. 8b+7]).
// fp32 inputs: f[32]; signs and values come from the floats directly.
// The codes of a pair of blocks in the GEMMs' word layout (ops/weight_layout.py), built from the
// rounded pairs: word t, placed register j takes elements 8j + 2t + {0, 1} (lanes 0, 1), a pair that
// element_pair gives as it is. With m = both codes' magnitudes (lane 0 at bits 0..2, lane 1 at
// 16..18, one byte_perm) and s = both sign bits (15, 31): registers j < 3 take m << kMagShift[j]
// and s >> 3j; register 3 takes the bits left over, reached by rotations of m (e0, e1: kRot3Exp;
// mantissa: kRot3Mant) and s >> kSign3Shift. tests/test_cuda_quant.py checks these constants against
// weight_layout.code_bit_positions. A bad block (Inf/NaN) is zero codes.
__device__ constexpr int kMagShift[3] = {6, 3, 0};
constexpr int kRot3Exp = 25, kRot3Mant = 30, kSign3Shift = 2;
template <int DT, bool SAT>
__device__ __forceinline__ void encode_kernel_words(const uint32_t* w, const float* os, const bool* bad,
                                                    uint32_t (&kw)[4]) {
#pragma unroll
  for (int t = 0; t < 4; ++t) kw[t] = 0u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (bad[j / 2]) continue;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const RoundedPair r = round_pair<DT, SAT>(w, os, 8 * j + 2 * t);
      const uint32_t m = __byte_perm(__float_as_uint(r.lo), __float_as_uint(r.hi), 0x5410) & 0x00070007u;
      const uint32_t sg = r.signs & 0x80008000u;
      if (j < 3) {
        kw[t] |= (m << kMagShift[j]) | (sg >> (3 * j));
      } else {
        kw[t] |= (__funnelshift_l(m, m, kRot3Exp) & 0x0C000C00u) | (__funnelshift_l(m, m, kRot3Mant) & 0x40004000u) |
                 (sg >> kSign3Shift);
      }
    }
  }
}

template <int DT, bool SAT, bool KERNEL_LAYOUT = false>
__device__ __forceinline__ void encode_pair(const Args& a, const uint32_t* w, const float* os, const bool* bad,
                                            int64_t row, int pair, bool valid1) {
  uint8_t* q = a.q + row * a.ldq + 16 * static_cast<int64_t>(pair);
  if constexpr (KERNEL_LAYOUT) {  // the whole 16-byte chunk: a missing second block is zero codes
    uint32_t kw[4];
    encode_kernel_words<DT, SAT>(w, os, bad, kw);
    if (a.q16) {
      *reinterpret_cast<uint4*>(q) = make_uint4(kw[0], kw[1], kw[2], kw[3]);
    } else {
      *reinterpret_cast<uint2*>(q) = make_uint2(kw[0], kw[1]);
      *reinterpret_cast<uint2*>(q + 8) = make_uint2(kw[2], kw[3]);
    }
  } else {
    uint32_t out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // output word j: elements 8j .. 8j+7 (block j / 2)
      uint32_t bytes[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const RoundedPair r = round_pair<DT, SAT>(w, os, 8 * j + 2 * k);
        bytes[k] = pack_pair(r.lo, r.hi, r.signs);
      }
      out[j] = bad[j / 2] ? 0u : bytes4(bytes[0], bytes[1], bytes[2], bytes[3]);
    }
    if (valid1 && a.q16) {
      *reinterpret_cast<uint4*>(q) = make_uint4(out[0], out[1], out[2], out[3]);
    } else {
      *reinterpret_cast<uint2*>(q) = make_uint2(out[0], out[1]);
      if (valid1) *reinterpret_cast<uint2*>(q + 8) = make_uint2(out[2], out[3]);
    }
  }
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

// Stores a pair's block values. Where the 32 lanes of a warp hold 32 whole consecutive pairs of one
// row (`staged`, warp-uniform), their 2 KB go out through shared memory so that each store
// instruction writes 512 contiguous bytes: stored straight from registers, each lane's 64 bytes sat
// 64 bytes from the next lane's, every instruction half of each sector it touched, and the kernel
// wrote at 66-68% of the copy bandwidth (benchmarks/NOTES.md v10d, v19). The staging slots of chunk
// c of lane L are XOR-swizzled (4 L + (c ^ (L >> 1 & 3))) so that neither side has bank conflicts.
// v: [M, K] 16-bit values, row stride ldv elements; v16: every row of v is 16-byte aligned.
__device__ __forceinline__ void store_values(void* v, int64_t ldv, bool v16, const uint4 (&chunks)[4], int64_t row,
                                             int pair, bool valid1, bool staged, uint4* stage) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(v) + row * ldv + 32 * static_cast<int64_t>(pair));
  if (staged) {
    const int lane = threadIdx.x & 31;
    uint4* warp_stage = stage + (threadIdx.x & ~31) * 4;
#pragma unroll
    for (int c = 0; c < 4; ++c) warp_stage[4 * lane + (c ^ ((lane >> 1) & 3))] = chunks[c];
    __syncwarp();
    uint4* warp_dst = reinterpret_cast<uint4*>(dst - 16 * lane);  // the warp's first pair
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int from = 8 * i + (lane >> 2), c = lane & 3;
      warp_dst[32 * i + lane] = warp_stage[4 * from + (c ^ ((from >> 1) & 3))];
    }
    __syncwarp();
    return;
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (c >= 2 && !valid1) break;
    if (v16) {
      *reinterpret_cast<uint4*>(dst + 4 * c) = chunks[c];
    } else {
      dst[4 * c] = chunks[c].x;
      dst[4 * c + 1] = chunks[c].y;
      dst[4 * c + 2] = chunks[c].z;
      dst[4 * c + 3] = chunks[c].w;
    }
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

// The block values (staging four 16-byte chunks per thread) are held to 64 registers, 4 CTAs per SM
// (fp32 input took 70); the other modes need fewer unbounded (0: no minimum).
// TABLE: out_scale of each scale byte tabulated once per CTA, where threads loop over many rows. Where
// each thread has at most one row (decode-sized M; mode 3 always), the table's load of gs and its
// barrier sat on the path from the launch to the GEMM after it, ahead of the loads of x: each thread
// computes its two instead, and gs and x are loaded together.
template <int DT, int MODE, bool FP16_OUT, bool TABLE>
__global__ void __launch_bounds__(kThreads, MODE == kModeValues ? 4 : 0) nvfp4_quant_kernel(const Args a) {
  __shared__ float s_os[TABLE ? 256 : 1];
  __shared__ uint4 s_stage[MODE == kModeValues ? kThreads * 4 : 1];  // store_values
  // Launched with PDL: we wait for the kernel before us (it may have written x and the global scale).
  // Where the kernel after us is our GEMM, which waits for this grid's completion before it reads what we
  // write, it may launch then, once every kernel before us has completed: it reads its weights before its
  // wait (cuda_small_m.dependent_launch_mode). Any other kernel (Inductor's PDL kernels wait only for what
  // the kernel just before them wrote) launches at our completion.
  fp4c::wait_for_prior_grid();
  if (a.early) fp4c::allow_dependents();
  float gs = 0.0f;
  if constexpr (TABLE) {
    gs = fp4c::coherent_load_f32(a.gs);
    s_os[threadIdx.x] = out_scale(threadIdx.x, gs);
    __syncthreads();
  }

  const int tx = threadIdx.x & ((1 << a.log_tx) - 1);
  const int pair = blockIdx.x * (1 << a.log_tx) + tx;
  if (pair >= a.pg) return;
  const int ty_count = kThreads >> a.log_tx;
  const int g0 = 2 * pair;
  const bool in0 = g0 < a.kb, in1 = g0 + 1 < a.kb;
  constexpr int kWordsPerBlock = 16 * Elem<DT>::kBytes / 4;  // 8 (16-bit) or 16 (fp32)
  constexpr int kLoadsPerBlock = kWordsPerBlock / 4;

  for (int r = blockIdx.y * ty_count + (threadIdx.x >> a.log_tx); r < a.mg; r += gridDim.y * ty_count) {
    const int64_t row = r;
    const bool valid_row = r < a.m;
    const bool valid0 = valid_row && in0, valid1 = valid_row && in1;
    uint32_t byte_pair = 0;  // scale bytes (block g0 low), zero for padding
    if (valid0) {
      uint32_t w[2 * kWordsPerBlock];
      const char* src = static_cast<const char*>(a.x) + (row * a.ldx + 32 * static_cast<int64_t>(pair)) * Elem<DT>::kBytes;
#pragma unroll
      for (int i = 0; i < 2 * kLoadsPerBlock; ++i) {
        uint4 t = make_uint4(0u, 0u, 0u, 0u);
        if (i < kLoadsPerBlock || valid1) t = fp4c::coherent_load_v4_once(src + 16 * i);
        w[4 * i] = t.x;
        w[4 * i + 1] = t.y;
        w[4 * i + 2] = t.z;
        w[4 * i + 3] = t.w;
      }
      // loaded after x (the loads are ordered), so that 1/gs does not hold x's loads back
      if constexpr (!TABLE) gs = fp4c::coherent_load_f32(a.gs);
      const PairScales ps = pair_scales<DT, TABLE>(w, gs, s_os);
      byte_pair = ps.b0 | ((valid1 ? ps.b1 : 0u) << 8);
      if constexpr (MODE == kModeValues) {
        uint4 chunks[4];
        pair_values<DT, FP16_OUT>(w, ps, valid1, chunks);
        // (the warp's lanes share the row from 32 threads per row on; all 64 blocks in the row)
        const bool staged = a.v16 && a.log_tx >= 5 && 2 * (pair - (threadIdx.x & 31) + 32) <= a.kb;
        store_values(a.v, a.ldv, a.v16, chunks, row, pair, valid1, staged, s_stage);
      } else if (ps.sat) {
        encode_pair<DT, true, MODE == kModeKernelCodes>(a, w, ps.os, ps.bad, row, pair, valid1);
      } else {
        encode_pair<DT, false, MODE == kModeKernelCodes>(a, w, ps.os, ps.bad, row, pair, valid1);
      }
    }
    if constexpr (MODE == kModeLinear) {
      if (valid0) {
        uint8_t* s = a.s + row * a.lds + g0;
        s[0] = static_cast<uint8_t>(byte_pair);
        if (valid1) s[1] = static_cast<uint8_t>(byte_pair >> 8);
      }
    } else if constexpr (MODE == kModeKernelCodes) {
      if (valid0) *reinterpret_cast<uint16_t*>(a.s + row * a.lds + g0) = static_cast<uint16_t>(byte_pair);
    } else if constexpr (MODE == kModeSwizzled) {
      // 128x4 tiles of 512 bytes; g0 is even, so the pair is one aligned 16-bit store
      const int64_t off = ((row >> 7) * (a.kbp >> 2) + (g0 >> 2)) * 512 + (r & 31) * 16 + ((r >> 5) & 3) * 4 + (g0 & 3);
      *reinterpret_cast<uint16_t*>(a.s + off) = static_cast<uint16_t>(byte_pair);
    }
  }
}

template <int DT, int MODE, bool FP16_OUT = false, bool TABLE = true>
cudaError_t launch_kernel(const Args& a, dim3 grid, bool pdl, cudaStream_t stream) {
  return fp4c::launch(nvfp4_quant_kernel<DT, MODE, FP16_OUT, TABLE>, grid, dim3(kThreads), 0, pdl, stream, a);
}

// one_row: no thread has more than one row (the block values of a decode step skip the table; fp32
// inputs keep it: without it their 64 registers spill).
template <int DT>
cudaError_t launch_mode(const Args& a, int mode, bool fp16_out, bool one_row, dim3 grid, bool pdl,
                        cudaStream_t stream) {
  switch (mode) {
    case kModeLinear: return launch_kernel<DT, kModeLinear>(a, grid, pdl, stream);
    case kModeSwizzled: return launch_kernel<DT, kModeSwizzled>(a, grid, pdl, stream);
    case kModeKernelCodes: return launch_kernel<DT, kModeKernelCodes, false, false>(a, grid, pdl, stream);
    case kModeValues:
      if constexpr (DT != kF32) {
        if (one_row) {
          return fp16_out ? launch_kernel<DT, kModeValues, true, false>(a, grid, pdl, stream)
                          : launch_kernel<DT, kModeValues, false, false>(a, grid, pdl, stream);
        }
      }
      return fp16_out ? launch_kernel<DT, kModeValues, true>(a, grid, pdl, stream)
                      : launch_kernel<DT, kModeValues, false>(a, grid, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, then the block values (fp4::rms_norm_quantize; ops/rms_norm_quant.py has the Triton twin)

struct NormArgs {
  const void* x;
  int64_t ldx;  // elements
  const void* res;  // the residual (null: none)
  int64_t ldr;
  const void* w;  // the norm's weight [K]
  void* sum;      // x + residual [M, K] (written where res)
  int64_t ldsum;
  void* v;  // the block values [M, K]
  int64_t ldv;
  const float* gs;
  float eps;
  int k, kb, pg;  // K, 16-element blocks and block pairs per row
  int trigger;    // 1: let the kernel after us launch once we have waited for the one before
};

// x2 words (bf16x2 / f16x2) from two floats, rounded to nearest even.
template <int DT>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (DT == kBF16) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&p);
  } else {
    const __half2 p = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&p);
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

// One CTA per row; thread t owns block pairs t, t + blockDim, ... (P of them at most, held in registers
// between the two passes). The rounding is the eager ops': the residual sum in the activation dtype, then
// h = (s * (1 / sqrt(mean(s^2) + eps))).to(dtype) * weight rounded again (float32 products, the sum of
// squares in float32: only its order differs from the reference's), or with UNIT_OFFSET (Gemma's norm)
// h = (s * (1 / sqrt(mean(s^2) + eps)) * (1 + weight)).to(dtype) in float32, rounded once; then exactly the
// quantization kernel's block values of h.
template <int DT, int P, bool UNIT_OFFSET>
__global__ void __launch_bounds__(kThreads) rms_norm_values_kernel(const NormArgs a) {
  __shared__ float s_os[256];
  __shared__ uint4 s_stage[kThreads * 4];  // store_values
  __shared__ float s_part[kThreads / 32];
  fp4c::wait_for_prior_grid();
  if (a.trigger) fp4c::allow_dependents();
  const float gs = fp4c::coherent_load_f32(a.gs);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_os[i] = out_scale(i, gs);
  const int64_t row = blockIdx.x;
  uint32_t words[P][16], wt[P][16];  // (the weight loaded with x: its latency off the path after the sum)
  float sq = 0.0f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int pair = threadIdx.x + p * blockDim.x;
    if (pair >= a.pg) break;
    const bool valid1 = 2 * pair + 1 < a.kb;
    load_pair_words(static_cast<const uint16_t*>(a.x) + row * a.ldx, pair, valid1, words[p]);
    load_pair_words(a.w, pair, valid1, wt[p]);
    if (a.res) {  // the residual stream's add, rounded as the eager add rounds it
      uint32_t r[16];
      load_pair_words(static_cast<const uint16_t*>(a.res) + row * a.ldr, pair, valid1, r);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float2 xf = unpack<DT>(words[p][i]), rf = unpack<DT>(r[i]);
        words[p][i] = pack2<DT>(__fadd_rn(xf.x, rf.x), __fadd_rn(xf.y, rf.y));
      }
      uint4* dst =
          reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.sum) + row * a.ldsum + 32 * static_cast<int64_t>(pair));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (i < 2 || valid1) {
          dst[i] = make_uint4(words[p][4 * i], words[p][4 * i + 1], words[p][4 * i + 2], words[p][4 * i + 3]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float2 f = unpack<DT>(words[p][i]);
      sq = __fmaf_rn(f.x, f.x, __fmaf_rn(f.y, f.y, sq));
    }
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) sq += __shfl_xor_sync(0xFFFFFFFFu, sq, o);
  if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = sq;
  __syncthreads();  // (also publishes s_os)
  float total = 0.0f;
  for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) total += s_part[i];
  const float rstd = __frcp_rn(__fsqrt_rn(__fadd_rn(__fdiv_rn(total, static_cast<float>(a.k)), a.eps)));
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int pair = threadIdx.x + p * blockDim.x;
    if (pair >= a.pg) break;
    const bool valid1 = 2 * pair + 1 < a.kb;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float2 f = unpack<DT>(words[p][i]), g = unpack<DT>(wt[p][i]);
      if constexpr (UNIT_OFFSET) {
        words[p][i] = pack2<DT>(__fmul_rn(__fmul_rn(f.x, rstd), __fadd_rn(1.0f, g.x)),
                                __fmul_rn(__fmul_rn(f.y, rstd), __fadd_rn(1.0f, g.y)));
      } else {
        const float2 h = unpack<DT>(pack2<DT>(__fmul_rn(f.x, rstd), __fmul_rn(f.y, rstd)));
        words[p][i] = pack2<DT>(__fmul_rn(h.x, g.x), __fmul_rn(h.y, g.y));
      }
    }
    const PairScales ps = pair_scales<DT, true>(words[p], gs, s_os);
    uint4 chunks[4];
    pair_values<DT, DT == kF16>(words[p], ps, valid1, chunks);
    const bool staged = 2 * (pair - (threadIdx.x & 31) + 32) <= a.kb;  // the warp's 32 pairs, all whole
    store_values(a.v, a.ldv, true, chunks, row, pair, valid1, staged, s_stage);
  }
}

template <int DT, bool UNIT_OFFSET>
cudaError_t launch_norm(const NormArgs& a, int m, int threads, int pairs_per_thread, bool pdl, cudaStream_t stream) {
  const dim3 grid(m), block(threads);
  switch (pairs_per_thread) {
    case 1: return fp4c::launch(rms_norm_values_kernel<DT, 1, UNIT_OFFSET>, grid, block, 0, pdl, stream, a);
    case 2: return fp4c::launch(rms_norm_values_kernel<DT, 2, UNIT_OFFSET>, grid, block, 0, pdl, stream, a);
    default: return fp4c::launch(rms_norm_values_kernel<DT, 4, UNIT_OFFSET>, grid, block, 0, pdl, stream, a);
  }
}

template <int DT>
cudaError_t launch_norm(const NormArgs& a, int m, int threads, int pairs_per_thread, bool unit_offset, bool pdl,
                        cudaStream_t stream) {
  return unit_offset ? launch_norm<DT, true>(a, m, threads, pairs_per_thread, pdl, stream)
                     : launch_norm<DT, false>(a, m, threads, pairs_per_thread, pdl, stream);
}

}  // namespace

extern "C" {

// Returns a cudaError_t (0 = success).
//   x: [M, K] with row stride ldx (elements), last dim contiguous, 16-byte aligned rows;
//   x_dtype: 0 = float32, 1 = float16, 2 = bfloat16;
//   mode 0: q uint8 [M, K/2] (row stride ldq), s e4m3 [M, K/16] (row stride lds);
//   mode 1: q as mode 0, s the whole swizzled [round_up(M,128), round_up(K/16,4)] (padding zeroed);
//   mode 2: v [M, K] (row stride ldv elements) the block values e2m1 * sf, fp16 if v_fp16 else bf16
//     (q and s unused);
//   mode 3: q uint8 [M, Kc/2] in the GEMMs' word layout, s e4m3 [M, Kc/16] linear, Kc = round_up(K, 32):
//     every byte written (a missing last block: zero codes and scale), 2-byte aligned scale rows;
//   gs: device pointer to the float32 global scale (read on the device: graph-safe);
//   ctas_per_sm: the grid's CTAs per SM (1..16); each thread loops over the rows beyond that;
//   pdl: 1 = programmatic dependent launch (sm_90; grid_dependency.cuh), 2 = the same, and the kernel
//     after this one (it must wait for this grid's completion before it reads what this one writes, as
//     our GEMMs do) may launch once this one has waited for the kernel before, 0 = a plain launch.
int fp4c_nvfp4_quant(const void* x, int64_t ldx, int x_dtype, void* q, int64_t ldq, void* s, int64_t lds,
                     void* v, int64_t ldv, int v_fp16, const float* gs, int M, int K, int mode, int ctas_per_sm,
                     int pdl, cudaStream_t stream) {
  if (M < 0 || K < 0 || K % 16 || mode < 0 || mode > kModeKernelCodes || x_dtype < 0 || x_dtype > 2 ||
      ctas_per_sm < 1 || ctas_per_sm > 16 || pdl < 0 || pdl > 2) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  Args a{};
  a.x = x;
  a.ldx = ldx;
  a.q = static_cast<uint8_t*>(q);
  a.ldq = ldq;
  a.s = static_cast<uint8_t*>(s);
  a.lds = lds;
  a.gs = gs;
  a.m = M;
  a.kb = K / 16;
  a.kbp = (a.kb + 3) / 4 * 4;
  if (mode == kModeSwizzled) {
    a.mg = (M + 127) / 128 * 128;
    a.pg = a.kbp / 2;
  } else {
    a.mg = M;
    a.pg = (a.kb + 1) / 2;
  }
  if (a.mg == 0 || a.pg == 0) return static_cast<int>(cudaSuccess);
  a.q16 = (ldq % 16 == 0) && (reinterpret_cast<uintptr_t>(q) % 16 == 0);
  a.v = v;
  a.ldv = ldv;
  a.v16 = (ldv % 8 == 0) && (reinterpret_cast<uintptr_t>(v) % 16 == 0);
  a.early = pdl == 2;
  // Threads along a row: a power of two (the row index is a shift), 32..256 of them chosen to waste
  // the fewest threads past the row's end (K = 14336: 448 pairs = 7 x 64), fewer for short rows.
  int log_tx = 0;
  while ((1 << log_tx) < a.pg && log_tx < 5) ++log_tx;
  if (a.pg > 32) {
    int64_t best = -1;
    for (int l = 8; l >= 5; --l) {
      const int64_t t = 1 << l, waste = (a.pg + t - 1) / t * t - a.pg;
      if (best < 0 || waste < best) {
        best = waste;
        log_tx = l;
      }
    }
  }
  a.log_tx = log_tx;
  const int tx = 1 << log_tx, ty = kThreads / tx;
  const int64_t gx = (a.pg + tx - 1) / tx;
  const int64_t rows = (a.mg + ty - 1) / ty;
  // ctas_per_sm CTAs per SM (their loads keep HBM busy), each thread looping over the rows beyond that,
  // so the per-CTA out_scale table is amortized.
  const int sms = fp4c::sm_count();
  const int64_t cap = static_cast<int64_t>(ctas_per_sm) * (sms > 0 ? sms : 132);
  int64_t gy = gx >= cap ? 1 : (cap + gx - 1) / gx;
  if (gy > rows) gy = rows;
  if (gy > 65535) gy = 65535;
  if (gx > 0x7FFFFFFF) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const bool one_row = a.mg <= gy * ty;
  cudaError_t err;
  switch (x_dtype) {
    case kF32: err = launch_mode<kF32>(a, mode, v_fp16 != 0, one_row, grid, pdl != 0, stream); break;
    case kF16: err = launch_mode<kF16>(a, mode, v_fp16 != 0, one_row, grid, pdl != 0, stream); break;
    default: err = launch_mode<kBF16>(a, mode, v_fp16 != 0, one_row, grid, pdl != 0, stream); break;
  }
  return static_cast<int>(err);
}

// fp4::rms_norm_quantize on 16-bit rows; returns a cudaError_t (0 = success).
//   x [M, K] (row stride ldx elements), residual [M, K] (ldr; null: none), w [K]: dtype 1 = float16,
//   2 = bfloat16 (the block values and the sum in the same dtype), 16-byte aligned rows and w;
//   sum [M, K] (ldsum): x + residual, written where residual is given; v [M, K] (ldv): the block values
//   of the normalized rows; K a multiple of 16, at most 32768;
//   gs: device pointer to the float32 global scale;
//   unit_offset: 1 = Gemma's norm (times 1 + w in float32, rounded once), 0 = Llama's;
//   pdl: 0 = a plain launch, 1 = programmatic dependent launch, 2 = the same, and the kernel after this
//     one may launch once this one has waited for the one before (as the Triton kernel's TRIGGER).
int fp4c_rms_norm_values(const void* x, int64_t ldx, const void* residual, int64_t ldr, const void* w, void* sum,
                         int64_t ldsum, void* v, int64_t ldv, int dtype, const float* gs, float eps, int M, int K,
                         int unit_offset, int pdl, cudaStream_t stream) {
  constexpr int kMaxPairsPerThread = 4;
  if (M < 0 || K < 0 || K % 16 || K > 32 * kThreads * kMaxPairsPerThread || (dtype != kF16 && dtype != kBF16) ||
      unit_offset < 0 || unit_offset > 1 || pdl < 0 || pdl > 2) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (M == 0 || K == 0) return static_cast<int>(cudaSuccess);
  NormArgs a{x, ldx, residual, ldr, w, sum, ldsum, v, ldv, gs, eps, K, K / 16, (K / 16 + 1) / 2, pdl == 2};
  const int threads = a.pg >= kThreads ? kThreads : (a.pg + 31) / 32 * 32;
  const int per_thread = (a.pg + threads - 1) / threads;
  const int p = per_thread <= 1 ? 1 : per_thread <= 2 ? 2 : 4;
  const cudaError_t err = dtype == kF16 ? launch_norm<kF16>(a, M, threads, p, unit_offset != 0, pdl != 0, stream)
                                        : launch_norm<kBF16>(a, M, threads, p, unit_offset != 0, pdl != 0, stream);
  return static_cast<int>(err);
}

}  // extern "C"
