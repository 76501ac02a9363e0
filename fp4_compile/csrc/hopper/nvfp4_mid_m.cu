// NVFP4 weight x 16-bit activation GEMM for mid-sized M (9..128) on sm_89/sm_90.
//
//   out[m, n] = alpha * 2^8 * sum_k x[m, k] * (e2m1[n, k] * sf[n, k/16] * 2^-8)  (+ bias[n])
//
// Same numerics, weight layout and k-order as nvfp4_small_m.cu (exact values in registers, exact
// products, fp32 sums). What changes with M: the small-M kernel re-reads the activations from
// L2 for every 16 weight rows, which at M = 16 moves 3.5x the weight bytes through L2 (NOTES.md,
// v5). Here a CTA owns WARPS x 16 x RT weight rows and one M tile of 8 x NT activation rows, so
// each activation tile is fetched once per 128+ weight rows:
// - activations: global -> shared memory with cp.async, STAGES k-groups (128 k) in flight, read
//   back with 128-bit loads in the lane-owns-a-chunk k-order of the weights (a 16-byte unit
//   swizzle makes those reads conflict-free);
// - weights: every warp streams its own 16-row tiles straight into registers (16-byte loads, PF
//   k-groups ahead), as in the small-M kernel, decoded per MMA k-step;
// - K is split across CTAs (grid.y) so that N = 4096 fills the SMs: fp32 partials go to a
//   workspace and the last CTA of each tile (an atomic ticket, reset by that CTA) adds them in
//   split order, so the result does not depend on timing, and applies alpha and bias.

#include <type_traits>

#include "nvfp4_mma.cuh"

