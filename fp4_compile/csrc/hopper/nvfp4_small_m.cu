// NVFP4 weight x 16-bit activation GEMM for decode-sized M (1..16) on sm_89/sm_90.
//
//   out[m, n] = alpha * 2^8 * sum_k x[m, k] * (e2m1[n, k] * sf[n, k/16] * 2^-8)  (+ bias[n])
//
// Exact: the weight values e2m1 * sf are built in registers (exact in bf16 and fp16), products
// are exact in the tensor core, sums in fp32. Fed the activation block values of an NVFP4
// quantization (exact in bf16/fp16), it is the W4A4 product; fed bf16/fp16 activations, W4A16.
// W4A4 can also take the activations as NVFP4 codes in the weights' word layout with linear
// scales (nvfp4_quant.cu mode 3), decoded like the weights: 0.5625 bytes per activation instead of
// 2, which matters at M = 9..16, where every CTA reads all M x K activations from L2.
//
// Weight layout (shared with the Triton kernels, see ops/weight_layout.py): uint8
// [Np, Kp/2] rows, each 16-byte chunk (32 k) holding in word w (0..3) the k-columns
// {2w, 2w+1} + {0, 8, 16, 24}; scales e4m3 [Np, Kp/16], so a chunk's two scales are one
// 16-bit load; both tiled (fp4c::tiled_row): a 16-row tile's 256-k row pieces are contiguous, so the
// 16 rows a warp reads per 128-k group lie in one 2 KB block.
//
// Why not the Triton kernel's structure at small M: there each k-step is a dependent chain
// (shared-memory load -> decode -> wgmma -> wait) of one warpgroup, at 2 CTAs/SM (ncu: 12.5%
// occupancy, 48% of DRAM bandwidth). Here every warp streams its own k-range straight from
// global memory into registers (16-byte loads, PF k-groups ahead), decodes with 5 ALU ops per
// pair of weights, and issues synchronous mma.m16n8k16; the warps of a CTA split K and reduce
// through shared memory once at the end. On an H100 at M=1 this reads the weights about as fast
// as a torch row reduction reads the same bytes (benchmarks/NOTES.md, v4); rings with more bytes in
// flight (cp.async, v15a; TMA bulk copies, v44a) measured slower: at M = 1 on an H100 the kernel's
// decode alone, with every load an L1 hit, takes as long as the whole call (v44b).
//
// The m16n8k16 k-order is free as long as A and B agree, so lane t of a quad owns a whole
// 16-byte chunk (chunk 4s + t of k-group s) instead of one word of each: one 128-bit load per
// row per 32 weights, one scale pair per 32 weights, and the activation pairs it needs are the
// 32-bit words of four 128-bit loads of the same 32 k.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "grid_dependency.cuh"
#include "nvfp4_decode.cuh"