namespace {

using namespace fp4c;

constexpr int kGroupK = 128;                  // k per group: 4 chunks of 32
constexpr int kUnitsPerRow = kGroupK / 8;     // 16-byte units of one activation row per group

struct Args {
  const uint16_t* x;     // [M, K] bf16/fp16 bits, row stride ldx elements (a multiple of 8)
  const uint8_t* w;      // [Np, Kp/2]
  const uint8_t* ws;     // [Np, Kp/16]
  void* out;             // [M, N] OutT, row stride ldo
  const void* bias;      // [N] OutT or null
  const float* alpha;    // one element
  float* partial;        // [splits, M, N] fp32 (splits > 1)
  int* tickets;          // one zeroed counter per (m tile, n tile) (splits > 1), left zeroed
  int64_t ldx, ldw, ldws, ldo;
  int M, N, Np, K, chunks, splits;  // chunks = Kp / 32
};

// Unit c (0..15) of activation row r of a group -> its 16-byte slot in shared memory. A lane
// (g, t) reads units 4t + q of rows g (+ 8j); the 8 lanes of a 128-bit load phase (two rows, four
// t) then hit 8 different bank groups.
__device__ __forceinline__ int act_slot(int r, int c) { return r * kUnitsPerRow + (c ^ (((c >> 3) & 1) << 1) ^ (r & 1)); }

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
// Weights are read once: ask L2 for 128 bytes of the row at a time (as the small-M kernel's loads).
__device__ __forceinline__ void cp_async16_stream(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// Grid: (n tiles of WARPS * 16 * RT rows, K splits, m tiles of 8 * NT rows). Block: WARPS warps,
// each its own 16 * RT weight rows over the CTA's whole k-range. Shared memory: STAGES k-groups,
// each the activation tile [8 NT][128 k] (swizzled units) then the weight tile [rows][64 bytes].
// Two CTAs per SM where the registers allow it without spills (ptxas -v, tests/test_cuda_small_m.py).
constexpr int min_ctas_per_sm(bool fp16, int rt, int nt) { return nt * rt >= 16 || (fp16 && nt * rt >= 8) ? 1 : 2; }

template <bool FP16, int RT, int NT, int WARPS, int STAGES, typename OutT>
__global__ void __launch_bounds__(WARPS * 32, min_ctas_per_sm(FP16, RT, NT)) nvfp4_mid_m_kernel(const Args args) {
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int kMt = 8 * NT;                        // activation rows per CTA
  constexpr int kRows = WARPS * 16 * RT;             // weight rows per CTA
  constexpr int kActBytes = kMt * kGroupK * 2;
  constexpr int kStageBytes = kActBytes + kRows * kGroupK / 2;
  constexpr int kPf = 3;                             // k-groups of scale loads in flight (registers)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * kRows, m0 = blockIdx.z * kMt;
  const int m_live = min(kMt, args.M - m0);          // activation rows of this tile that exist

  const int groups = (args.chunks + 3) / 4;
  const int gb = static_cast<int>(static_cast<int64_t>(groups) * blockIdx.y / args.splits);
  const int ge = static_cast<int>(static_cast<int64_t>(groups) * (blockIdx.y + 1) / args.splits);
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  auto stage_of = [&](int group) { return smem_base + ((group - gb) % STAGES) * kStageBytes; };

  // One k-group of both tiles, global -> shared (cp.async; zero-filled past M, K and the weight's
  // chunks), all threads, 16 bytes each per pass. A thread's units keep their k offset from group
  // to group and are a fixed number of rows apart, so their addresses are set up once here.
  // Weight rows past the padded weight are clamped: their sums are never stored.
  constexpr int kThreads = WARPS * 32;
  constexpr int kActPasses = kMt * kUnitsPerRow / kThreads, kActRowStep = kThreads / kUnitsPerRow;
  constexpr int kWPasses = kRows * 4 / kThreads, kWRowStep = kThreads / 4;
  static_assert(kMt * kUnitsPerRow % kThreads == 0 && kRows * 4 % kThreads == 0, "tile/thread mismatch");
  static_assert(kActRowStep % 2 == 0, "act_slot's row parity must be the same for all passes");
  const int act_r = threadIdx.x / kUnitsPerRow, act_c = threadIdx.x % kUnitsPerRow;
  const uint16_t* act_src = args.x + static_cast<int64_t>(m0 + min(act_r, m_live - 1)) * args.ldx + 8 * act_c;
  const uint32_t act_dst = 16 * act_slot(act_r, act_c);
  const int w_r = threadIdx.x / 4, w_c = threadIdx.x % 4;
  const uint8_t* w_src[kWPasses];
#pragma unroll
  for (int i = 0; i < kWPasses; ++i)
    w_src[i] = args.w + static_cast<int64_t>(min(n0 + w_r + i * kWRowStep, args.Np - 1)) * args.ldw + 16 * w_c;
  auto load_tiles = [&](int group) {
    if (group < ge) {
      const uint32_t stage = stage_of(group);
      const bool k_ok = kGroupK * group + 8 * act_c < args.K;
#pragma unroll
      for (int i = 0; i < kActPasses; ++i) {
        const bool valid = k_ok && act_r + i * kActRowStep < m_live;
        cp_async16(stage + act_dst + i * kActRowStep * kUnitsPerRow * 16,
                   act_src + (valid ? i * kActRowStep * args.ldx + kGroupK * group : 0), valid);
      }
      const bool chunk_ok = 4 * group + w_c < args.chunks;
#pragma unroll
      for (int i = 0; i < kWPasses; ++i)
        cp_async16_stream(stage + kActBytes + 16 * (threadIdx.x + i * kThreads), w_src[i] + 64 * group, chunk_ok);
    }
    cp_async_commit();  // (empty groups too: the wait count stays uniform)
  };

  // Scale pairs (2 bytes per lane and row) go straight to registers, kPf - 1 groups ahead (a
  // row's 8 bytes per group are too small and too unaligned for cp.async). Issued before the
  // compute of each step: one group of lead time measured slower than the cp.async ring.
  const uint8_t* s_row[RT][2];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = min(n0 + warp * 16 * RT + 16 * i + 8 * h + g, args.Np - 1);
      s_row[i][h] = args.ws + r * args.ldws + 2 * t;
    }
  auto load_scales = [&](uint32_t (&sc)[RT][2], int group) {
    const bool ok = group < ge && 4 * group + t < args.chunks;
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) sc[i][h] = ok ? load_u16_keep(s_row[i][h] + 8 * group) : 0u;
  };