namespace {

using fp4c::Convert;
using fp4c::ScalePair;
using fp4c::decode_word;
using fp4c::make_scales;
using fp4c::wait_for_prior_grid;

constexpr int kWarpSize = 32;

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
// BEFORE_WAIT: volatile, so that the load stays where the program puts it (before wait_for_prior_grid).
#define FP4C_WEIGHT_CHUNK_LOAD "ld.global.nc.L1::no_allocate" FP4C_PREFETCH_QUALIFIER ".v4.u32 {%0,%1,%2,%3}, [%4];"
template <bool BEFORE_WAIT = false>
__device__ __forceinline__ uint4 load_weight_chunk(const void* p) {
  uint4 v;
  if constexpr (BEFORE_WAIT) {
    asm volatile(FP4C_WEIGHT_CHUNK_LOAD : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else {
    asm(FP4C_WEIGHT_CHUNK_LOAD : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  }
  return v;
}

// A lane's weight scale pair is 2 of the 8 bytes per row that its quad reads per k-group; kept in L1,
// the next three groups' pairs come from the same 32-byte sector. (The activations, which every CTA
// re-reads from L1/L2, and their scales: fp4c::coherent_load_*, grid_dependency.cuh.)
#define FP4C_WEIGHT_SCALE_LOAD "ld.global.nc.u16 %0, [%1];"
template <bool BEFORE_WAIT = false>
__device__ __forceinline__ uint32_t load_weight_scale_pair(const void* p) {
  unsigned short v;
  if constexpr (BEFORE_WAIT) {
    asm volatile(FP4C_WEIGHT_SCALE_LOAD : "=h"(v) : "l"(p));
  } else {
    asm(FP4C_WEIGHT_SCALE_LOAD : "=h"(v) : "l"(p));
  }
  return v;
}

template <int RT, int NT, bool A4>
struct Stage {
  uint4 w[RT][2];          // rows g and g + 8 of each 16-row tile: the 16-byte chunk of this lane
  uint32_t sc[RT][2];      // their two scale bytes
  uint4 x[NT][A4 ? 1 : 4];  // activation column of this lane, the same 32 k: 4 x 8 values, or 32 codes
  uint32_t xsc[NT];        // A4: the codes' two scale bytes
};

struct Args {
  const uint16_t* x;     // [M, K] bf16/fp16 bits, row stride ldx elements; A4: codes [M, Kc/2], ldx bytes
                         // (typed: as void*, the unsplit kernel's SASS changed and ran 1-4% slower)
  const uint8_t* w;      // [Np, Kp/2]
  const uint8_t* ws;     // [Np, Kp/16]
  void* out;             // [M, N] OutT, row stride ldo
  const void* bias;      // [N] OutT or null
  const float* alpha;    // one element
  int64_t ldx, ldw, ldws, ldo;
  int M, N, K, chunks;   // chunks = Kp / 32
  const uint8_t* xs;     // A4: e4m3 [M, Kc/16], row stride ldxs (Kc = K rounded up to 32)
  int64_t ldxs;
  int weights_before_wait;  // the C entry's pdl 2: launch the EARLY instance where there is one
};

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

template <typename T>
__device__ __forceinline__ float rounded(float v) { return Convert<T>::from(Convert<T>::to(v)); }

// One CTA's work: weight rows [16*RT*tile, 16*RT*(tile + 1)). Block: WARPS warps, each a slice of
// the k-groups (4 chunks = 128 k per group). NT n8-tiles of the MMA cover M <= 8 * NT. A4:
// activation codes. GATED (RT = 1; `up` the second GEMM of the same activations): rows g of the
// tile are rows [8*tile, 8*tile + 8) of args' weight (the gate), rows g + 8 the same rows of up's,
// and the CTA writes silu(gate) * up for those 8 outputs: the SiLU*mul after a gate/up projection
// costs no kernel of its own, and gate and up never leave the CTA. EARLY: the first stages' weight
// loads come before wait_for_prior_grid (only where the host says that they may: the C entry's pdl 2).
template <bool FP16, int RT, int NT, int PF, typename OutT, bool A4, bool GATED = false, bool EARLY = false>
__device__ __forceinline__ void small_m_tile(const Args& args, int tile, const Args* up = nullptr) {
  static_assert(!GATED || RT == 1, "a gated tile is 8 gate rows and their 8 up rows");
  extern __shared__ float reduce_smem[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int row0 = tile * (GATED ? 8 : 16 * RT);

  const int groups = (args.chunks + 3) / 4;
  const int gb = static_cast<int>(static_cast<int64_t>(groups) * warp / warps);
  const int ge = static_cast<int>(static_cast<int64_t>(groups) * (warp + 1) / warps);

  // With one n8-tile the MMAs of a group are one dependent chain per accumulator: the two MMAs of
  // each step go to two accumulator sets (summed after the loop), which halves the chain. H100,
  // M = 1, A/B in one process (NOTES.md v24c): 0.95-0.97x the time at 28672x4096, 14336x4096 and
  // 6144x4096, 0.98-0.99x at N <= 4096; with two n-tiles (two chains already) 1.01-1.03x (slower).
  // Not on activation codes: there the extra registers (78 -> 110) cost CTAs per SM.
  constexpr int kSets = NT == 1 && !A4 ? 2 : 1;
  float accs[kSets][RT][NT][4];
#pragma unroll
  for (int a = 0; a < kSets; ++a)
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) accs[a][i][j][e] = 0.f;

  // Per-lane base pointers; group s adds 64 weight bytes, 8 scale bytes and 128 activations.
  const uint8_t* w_row[RT][2];
  const uint8_t* s_row[RT][2];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const Args& src = GATED && h == 1 ? *up : args;
      const int64_t r = GATED ? row0 + g : row0 + 16 * i + 8 * h + g;
      w_row[i][h] = src.w + fp4c::tiled_row(r, src.ldw, 128) + 16 * t;
      s_row[i][h] = src.ws + fp4c::tiled_row(r, src.ldws, 16) + 2 * t;
    }
  const uint16_t* x_col[NT];  // (A4: codes, 16 bytes per chunk)
  const uint8_t* xs_col[NT];
  bool x_ok[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int m = 8 * j + g;
    x_ok[j] = m < args.M;
    if constexpr (A4) {
      const int64_t row = x_ok[j] ? m : 0;
      x_col[j] = reinterpret_cast<const uint16_t*>(reinterpret_cast<const uint8_t*>(args.x) + row * args.ldx + 16 * t);
      xs_col[j] = args.xs + row * args.ldxs + 2 * t;
    } else {
      x_col[j] = args.x + (x_ok[j] ? m : 0) * args.ldx + 32 * t;
    }
  }

  // before_wait (std::true_type): the loads stay before wait_for_prior_grid.
  auto load_weights = [&](Stage<RT, NT, A4>& st, int group, auto before_wait) {
    constexpr bool kBeforeWait = decltype(before_wait)::value;
    const bool ok = group < ge && 4 * group + t < args.chunks;
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        st.w[i][h] = ok ? load_weight_chunk<kBeforeWait>(w_row[i][h] + fp4c::tiled_group(group, 64))
                        : make_uint4(0, 0, 0, 0);
        st.sc[i][h] = ok ? load_weight_scale_pair<kBeforeWait>(s_row[i][h] + fp4c::tiled_group(group, 8)) : 0u;
      }
  };
  auto load_activations = [&](Stage<RT, NT, A4>& st, int group) {
    const bool ok = group < ge && 4 * group + t < args.chunks;
    const int k_left = args.K - 32 * (4 * group + t);  // activations of this chunk that exist
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if constexpr (A4) {  // a chunk half past K holds zero codes and scale (nvfp4_quant.cu mode 3)
        const bool in = ok && x_ok[j] && k_left > 0;
        st.x[j][0] = in ? fp4c::coherent_load_v4(x_col[j] + 32 * group) : make_uint4(0, 0, 0, 0);
        st.xsc[j] = in ? fp4c::coherent_load_u16(xs_col[j] + 8 * group) : 0u;
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          st.x[j][q] = (ok && x_ok[j] && 8 * q < k_left) ? fp4c::coherent_load_v4(x_col[j] + 128 * group + 8 * q)
                                                            : make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto load = [&](Stage<RT, NT, A4>& st, int group) {
    load_weights(st, group, std::false_type{});
    load_activations(st, group);
  };

  // MMA step (q, p): k-slot "lo" = pair q of word 2p, "hi" = pair q of word 2p + 1, so that the
  // two B registers are adjacent words of one activation load (no register moves); decoded
  // activation codes give the same pairs: word w's r[q] holds k = 8q + 2w + {0, 1}.
  auto compute = [&](const Stage<RT, NT, A4>& st) {
    uint32_t xd[A4 ? NT : 1][4][4];  // A4: decoded activations, the B registers [n-tile][word][pair]
    if constexpr (A4) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const ScalePair<FP16> xs = make_scales<FP16>(st.xsc[j]);
        decode_word<FP16>(st.x[j][0].x, xs, xd[j][0]);
        decode_word<FP16>(st.x[j][0].y, xs, xd[j][1]);
        decode_word<FP16>(st.x[j][0].z, xs, xd[j][2]);
        decode_word<FP16>(st.x[j][0].w, xs, xd[j][3]);
      }
    }
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const ScalePair<FP16> s0 = make_scales<FP16>(st.sc[i][0]);
      const ScalePair<FP16> s1 = make_scales<FP16>(st.sc[i][1]);
      uint32_t r0[4][4], r1[4][4];  // [word][pair] of rows g and g + 8
      decode_word<FP16>(st.w[i][0].x, s0, r0[0]);
      decode_word<FP16>(st.w[i][0].y, s0, r0[1]);
      decode_word<FP16>(st.w[i][0].z, s0, r0[2]);
      decode_word<FP16>(st.w[i][0].w, s0, r0[3]);
      decode_word<FP16>(st.w[i][1].x, s1, r1[0]);
      decode_word<FP16>(st.w[i][1].y, s1, r1[1]);
      decode_word<FP16>(st.w[i][1].z, s1, r1[2]);
      decode_word<FP16>(st.w[i][1].w, s1, r1[3]);
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if constexpr (A4) {
            mma16816<FP16>(accs[0][i][j], r0[0][q], r1[0][q], r0[1][q], r1[1][q], xd[j][0][q], xd[j][1][q]);
            mma16816<FP16>(accs[kSets - 1][i][j], r0[2][q], r1[2][q], r0[3][q], r1[3][q], xd[j][2][q], xd[j][3][q]);
          } else {
            const uint4& xq = st.x[j][q];
            mma16816<FP16>(accs[0][i][j], r0[0][q], r1[0][q], r0[1][q], r1[1][q], xq.x, xq.y);
            mma16816<FP16>(accs[kSets - 1][i][j], r0[2][q], r1[2][q], r0[3][q], r1[3][q], xq.z, xq.w);
          }
        }
    }
  };

  // EARLY: the weights' first stages are in flight while the kernel before finishes. The host asks for it
  // only where that kernel is our activation quantization, which let this grid launch only once the kernels
  // before it had completed, so no kernel still running writes the weights. (The wait must follow those
  // loads in a basic block of its own: ptxas moves it to the top of its block, above the loads before it
  // there, as it did in NOTES.md v9b's test, which measured no gain; SASS checked.)
  Stage<RT, NT, A4> buf[PF];
  if constexpr (EARLY) {
    if (ge > gb) {
#pragma unroll
      for (int p = 0; p < PF; ++p) load_weights(buf[p], gb + p, std::true_type{});
    }
    wait_for_prior_grid();
#pragma unroll
    for (int p = 0; p < PF; ++p) load_activations(buf[p], gb + p);
  } else {
    wait_for_prior_grid();
#pragma unroll
    for (int p = 0; p < PF; ++p) load(buf[p], gb + p);
  }
  for (int s = gb; s < ge; s += PF) {
#pragma unroll
    for (int p = 0; p < PF; ++p) {
      if (s + p < ge) compute(buf[p]);
      load(buf[p], s + p + PF);
    }
  }

  // reduce the warps' partial sums: smem [warps][8 * NT cols][16 * RT rows]
  constexpr int kRows = 16 * RT, kCols = 8 * NT;
  float* mine = reduce_smem + warp * kRows * kCols;
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 16 * i + g + 8 * (e / 2);
        const int col = 8 * j + 2 * t + (e % 2);
        mine[col * kRows + r] = kSets == 1 ? accs[0][i][j][e] : accs[0][i][j][e] + accs[kSets - 1][i][j][e];
      }
  __syncthreads();

  // the 2^-8 of the decoded weight values (and of the decoded activations)
  const float scale = fp4c::coherent_load_f32(args.alpha) * (A4 ? 65536.f : 256.f);
  OutT* out = static_cast<OutT*>(args.out);
  const OutT* bias = static_cast<const OutT*>(args.bias);
  const int m_tile = args.M < kCols ? args.M : kCols;
  if constexpr (GATED) {
    // gate and up each rounded to the output type, as the two linears would return them; silu(gate)
    // rounded too, as torch computes F.silu(gate) * up (opmath float, one rounding per op)
    const float up_scale = fp4c::coherent_load_f32(up->alpha) * (A4 ? 65536.f : 256.f);
    const OutT* up_bias = static_cast<const OutT*>(up->bias);
    for (int e = threadIdx.x; e < m_tile * 8; e += blockDim.x) {
      const int col = e / 8, r = e % 8;
      const int n = row0 + r;
      if (n >= args.N) continue;
      float vg = 0.f, vu = 0.f;
      for (int wp = 0; wp < warps; ++wp) {
        vg += reduce_smem[(wp * kCols + col) * kRows + r];
        vu += reduce_smem[(wp * kCols + col) * kRows + r + 8];
      }
      vg *= scale;
      vu *= up_scale;
      if (bias != nullptr) vg += Convert<OutT>::from(bias[n]);
      if (up_bias != nullptr) vu += Convert<OutT>::from(up_bias[n]);
      const float act = rounded<OutT>(silu(rounded<OutT>(vg)));
      out[static_cast<int64_t>(col) * args.ldo + n] = Convert<OutT>::to(act * rounded<OutT>(vu));
    }
  } else {
    for (int e = threadIdx.x; e < m_tile * kRows; e += blockDim.x) {
      const int col = e / kRows, r = e % kRows;
      const int n = row0 + r;
      if (n >= args.N) continue;
      float v = 0.f;
      for (int wp = 0; wp < warps; ++wp) v += reduce_smem[(wp * kCols + col) * kRows + r];
      v *= scale;
      if (bias != nullptr) v += Convert<OutT>::from(bias[n]);
      out[static_cast<int64_t>(col) * args.ldo + n] = Convert<OutT>::to(v);
    }
  }
}