  float acc[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Shared-memory offsets of this lane's activation units (row g, unit 4t + q) in a stage; n8
  // tile j adds 8 rows. Rows past M are zeros (load_tiles), so every tile runs all NT MMAs.
  uint32_t act_lane[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) act_lane[q] = 16 * act_slot(g, 4 * t + q);

  // One group: per MMA k-step q (k = 8q..8q+7 of each word pair, as in the small-M kernel) the A
  // registers are pair q of words 0..3 of rows g and g + 8, the B registers one 128-bit load per
  // n8 tile. All B loads of a step come first, and the two MMAs of an accumulator are NT * RT
  // instructions apart, so neither load nor MMA latency is exposed.
  auto compute = [&](const uint32_t (&sc)[RT][2], int group) {
    const uint32_t stage = stage_of(group);
    ScalePair<FP16> s[RT][2];
    uint4 w[RT][2];
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        s[i][h] = make_scales<FP16>(sc[i][h]);
        w[i][h] = lds128(stage + kActBytes + 64 * (warp * 16 * RT + 16 * i + 8 * h + g) + 16 * t);
      }
    auto step = [&](auto q_const) {
      constexpr int Q = decltype(q_const)::value;
      uint4 xq[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) xq[j] = lds128(stage + act_lane[Q] + j * 8 * kUnitsPerRow * 16);
      uint32_t a[RT][8];  // (rows g, g + 8) x words 0..3, pair Q
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        a[i][0] = decode_pair<FP16, Q>(w[i][0].x, s[i][0]);
        a[i][1] = decode_pair<FP16, Q>(w[i][1].x, s[i][1]);
        a[i][2] = decode_pair<FP16, Q>(w[i][0].y, s[i][0]);
        a[i][3] = decode_pair<FP16, Q>(w[i][1].y, s[i][1]);
        a[i][4] = decode_pair<FP16, Q>(w[i][0].z, s[i][0]);
        a[i][5] = decode_pair<FP16, Q>(w[i][1].z, s[i][1]);
        a[i][6] = decode_pair<FP16, Q>(w[i][0].w, s[i][0]);
        a[i][7] = decode_pair<FP16, Q>(w[i][1].w, s[i][1]);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < RT; ++i) mma16816<FP16>(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], xq[j].x, xq[j].y);
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < RT; ++i) mma16816<FP16>(acc[i][j], a[i][4], a[i][5], a[i][6], a[i][7], xq[j].z, xq[j].w);
    };
    step(std::integral_constant<int, 0>{});
    step(std::integral_constant<int, 1>{});
    step(std::integral_constant<int, 2>{});
    step(std::integral_constant<int, 3>{});
  };

#pragma unroll
  for (int p = 0; p < STAGES - 1; ++p) load_tiles(gb + p);
  uint32_t sc[kPf][RT][2];
#pragma unroll
  for (int p = 0; p < kPf - 1; ++p) load_scales(sc[p], gb + p);
  for (int s = gb; s < ge; s += kPf) {
#pragma unroll
    for (int p = 0; p < kPf; ++p) {
      // group s + p has landed, and every warp is done with the stage that the next load reuses
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      load_tiles(s + p + STAGES - 1);
      load_scales(sc[(p + kPf - 1) % kPf], s + p + kPf - 1);  // into the slot freed last step
      if (s + p < ge) compute(sc[p], s + p);
    }
  }
  cp_async_wait<0>();

  const float scale = __ldg(args.alpha) * 256.f;  // the 2^-8 of the decoded weight values
  OutT* out = static_cast<OutT*>(args.out);
  const OutT* bias = static_cast<const OutT*>(args.bias);
  const int warp_n0 = n0 + warp * 16 * RT;
  if (args.splits == 1) {
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = warp_n0 + 16 * i + g + 8 * (e / 2), m = 8 * j + 2 * t + (e % 2);
          if (n < args.N && m < m_live) {
            float v = acc[i][j][e] * scale;
            if (bias != nullptr) v += Convert<OutT>::from(bias[n]);
            out[static_cast<int64_t>(m0 + m) * args.ldo + n] = Convert<OutT>::to(v);
          }
        }
    return;
  }

  // split K: this CTA's partial sums, then the last of the tile's CTAs adds all of them in order
  const int64_t plane = static_cast<int64_t>(args.M) * args.N;
  float* mine = args.partial + blockIdx.y * plane;
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = warp_n0 + 16 * i + g + 8 * (e / 2), m = 8 * j + 2 * t + (e % 2);
        if (n < args.N && m < m_live) __stcg(mine + static_cast<int64_t>(m0 + m) * args.N + n, acc[i][j][e]);
      }
  __threadfence();
  __syncthreads();
  __shared__ int is_last;
  int* ticket = args.tickets + blockIdx.z * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1) == args.splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int n_live = min(kRows, args.N - n0);
  for (int e = threadIdx.x; e < m_live * n_live; e += WARPS * 32) {
    const int m = e / n_live, r = e % n_live;
    const int64_t off = static_cast<int64_t>(m0 + m) * args.N + n0 + r;
    float v = 0.f;
    for (int sp = 0; sp < args.splits; ++sp) v += __ldcg(args.partial + sp * plane + off);
    v *= scale;
    if (bias != nullptr) v += Convert<OutT>::from(bias[n0 + r]);
    out[static_cast<int64_t>(m0 + m) * args.ldo + n0 + r] = Convert<OutT>::to(v);
  }
  if (threadIdx.x == 0) *ticket = 0;  // ready for the next launch (and graph replay)
}