// Grid: one CTA per 16*RT weight rows.
template <bool FP16, int RT, int NT, int PF, typename OutT, bool A4, bool EARLY = false>
__global__ void __launch_bounds__(256) nvfp4_small_m_kernel(const Args args) {
  small_m_tile<FP16, RT, NT, PF, OutT, A4, false, EARLY>(args, blockIdx.x);
}

// Several GEMMs of the same activations (a layer's q/k/v or gate/up projections) in one launch:
// member i takes CTAs [first_cta[i], first_cta[i + 1]). One launch instead of one per member saves
// each member's launch, ramp and tail (several us each at decode sizes).
constexpr int kMaxGroup = 4;
struct GroupArgs {
  Args member[kMaxGroup];
  int first_cta[kMaxGroup + 1];
  int count;
};

template <bool FP16, int RT, int NT, int PF, typename OutT, bool A4>
__global__ void __launch_bounds__(256) nvfp4_small_m_group_kernel(const __grid_constant__ GroupArgs group) {
  int i = 0;
  while (i + 1 < group.count && static_cast<int>(blockIdx.x) >= group.first_cta[i + 1]) ++i;
  small_m_tile<FP16, RT, NT, PF, OutT, A4>(group.member[i], blockIdx.x - group.first_cta[i]);
}