template <bool FP16, int RT, int NT, int WARPS, typename OutT>
cudaError_t launch(const Args& args, cudaStream_t stream) {
  constexpr int kRows = WARPS * 16 * RT;
  constexpr int kStageBytes = 8 * NT * kGroupK * 2 + kRows * kGroupK / 2;
  // as many k-groups in flight as fit in about 100 KB (two CTAs per SM), 3 to 6
  constexpr int kStages = (100 * 1024 / kStageBytes) < 3 ? 3 : (100 * 1024 / kStageBytes) > 6 ? 6 : (100 * 1024 / kStageBytes);
  constexpr size_t kSmem = static_cast<size_t>(kStages) * kStageBytes;
  auto kernel = nvfp4_mid_m_kernel<FP16, RT, NT, WARPS, kStages, OutT>;
  if (kSmem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((args.N + kRows - 1) / kRows, args.splits, (args.M + 8 * NT - 1) / (8 * NT));
  kernel<<<grid, WARPS * 32, kSmem, stream>>>(args);
  return cudaGetLastError();
}

// CTA tiles (activation rows, weight rows, warps); each is 4 instantiations.
template <bool FP16, typename OutT>
cudaError_t dispatch(const Args& args, int m_tile, int rows, int warps, cudaStream_t stream) {
#define FP4C_TILE(MT, ROWS, W) \
  if (m_tile == MT && rows == ROWS && warps == W) return launch<FP16, ROWS / (16 * W), MT / 8, W, OutT>(args, stream);
  FP4C_TILE(16, 128, 4)
  FP4C_TILE(16, 128, 8)
  FP4C_TILE(32, 128, 4)
  FP4C_TILE(32, 128, 8)
  FP4C_TILE(64, 128, 4)
  FP4C_TILE(64, 128, 8)
  FP4C_TILE(64, 256, 8)
  FP4C_TILE(128, 128, 8)
#undef FP4C_TILE
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {

// Returns a cudaError_t (0 = success). x_fp16: 1 if x is fp16, 0 if bf16. out_fp32: 0 = output in
// x's type, 1 = float32. m_tile x rows, warps: the CTA tile and its warps, one of the FP4C_TILE
// list. splits: CTAs along K (>= 1); above 1, partial ([splits, M, N] fp32) and tickets (one
// zeroed int per tile) are needed.
int fp4c_nvfp4_mid_m_gemm(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* ws, int64_t ldws,
                          void* out, int64_t ldo, const void* bias, const float* alpha, float* partial, int* tickets,
                          int M, int N, int Np, int K, int Kp, int x_fp16, int out_fp32, int m_tile, int rows,
                          int warps, int splits, cudaStream_t stream) {
  if (M < 1 || N < 1 || N > Np || K < 16 || K % 16 || Kp % 32 || K > Kp || ldx % 8 || splits < 1 ||
      (splits > 1 && (partial == nullptr || tickets == nullptr))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  Args args{static_cast<const uint16_t*>(x), static_cast<const uint8_t*>(w), static_cast<const uint8_t*>(ws),
            out, bias, alpha, partial, tickets, ldx, ldw, ldws, ldo, M, N, Np, K, Kp / 32, splits};
  cudaError_t err;
  if (x_fp16) {
    err = out_fp32 ? dispatch<true, float>(args, m_tile, rows, warps, stream)
                   : dispatch<true, __half>(args, m_tile, rows, warps, stream);
  } else {
    err = out_fp32 ? dispatch<false, float>(args, m_tile, rows, warps, stream)
                   : dispatch<false, __nv_bfloat16>(args, m_tile, rows, warps, stream);
  }
  return static_cast<int>(err);
}

}  // extern "C"