// silu(x W_gate^T) * (x W_up^T) in one launch (GATED above): one CTA per 8 outputs.
struct GatedArgs {
  Args gate, up;  // the same activations, M, N and K
};

// (On codes at one n-tile ptxas otherwise took 113 registers where the ungated kernel takes 78; room for
// 3 CTAs of 256 threads gives 62, no spills, 34.3 us against 35.2 on gate/up at M=8: NOTES.md v22c.)
template <bool FP16, int NT, typename OutT, bool A4>
__global__ void __launch_bounds__(256, A4 && NT == 1 ? 3 : 1)
    nvfp4_small_m_gated_kernel(const __grid_constant__ GatedArgs pair) {
  small_m_tile<FP16, 1, NT, 2, OutT, A4, true>(pair.gate, blockIdx.x, &pair.up);
}

// Dynamic shared memory of small_m_tile: the warps' partial sums, [warps][8 * n_tiles cols][rows].
inline size_t reduce_smem_bytes(int warps, int rows, int n_tiles) {
  return static_cast<size_t>(warps) * rows * 8 * n_tiles * sizeof(float);
}

// W4A4 on codes at M = 9..16 has an EARLY instance: there, right after the quantization kernel, it measured
// 0.94-0.99x the time (H100, 4096x4096, 6144x4096, 4096x14336 at M=16); at M=8 on codes 1.02x and at M=1 on
// block values behind the Triton quantization 1.01-1.02x (benchmarks/NOTES.md v31), so not there.
template <bool FP16, int RT, int NT, int PF, typename OutT, bool A4 = false>
cudaError_t launch(const Args& args, int warps, bool pdl, cudaStream_t stream) {
  const int rows = 16 * RT;
  const dim3 grid((args.N + rows - 1) / rows), block(warps * kWarpSize);
  const size_t smem = reduce_smem_bytes(warps, rows, NT);
  if constexpr (A4 && NT == 2) {
    if (args.weights_before_wait) {
      return fp4c::launch(nvfp4_small_m_kernel<FP16, RT, NT, PF, OutT, A4, true>, grid, block, smem, pdl, stream,
                          args);
    }
  }
  return fp4c::launch(nvfp4_small_m_kernel<FP16, RT, NT, PF, OutT, A4>, grid, block, smem, pdl, stream, args);
}

template <bool FP16, int RT, int NT, typename OutT>
cudaError_t dispatch_stages(const Args& args, int stages, int warps, bool pdl, cudaStream_t stream) {
  if (stages == 2) return launch<FP16, RT, NT, 2, OutT>(args, warps, pdl, stream);
  if constexpr (NT == 1) {  // four stages of two n-tiles would spill
    if (stages == 4) return launch<FP16, RT, NT, 4, OutT>(args, warps, pdl, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool FP16, typename OutT>
cudaError_t dispatch_tiles(const Args& args, int rt, int stages, int warps, bool pdl, cudaStream_t stream) {
  const bool two_n = args.M > 8;
  if (args.xs != nullptr) {  // activation codes: one configuration, 16 rows per warp, 2 stages
    if (rt != 1 || stages != 2) return cudaErrorInvalidValue;
    return two_n ? launch<FP16, 1, 2, 2, OutT, true>(args, warps, pdl, stream)
                 : launch<FP16, 1, 1, 2, OutT, true>(args, warps, pdl, stream);
  }
  if (rt == 1) {
    return two_n ? dispatch_stages<FP16, 1, 2, OutT>(args, stages, warps, pdl, stream)
                 : dispatch_stages<FP16, 1, 1, OutT>(args, stages, warps, pdl, stream);
  }
  if (rt == 2) {
    return two_n ? dispatch_stages<FP16, 2, 2, OutT>(args, stages, warps, pdl, stream)
                 : dispatch_stages<FP16, 2, 1, OutT>(args, stages, warps, pdl, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool FP16, typename OutT, bool A4>
cudaError_t launch_group(const GroupArgs& group, int warps, bool pdl, cudaStream_t stream) {
  const dim3 grid(group.first_cta[group.count]), block(warps * kWarpSize);
  const bool two_n = group.member[0].M > 8;
  const size_t smem = reduce_smem_bytes(warps, 16, two_n ? 2 : 1);
  return two_n
             ? fp4c::launch(nvfp4_small_m_group_kernel<FP16, 1, 2, 2, OutT, A4>, grid, block, smem, pdl, stream, group)
             : fp4c::launch(nvfp4_small_m_group_kernel<FP16, 1, 1, 2, OutT, A4>, grid, block, smem, pdl, stream, group);
}

template <bool FP16, typename OutT, bool A4>
cudaError_t launch_gated(const GatedArgs& pair, int warps, bool pdl, cudaStream_t stream) {
  const dim3 grid((pair.gate.N + 7) / 8), block(warps * kWarpSize);
  const bool two_n = pair.gate.M > 8;
  const size_t smem = reduce_smem_bytes(warps, 16, two_n ? 2 : 1);
  return two_n ? fp4c::launch(nvfp4_small_m_gated_kernel<FP16, 2, OutT, A4>, grid, block, smem, pdl, stream, pair)
               : fp4c::launch(nvfp4_small_m_gated_kernel<FP16, 1, OutT, A4>, grid, block, smem, pdl, stream, pair);
}

// count 2 with `gated`: the gated launch of member 0 (gate) and member 1 (up).
template <bool FP16, typename OutT>
cudaError_t launch_group(const GroupArgs& group, bool gated, int warps, bool pdl, cudaStream_t stream) {
  const bool a4 = group.member[0].xs != nullptr;
  if (gated) {
    const GatedArgs pair{group.member[0], group.member[1]};
    return a4 ? launch_gated<FP16, OutT, true>(pair, warps, pdl, stream)
              : launch_gated<FP16, OutT, false>(pair, warps, pdl, stream);
  }
  return a4 ? launch_group<FP16, OutT, true>(group, warps, pdl, stream)
            : launch_group<FP16, OutT, false>(group, warps, pdl, stream);
}

// The kernel's 16-byte weight loads and 2-byte scale-pair loads fault on misaligned bases.
bool weights_aligned(const void* w, const void* ws) {
  return reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(ws) % 2 == 0;
}

}  // namespace

extern "C" {

// Returns a cudaError_t (0 = success). x_fp16: 1 if x is fp16, 0 if bf16. out_fp32: 0 = output in
// x's type, 1 = float32. xs non-null: x holds W4A4 activation codes (uint8 [M, Kc/2] in the weight
// word layout, row stride ldx bytes; a chunk half past K zero) with e4m3 scales xs [M, Kc/16] (row
// stride ldxs), and x_fp16 picks the MMA operand type, also the output's unless out_fp32 (then bf16);
// rows_per_warp 16, stages 2. rows_per_warp: 16 or 32 (the weight rows, padded to 32, must cover N
// rounded up to it). stages: 2, or 4 for M <= 8: k-groups of loads in flight per warp. warps: 1..8.
// pdl: 1 = programmatic dependent launch (sm_90), 0 = a plain launch, 2 = the former, and the kernel
// launched just before is one that let this grid launch only after the kernels before it had completed (our
// quantization kernels' early trigger comes after their own wait), so that the weights are final and their
// first loads may precede the wait for it (on activation codes at M > 8; elsewhere as 1). The weight is tiled
// (ops/weight_layout.py): Kp a multiple of 256, ldw = Kp / 2 and ldws = Kp / 16; w 16-byte and ws 2-byte aligned.
int fp4c_nvfp4_small_m_gemm(const void* x, int64_t ldx, const void* xs, int64_t ldxs, const void* w, int64_t ldw,
                            const void* ws, int64_t ldws, void* out, int64_t ldo, const void* bias, const float* alpha,
                            int M, int N, int K, int Kp, int x_fp16, int out_fp32, int rows_per_warp, int stages,
                            int warps, int pdl, cudaStream_t stream) {
  if (M < 1 || M > 16 || N < 1 || K < 16 || K % 16 || Kp % 256 || K > Kp || ldw != Kp / 2 || ldws != Kp / 16 ||
      !weights_aligned(w, ws) || warps < 1 || warps > 8 || pdl < 0 || pdl > 2) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  Args args{static_cast<const uint16_t*>(x), static_cast<const uint8_t*>(w), static_cast<const uint8_t*>(ws), out,
            bias, alpha, ldx, ldw, ldws, ldo, M, N, K, Kp / 32, static_cast<const uint8_t*>(xs), ldxs, pdl == 2};
  const int rt = rows_per_warp / 16;
  cudaError_t err;
  if (x_fp16) {
    err = out_fp32 ? dispatch_tiles<true, float>(args, rt, stages, warps, pdl != 0, stream)
                   : dispatch_tiles<true, __half>(args, rt, stages, warps, pdl != 0, stream);
  } else {
    err = out_fp32 ? dispatch_tiles<false, float>(args, rt, stages, warps, pdl != 0, stream)
                   : dispatch_tiles<false, __nv_bfloat16>(args, rt, stages, warps, pdl != 0, stream);
  }
  return static_cast<int>(err);
}

// The GEMMs of `count` (2..4) weights with the same M, K and activation dtype, each on its own
// activations, in one launch (16 rows per warp, 2 stages). `members`: count rows of 13 int64 each,
// {x, ldx, w, ldw, ws, ldws, out, ldo, bias (0: none), alpha, N, xs, ldxs}, as in fp4c_nvfp4_small_m_gemm:
// block values or bf16/fp16 activations (xs 0 in every row), or activation codes (xs set in every row).
// gated 1 (count 2, one activation tensor and N for both): out of row 0 = silu(GEMM 0) * GEMM 1, each
// GEMM's result rounded to the output type first (row 1's out unused).
int fp4c_nvfp4_small_m_gemm_group(int count, const int64_t* members, int M, int K, int Kp, int x_fp16,
                                  int out_fp32, int gated, int warps, int pdl, cudaStream_t stream) {
  if (count < 2 || count > kMaxGroup || M < 1 || M > 16 || K < 16 || K % 16 || Kp % 256 || K > Kp || warps < 1 ||
      warps > 8 || pdl < 0 || pdl > 1 || gated < 0 || gated > 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (gated && (count != 2 || members[0] != members[13] || members[10] != members[23] ||
                members[11] != members[24] || members[1] != members[14] || members[12] != members[25])) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  GroupArgs group{};
  group.count = count;
  group.first_cta[0] = 0;
  for (int i = 0; i < count; ++i) {
    const int64_t* f = members + 13 * i;
    const int n = static_cast<int>(f[10]);
    if (n < 1 || (f[11] != 0) != (members[11] != 0) || f[3] != Kp / 2 || f[5] != Kp / 16 ||
        !weights_aligned(reinterpret_cast<const void*>(f[2]), reinterpret_cast<const void*>(f[4]))) {
      return static_cast<int>(cudaErrorInvalidValue);
    }
    group.member[i] = Args{reinterpret_cast<const uint16_t*>(f[0]), reinterpret_cast<const uint8_t*>(f[2]),
                           reinterpret_cast<const uint8_t*>(f[4]), reinterpret_cast<void*>(f[6]),
                           reinterpret_cast<const void*>(f[8]), reinterpret_cast<const float*>(f[9]), f[1], f[3],
                           f[5], f[7], M, n, K, Kp / 32, reinterpret_cast<const uint8_t*>(f[11]), f[12], 0};
    group.first_cta[i + 1] = group.first_cta[i] + (n + 15) / 16;
  }
  cudaError_t err;
  if (x_fp16) {
    err = out_fp32 ? launch_group<true, float>(group, gated != 0, warps, pdl != 0, stream)
                   : launch_group<true, __half>(group, gated != 0, warps, pdl != 0, stream);
  } else {
    err = out_fp32 ? launch_group<false, float>(group, gated != 0, warps, pdl != 0, stream)
                   : launch_group<false, __nv_bfloat16>(group, gated != 0, warps, pdl != 0, stream);
  }
  return static_cast<int>(err);
}

}  // extern "C"
