// NVFP4 weight x 16-bit activation GEMM on Hopper tensor cores (sm_90a wgmma), for M >= 17.
//
//   out[m, n] = alpha * 2^8 * sum_k x[m, k] * (e2m1[n, k] * sf[n, k/16] * 2^-8)  (+ bias[n])
//
// Exact like the small-M kernel: the weight values e2m1 * sf are built in registers (exact in bf16
// and fp16), products are exact in the tensor core, sums in fp32. Fed NVFP4 activation block
// values it is the W4A4 product, fed bf16/fp16 activations W4A16.
//
// Computed transposed, out^T = W x^T, so that the weight is wgmma's A operand, which may live in
// registers: each thread decodes its A fragment from the packed words in shared memory straight
// into x2 registers (the shared decode of nvfp4_decode.cuh) and nothing decoded goes back to
// shared memory. The activations are the B operand: K-major, 64 k (128 bytes) per row, in
// 128-byte-swizzled 8-row atoms, as the tensor memory accelerator (TMA) writes them.
//
// Warp-specialized: one producer warp (of a third warpgroup) streams (activation tile, weight tile) per 64 k into
// a STAGES-deep ring by TMA, and the scale bytes in groups of 4 stages (16 bytes a row: one TMA box
// where the scale rows are 16-byte aligned, else 4-byte cp.async per row and stage; the 4-byte
// copies cost 3-10% at M = 64..2048, NOTES.md v10e), signalling a "full" mbarrier per stage; two
// consumer warpgroups wait on it,
// decode, issue wgmma, and release the stage on an "empty" mbarrier once their wgmmas that read it
// have finished. No CTA-wide barrier in the main loop: the first version (all threads loading with
// cp.async, one __syncthreads per stage) spent about 660 cycles per stage outside the tensor
// cores (benchmarks/NOTES.md, v7). wgmma is asynchronous, so the decode of stage s + 1 runs while
// the tensor cores work on stage s (wait_group 1).
//
// The weight fragment: thread (g, t) of warp q of a warpgroup holds rows g and g + 8 of its 16
// rows; the m64k16 A fragment wants k = 2t + {0, 1} and 2t + 8 + {0, 1}, which is exactly what
// word t of a 16-byte chunk decodes to (chunk k-order of ops/weight_layout.py): the
// chunk's first k16 step is decoded pairs 0 and 1, its second pairs 2 and 3. The weight tile is
// [rows][32 bytes] with TMA's 32-byte swizzle (chunk c of row r at c ^ (r / 4 % 2)), which makes
// the word reads of a warp hit 32 distinct banks.
//
// K may be split over gridDim.z (at most 8 splits), summed in split order (a fixed summation
// order) in one launch, one of two ways:
// - in a cluster: the splits of an output tile are one thread-block cluster; the tiles stay in
//   the CTAs' shared memories and each CTA sums and stores a slice of the tile (distributed shared
//   memory, a cluster barrier); but clusters must fit in a GPC, so fewer CTAs run at once (H100:
//   120 in clusters of 4 or 8, against 132 SMs);
// - through global memory (every SM): the tiles go to a fixup buffer in L2, each CTA counts
//   itself in a self-resetting ticket, and the tile's last split adds them up. (It replaced a
//   zeroed workspace that took red.global.add: a memset, the kernel and a finalize kernel, and no
//   programmatic launch after the memset.)
// launch_config (ops/cuda_wgmma.py) picks from measured costs (benchmarks/NOTES.md, v7 and v8).
//
// Unsplit launches with a 16-bit output and more tiles than SMs run persistent: one CTA per SM
// loops over the tiles, and the ring runs on from tile to tile, so the producer loads the next
// tile while the consumers store the last (A/B on an H100: 5-12% faster at M = 1024..4096).

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cluster.cuh"
#include "grid_dependency.cuh"
#include "nvfp4_decode.cuh"

namespace {

using fp4c::Convert;
using fp4c::ScalePair;
using fp4c::decode_word;
using fp4c::Gather;
using fp4c::make_scales;
using fp4c::wait_for_prior_grid;
using fp4c::cluster_rank;
using fp4c::cluster_sync;
using fp4c::cluster_sync_relaxed;
using fp4c::load_cluster_f4;

constexpr int kConsumerThreads = 256;              // two warpgroups
constexpr int kThreads = kConsumerThreads + 128;   // + the producer warpgroup (one warp of it works)
// Registers per thread after the role split (setmaxnreg): the launch gives 65536 / 384 = 168 to
// every thread; the producer needs few, the consumers' accumulators and fragments many.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
constexpr int kBK = 64;                            // k per stage: one 128-byte swizzled activation row
constexpr int kSmemBudget = 210 * 1024;
constexpr int kPersistentSmem = 222 * 1024;        // ring + output staging of the persistent kernel
constexpr int kMaxSplits = 8;                      // the portable cluster size

// PERSIST: the persistent kernel's own 16-bit output staging buffer comes out of the ring's budget.
template <int BN, int WM, bool PERSIST = false>
struct Tile {
  static constexpr int kRows = 128 * WM;             // weight rows per CTA: 2 warpgroups x WM x 64
  static constexpr int kActBytes = BN * kBK * 2;     // [BN][64] 16-bit, whole 1024-byte atoms
  static constexpr int kWBytes = kRows * kBK / 2;    // [kRows][32 bytes]
  static constexpr int kScaleBytes = kRows * kBK / 16;  // per stage (sizes the ring: kStages)
  static constexpr int kStageBytes = kActBytes + kWBytes + kScaleBytes;
  // Scale bytes come in groups of 4 stages, [kRows][16 bytes] (one TMA box where the scale rows are
  // 16-byte aligned): 4-byte copies per row and stage took 14% of the time at M = 64 (NOTES.md v10e).
  static constexpr int kScaleGroupBytes = kRows * 16;
  static constexpr int kStagingPitch = kRows + 8;    // 16-bit outputs per staged row (+16 bytes: no bank conflicts)
  static constexpr int kStagingBytes = PERSIST ? BN * kStagingPitch * 2 : 0;
  static constexpr int kRing = PERSIST ? kPersistentSmem - kStagingBytes : kSmemBudget;
  static constexpr int kStages = kRing / kStageBytes < 8 ? kRing / kStageBytes : 8;
  static constexpr int kScaleGroups = (kStages + 6) / 4;  // as many 4-stage groups as the ring spans, + 1
  static constexpr int kRingBytes = kStages * (kActBytes + kWBytes) + kScaleGroups * kScaleGroupBytes;
  static constexpr int kSmemBytes = kRingBytes + kStagingBytes + (2 * kStages + kScaleGroups) * 8 + 1024;
  static constexpr int kAcc = BN / 2;                // fp32 accumulators per thread per m64 tile
  static_assert(BN % 32 == 0 && BN <= 256 && kStages >= 3, "unsupported tile");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

struct Args {
  const uint8_t* ws;   // [Np, Kp/16] e4m3
  void* out;           // [M, N] OutT, row stride ldo
  const void* bias;    // [N] OutT or null
  const float* alpha;  // one element
  int64_t ldws, ldo;
  int M, N, Np, Kp;
  int k_tiles;         // ceil(K / 64)
  int scale_tma;       // 1: the scale rows are 16-byte aligned, read by TMA (s_map); 0: by cp.async
  // PERSIST: the last tail_tiles tiles are split along K into tail_splits slices each (1: none).
  int tail_tiles, tail_splits;
  // K split through global memory (a split grid without a cluster, or a split tail): the slices'
  // fp32 partial tiles, and int counters that are zero at launch and zero again when it ends (the
  // kernel sets them back: no memset per call, so the launch may be programmatic). Null otherwise.
  float* fixup;
  int* tickets;
};

// Timeline of a launch (benchmarks/timeline_wgmma.py): built with -DFP4C_TIMELINE, one thread per
// CTA records %globaltimer (ns) at these events, read back by fp4c_nvfp4_wgmma_timeline; built
// without it, FP4C_EVENT compiles to nothing (the same SASS).
enum TimelineEvent {
  kEntry,       // the CTA starts
  kSetUp,       // barriers initialised, the kernel before has completed (wait_for_prior_grid)
  kFirstLoad,   // the producer has issued the first stage's loads
  kFirstData,   // the consumers see the first stage landed
  kLoopEnd,     // the consumers' last wgmma has finished (not persistent)
  kPublished,   // a K split: partial tile published (slices but the last), or the others' seen (the last;
                //   in a cluster: every CTA's tile in its shared memory)
  kSummed,      // the last slice has added the others' partial tiles (in a cluster: this CTA's share
                //   summed and stored, before the last cluster barrier)
  kEnd,         // the CTA's output is stored
  kTimelineEvents
};
#ifdef FP4C_TIMELINE
constexpr int kTimelineCtas = 4096;
__device__ unsigned long long g_timeline[kTimelineCtas][kTimelineEvents];
__device__ __forceinline__ void timeline_event(int e) {
  const unsigned cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  if (cta < kTimelineCtas) g_timeline[cta][e] = t;
}
#define FP4C_EVENT(e) timeline_event(e)
#else
#define FP4C_EVENT(e) ((void)0)
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The split-K counters (Args::tickets), at GPU scope. Called by one thread after a barrier of the
// threads whose writes it publishes: the fence releases their writes too (CUTLASS's pattern; a
// __threadfence in every thread before the barrier took 1-4% longer at M = 32..128, NOTES.md v16).
__device__ __forceinline__ void count_release(int* counter) {
  asm volatile("fence.acq_rel.gpu;\nred.relaxed.gpu.global.add.s32 [%0], 1;\n" ::"l"(counter) : "memory");
}
// Spins until the counter reaches `target`, then sets it back to zero where `reset` (its last reader).
__device__ __forceinline__ void wait_count(int* counter, int target, bool reset) {
  int seen = 0;
  for (;;) {
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    if (seen >= target) break;
    __nanosleep(64);
  }
  if (reset) asm volatile("st.relaxed.gpu.global.s32 [%0], 0;\n" ::"l"(counter) : "memory");
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

// mbarriers (shared::cta)
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Arrives once all of this thread's earlier cp.async copies have landed (counted in the init count).
__device__ __forceinline__ void mbar_cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// TMA loads of one box at (c0 = innermost coordinate, ...), completing on an mbarrier.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            int c4, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
      "r"(bar)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps registers that an in-flight wgmma reads alive (and unmoved) until after the wait.
template <int WM>
__device__ __forceinline__ void fence_fragments(uint32_t (&f)[WM][4][4]) {
#pragma unroll
  for (int i = 0; i < WM; ++i)
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(f[i][k][r])::"memory");
}

// Pins the accumulators: no copies of them between the wgmmas that define them (ptxas would
// serialize the wgmma pipeline otherwise).
template <int WM, int N>
__device__ __forceinline__ void fence_accumulators(float (&acc)[WM][N]) {
#pragma unroll
  for (int i = 0; i < WM; ++i)
#pragma unroll
    for (int e = 0; e < N; ++e) asm volatile("" : "+f"(acc[i][e])::"memory");
}

// Four 8x8 16-bit matrices from registers in the mma fragment layout (lane l: row l / 4, columns
// 2 (l % 4) + {0, 1}), each stored transposed: row q of matrix m goes to the 16 bytes at the address
// of lane 8 m + q, and holds the matrix's column q.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// wgmma descriptor of a K-major tile of 128-byte rows in 128-byte-swizzled 8-row atoms:
// start address >> 4, leading offset 16 bytes (unused by this swizzle), stride 1024 bytes between
// 8-row groups, swizzle mode 1 (128 bytes). +2 in the low bits steps k by 16 (32 bytes).
__device__ __forceinline__ uint64_t act_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// The asm operand lists are spelled out: inline asm takes only literal strings.
#define FP4C_WGMMA_RS_N32(TYPES)                                                                   \
  asm volatile(                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPES " {"                                          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "  \
      "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <bool FP16>
__device__ __forceinline__ void wgmma_rs(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (FP16) {
    FP4C_WGMMA_RS_N32("f16.f16");
  } else {
    FP4C_WGMMA_RS_N32("bf16.bf16");
  }
}

#define FP4C_WGMMA_RS_N64(TYPES)                                                                   \
  asm volatile(                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPES " {"                                          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <bool FP16>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (FP16) {
    FP4C_WGMMA_RS_N64("f16.f16");
  } else {
    FP4C_WGMMA_RS_N64("bf16.bf16");
  }
}

#define FP4C_WGMMA_RS_N128(TYPES)                                                                   \
  asm volatile(                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPES " {"                                          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <bool FP16>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (FP16) {
    FP4C_WGMMA_RS_N128("f16.f16");
  } else {
    FP4C_WGMMA_RS_N128("bf16.bf16");
  }
}

#define FP4C_WGMMA_RS_N256(TYPES)                                                                   \
  asm volatile(                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPES " {"                                          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "  \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "  \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "  \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "  \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "  \
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"                                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),  \
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),  \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),  \
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),  \
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),  \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),  \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),  \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),  \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <bool FP16>
__device__ __forceinline__ void wgmma_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (FP16) {
    FP4C_WGMMA_RS_N256("f16.f16");
  } else {
    FP4C_WGMMA_RS_N256("bf16.bf16");
  }
}


// CLUSTER: K split within a cluster (a separate instance: a runtime flag changed the main loop's
// register allocation and cost the unsplit launches 1.5%, measured on an H100).
// PERSIST (unsplit, 16-bit output): a 1D grid of at most one CTA per SM loops over the output
// tiles, weight tiles fastest; the ring runs on across tiles, so the producer loads the next tile
// while the consumers store the last, and the output is staged in a buffer of its own.
template <bool FP16, int BN, int WM, typename OutT, bool CLUSTER, bool PERSIST>
__global__ void __launch_bounds__(kThreads, 1)
    nvfp4_wgmma_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                       const __grid_constant__ CUtensorMap s_map, const Args args) {
  static_assert(!(CLUSTER && PERSIST) && (!PERSIST || sizeof(OutT) == 2), "unsupported kernel variant");
  using T = Tile<BN, WM, PERSIST>;
  constexpr int S = T::kStages;
  constexpr int G = T::kScaleGroups;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t act_s = (raw + 1023u) & ~1023u;  // 128-byte swizzle atoms must be 1024-byte aligned
  const uint32_t w_s = act_s + S * T::kActBytes;
  const uint32_t sc_s = w_s + S * T::kWBytes;
  const uint32_t staging_s = sc_s + G * T::kScaleGroupBytes;  // PERSIST: [BN][kStagingPitch] OutT
  const uint32_t full = staging_s + T::kStagingBytes;   // S mbarriers: stage s loaded
  const uint32_t empty = full + 8 * S;              // S mbarriers: stage s consumed
  const uint32_t scales_free = empty + 8 * S;       // G mbarriers: scale group slot g decoded
  const uint8_t* w_p = smem_raw + (w_s - raw);
  const uint8_t* sc_p = smem_raw + (sc_s - raw);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  if (tid == 0) FP4C_EVENT(kEntry);
  // Weight tiles vary fastest: the CTAs resident at once share few activation tiles, which stay
  // in L2 while every weight tile passes them.
  const int row0 = blockIdx.x * T::kRows;
  const int m0 = blockIdx.y * BN;
  const int split_kt0 = static_cast<int>(static_cast<int64_t>(args.k_tiles) * blockIdx.z / gridDim.z);
  const int split_nk =
      static_cast<int>(static_cast<int64_t>(args.k_tiles) * (blockIdx.z + 1) / gridDim.z) - split_kt0;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full + 8 * s, 1 + 32);  // the TMA issue (expect_tx) + the producer lanes' scale copies
      mbar_init(empty + 8 * s, kConsumerThreads / 32);  // one arrival per consumer warp
    }
    for (int g = 0; g < G; ++g) mbar_init(scales_free + 8 * g, kConsumerThreads / 32);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  wait_for_prior_grid();
  if (tid == 0) FP4C_EVENT(kSetUp);

  // The producer warp: per 64-k stage, the activation and weight tiles by TMA, completing on the
  // stage's "full" mbarrier. `it0`: the ring position of the tile's first stage, kt0 and nk its
  // first 64-k stage and their number.
  // Scale groups: the 4 stages kt = 4q .. 4q+3 (a tile's or split's first group may begin later), into
  // slot group % G once the consumers have decoded the group G before; stage kt's byte of row r at
  // 16 r + 4 (kt % 4). The group's bytes complete on its first stage's "full" mbarrier (TMA: one
  // 16-byte-aligned box), or each stage's 4 bytes per row on that stage's (cp.async).
  int group = 0;  // scale groups begun (producer and consumers each count, over all tiles)
  auto produce = [&](int tile_row0, int tile_m0, int it0, int kt0, int nk) {
    for (int it = it0; it < it0 + nk; ++it) {
      const int s = it % S, kt = kt0 + it - it0, pos = kt % 4;
      const bool begins = pos == 0 || it == it0;
      if (begins) {
        if (group >= G) mbar_wait(scales_free + 8 * (group % G), ((group / G) + 1) & 1);
        ++group;
      }
      const uint32_t slot = sc_s + ((group - 1) % G) * T::kScaleGroupBytes;
      if (it >= S) mbar_wait(empty + 8 * s, ((it / S) + 1) & 1);
      if (lane == 0) {
        const bool scales = args.scale_tma && begins;
        mbar_arrive_expect_tx(full + 8 * s, T::kActBytes + T::kWBytes + (scales ? T::kScaleGroupBytes : 0));
        tma_load_2d(act_s + s * T::kActBytes, &x_map, kt * kBK, tile_m0, full + 8 * s);
        // (tiled maps, see make_weight_maps: stage kt is 32-byte piece kt % 4 of 256-k piece kt / 4)
        tma_load_5d(w_s + s * T::kWBytes, &w_map, 0, kt % 4, 0, kt / 4, tile_row0 / 16, full + 8 * s);
        if (scales) tma_load_4d(slot, &s_map, 0, 0, kt / 4, tile_row0 / 16, full + 8 * s);  // 16 bytes a row
        if (it == 0) FP4C_EVENT(kFirstLoad);
      }
      if (!args.scale_tma) {
#pragma unroll
        for (int p = 0; p < T::kRows / 32; ++p) {  // each row's four scale bytes of these 64 k
          const int r = lane + 32 * p;
          const bool ok = tile_row0 + r < args.Np;
          const int64_t at =
              fp4c::tiled_row(tile_row0 + r, args.ldws, 16) + fp4c::tiled_group(kt / 2, 8) + 4 * (kt % 2);
          const uint8_t* src = args.ws + (ok ? at : 0);
          cp_async4(slot + 16 * r + 4 * pos, src, ok);
        }
      }
      mbar_cp_async_arrive(full + 8 * s);
    }
  };
  // PERSIST: the work of this CTA, one schedule for producer and consumers: every gridDim.x-th of
  // the whole tiles (weight tiles fastest), then, where the last wave would leave SMs idle (a split
  // tail), K slice u % tail_splits of tail tile u / tail_splits, u = blockIdx.x: a tile's last
  // slice has the highest CTA index of its slices, so its peers started no later than it did.
  // body(first weight row, first activation row, ring position, first stage, stages, tail tile or
  // -1, slice).
  auto for_each_unit = [&](auto&& body) {
    const int weight_tiles = (args.N + T::kRows - 1) / T::kRows;
    const int whole = weight_tiles * ((args.M + BN - 1) / BN) - args.tail_tiles;
    int it0 = 0;
    for (int tile = blockIdx.x; tile < whole; tile += gridDim.x, it0 += args.k_tiles)
      body((tile % weight_tiles) * T::kRows, (tile / weight_tiles) * BN, it0, 0, args.k_tiles, -1, 0);
    const int s = args.tail_splits, u = blockIdx.x;
    if (u < args.tail_tiles * s) {
      const int tile = whole + u / s, j = u % s;
      const int kt0 = args.k_tiles * j / s, kt1 = args.k_tiles * (j + 1) / s;
      body((tile % weight_tiles) * T::kRows, (tile / weight_tiles) * BN, it0, kt0, kt1 - kt0, u / s, j);
    }
  };

  // K split within a cluster: every thread of the cluster's CTAs meets the epilogue's two cluster
  // barriers (otherwise the producer warps leave once done and the consumers sync among themselves).

  if (warp >= kConsumerThreads / 32) {  // producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (warp == kConsumerThreads / 32) {
      if constexpr (PERSIST) {
        for_each_unit([&](int tile_row0, int tile_m0, int it0, int kt0, int nk, int, int) {
          produce(tile_row0, tile_m0, it0, kt0, nk);
        });
      } else {
        produce(row0, m0, 0, split_kt0, split_nk);
      }
    }
    if constexpr (CLUSTER) {
      __syncwarp();
      cluster_sync();
      cluster_sync_relaxed();
    }
    return;
  }

  // consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int g = lane / 4, t = lane % 4;
  const int wrow = (warp / 4) * 64 * WM + 16 * (warp % 4) + g;  // this thread's first row, tile 0
  float acc[WM][T::kAcc];

  // A fragments of one stage: [m64 tile][k16 step][register]
  // sc: this stage's scale bytes, row r at sc[16 r .. 16 r + 3]
  auto decode_stage = [&](int s, const uint8_t* sc, uint32_t (&f)[WM][4][4]) {
#pragma unroll
    for (int i = 0; i < WM; ++i) {
      const int r0 = wrow + 64 * i, r1 = r0 + 8;
      const uint32_t sw0 = *reinterpret_cast<const uint32_t*>(sc + 16 * r0);
      const uint32_t sw1 = *reinterpret_cast<const uint32_t*>(sc + 16 * r1);
      const int swz = (g >> 2) & 1;  // = (r >> 2) & 1 for both rows: TMA's 32-byte swizzle
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const uint8_t* wb = w_p + s * T::kWBytes + 4 * t + ((c ^ swz) << 4);
        const uint32_t w0 = *reinterpret_cast<const uint32_t*>(wb + 32 * r0);
        const uint32_t w1 = *reinterpret_cast<const uint32_t*>(wb + 32 * r1);
        uint32_t v0[4], v1[4];
        decode_word<FP16, Gather::kRotate>(w0, make_scales<FP16>(sw0 >> (16 * c)), v0);
        decode_word<FP16, Gather::kRotate>(w1, make_scales<FP16>(sw1 >> (16 * c)), v1);
        f[i][2 * c][0] = v0[0], f[i][2 * c][1] = v1[0], f[i][2 * c][2] = v0[1], f[i][2 * c][3] = v1[1];
        f[i][2 * c + 1][0] = v0[2], f[i][2 * c + 1][1] = v1[2], f[i][2 * c + 1][2] = v0[3], f[i][2 * c + 1][3] = v1[3];
      }
    }
  };

  auto mma_stage = [&](int s, const uint32_t (&f)[WM][4][4]) {
    const uint64_t desc = act_desc(act_s + s * T::kActBytes);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int i = 0; i < WM; ++i) wgmma_rs<FP16>(acc[i], f[i][k], desc + 2 * k);
    wgmma_commit();
  };

  uint32_t frag[2][WM][4][4];
  // One output tile's main loop over stages kt0 .. kt0 + nk - 1, from ring position it0: acc = their product.
  auto consume = [&](int it0, int kt0, int nk) {
#pragma unroll
    for (int i = 0; i < WM; ++i)
#pragma unroll
      for (int e = 0; e < T::kAcc; ++e) acc[i][e] = 0.f;
    fence_accumulators(acc);
    for (int it = it0; it < it0 + nk; ++it) {
      const int s = it % S, pos = (kt0 + it - it0) % 4;
      if (pos == 0 || it == it0) ++group;
      const int slot = (group - 1) % G;
      const uint8_t* sc = sc_p + slot * T::kScaleGroupBytes + 4 * pos;
      // after the group's last stage is decoded, its scales live in registers: the slot is free
      const bool frees_slot = (pos == 3 || it == it0 + nk - 1) && lane == 0;
      mbar_wait(full + 8 * s, (it / S) & 1);
      if (it == 0 && tid == 0) FP4C_EVENT(kFirstData);
      if ((it - it0) & 1) {
        decode_stage(s, sc, frag[1]);
        if (frees_slot) mbar_arrive(scales_free + 8 * slot);
        mma_stage(s, frag[1]);
        wgmma_wait<1>();
        fence_fragments<WM>(frag[0]);
      } else {
        decode_stage(s, sc, frag[0]);
        if (frees_slot) mbar_arrive(scales_free + 8 * slot);
        mma_stage(s, frag[0]);
        wgmma_wait<1>();
        fence_fragments<WM>(frag[1]);
      }
      // stage it - 1: its wgmmas have finished, its words were read before them
      if (it > it0 && lane == 0) mbar_arrive(empty + 8 * ((it - 1) % S));
    }
    wgmma_wait<0>();
    fence_accumulators(acc);
  };

  // A tile's 16-bit output: alpha, bias and the rounding of two accumulators at a time in
  // registers, staged [activation row][weight row] at `staging_at` (pitch kStagingPitch) by
  // stmatrix .trans (one instruction per 4 x 64 outputs of a warp, not one per output), then
  // stored in coalesced 16-byte row pieces. The accumulators of n8 block j, half h of m64 tile i
  // are an 8x8 fragment (weight rows c0 + 8h + g, activation rows 8j + 2t + {0, 1}); stored
  // transposed, its row q goes to staged row 8j + q. Lane l addresses row l % 8 of matrix l / 8
  // = (j - 2 jj, h) of each group of four. Ends with the staging free again.
  auto store_tile_16bit = [&](uint32_t staging_at, int tile_row0, int tile_m0) {
    if constexpr (sizeof(OutT) == 2) {
      const float scale = fp4c::coherent_load_f32(args.alpha) * 256.f;  // the 2^-8 of the decoded weight values
      const OutT* bias = static_cast<const OutT*>(args.bias);
      OutT* out = static_cast<OutT*>(args.out);
      const OutT* staging = reinterpret_cast<const OutT*>(smem_raw + (staging_at - raw));
      const bool vec_out = args.ldo % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
      constexpr int kChunks = T::kRows / 8;  // 16-byte chunks of a staged row
#pragma unroll
      for (int i = 0; i < WM; ++i) {
        float b[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = tile_row0 + wrow + 64 * i + 8 * h;
          b[h] = (bias != nullptr && n < args.N) ? Convert<OutT>::from(bias[n]) : 0.f;
        }
        const int c0 = wrow - g + 64 * i;  // the warp's first weight row in m64 tile i
        const int mat = lane / 8;
        const uint32_t lane_row = staging_at + 2 * ((8 * (mat / 2) + lane % 8) * T::kStagingPitch + c0 + 8 * (mat % 2));
#pragma unroll
        for (int jj = 0; jj < BN / 16; ++jj) {
          uint32_t r[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int j = 2 * jj + q / 2, h = q % 2;
            r[q] = Convert<OutT>::pack(acc[i][4 * j + 2 * h] * scale + b[h], acc[i][4 * j + 2 * h + 1] * scale + b[h]);
          }
          stmatrix_x4_trans(lane_row + 2 * 16 * jj * T::kStagingPitch, r);
        }
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
      for (int q = tid; q < BN * kChunks; q += kConsumerThreads) {  // coalesced 16-byte row pieces
        const int r = q / kChunks, c = 8 * (q % kChunks), m = tile_m0 + r, n = tile_row0 + c;
        if (m >= args.M || n >= args.N) continue;
        const OutT* src = staging + r * T::kStagingPitch + c;
        OutT* dst = out + static_cast<int64_t>(m) * args.ldo + n;
        if (vec_out && n + 8 <= args.N) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int u = 0; u < 8 && n + u < args.N; ++u) dst[u] = src[u];
        }
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
    }
  };

  // K split through global memory (a split tail, or a split grid without a cluster): every slice
  // but a tile's last leaves its fp32 sums in the fixup buffer (float4 v of thread tid at [v][tid]:
  // coalesced) and counts itself in the tile's ticket; the last slice (the highest CTA index of the
  // tile's, so its peers were scheduled no later and none of them waits: no CTA needs another to be
  // resident) waits for them, sets the ticket back to zero and adds them to its own sums in slice
  // order (a fixed summation order), a slice's loads issued together. True in the last slice,
  // whose acc then holds the tile's sum.
  auto sum_slices = [&](int64_t unit, int slice, int slices) -> bool {
    constexpr int kVec = WM * T::kAcc / 4;
    float4* part = reinterpret_cast<float4*>(args.fixup) + unit * (slices - 1) * kVec * kConsumerThreads;
    int* ticket = args.tickets + unit;
    if (slice < slices - 1) {
      float4* dst = part + static_cast<int64_t>(slice) * kVec * kConsumerThreads + tid;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int i = 4 * v / T::kAcc, e = 4 * v % T::kAcc;
        dst[v * kConsumerThreads] = make_float4(acc[i][e], acc[i][e + 1], acc[i][e + 2], acc[i][e + 3]);
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
      if (tid == 0) {
        count_release(ticket);
        FP4C_EVENT(kPublished);
        FP4C_EVENT(kEnd);
      }
      return false;
    }
    if (tid == 0) {
      wait_count(ticket, slices - 1, true);
      FP4C_EVENT(kPublished);
    }
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
    constexpr int kChunk = kVec < 16 ? kVec : 16;  // loads in flight per slice (32 spill beside 128 acc)
#pragma unroll
    for (int v0 = 0; v0 < kVec; v0 += kChunk) {
      for (int j = 0; j < slices - 1; ++j) {
        const float4* src = part + static_cast<int64_t>(j) * kVec * kConsumerThreads + tid;
#pragma unroll
        for (int v = v0; v < v0 + kChunk; ++v) {
          const int i = 4 * v / T::kAcc, e = 4 * v % T::kAcc;
          const float4 p = __ldcg(src + v * kConsumerThreads);
          acc[i][e] += p.x, acc[i][e + 1] += p.y, acc[i][e + 2] += p.z, acc[i][e + 3] += p.w;
        }
      }
    }
    if (tid == 0) FP4C_EVENT(kSummed);
    return true;
  };

  if constexpr (PERSIST) {
    for_each_unit([&](int tile_row0, int tile_m0, int it0, int kt0, int nk, int tail, int slice) {
      consume(it0, kt0, nk);
      if (nk > 0 && lane == 0) mbar_arrive(empty + 8 * ((it0 + nk - 1) % S));  // the producer is on the next tile
      if (tail >= 0 && !sum_slices(tail, slice, args.tail_splits)) return;  // a CTA's tail slice is its last unit
      store_tile_16bit(staging_s, tile_row0, tile_m0);
    });
    if (tid == 0) FP4C_EVENT(kEnd);
    return;
  } else {
    consume(0, split_kt0, split_nk);
    if (tid == 0) FP4C_EVENT(kLoopEnd);
    if (!CLUSTER && gridDim.z > 1 &&
        !sum_slices(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x, blockIdx.z, gridDim.z)) {
      return;
    }
  }

  // Epilogue, through shared memory (the ring is idle: every stage was waited for), so that each
  // output row leaves in coalesced vector stores: a 16-bit output staged as 16-bit
  // (store_tile_16bit), an fp32 output or a split in a cluster as an fp32 tile. Accumulator e of
  // n8 block j of tile i holds weight row wrow + 64 i + 8 (e / 2), activation row 8 j + 2 t +
  // (e % 2) of the tile; it goes to tile[activation row][weight row], rows padded by 16 bytes (no
  // bank conflicts).
  constexpr int kPitch = T::kRows + 4;
  static_assert(BN * kPitch * sizeof(float) <= static_cast<size_t>(T::kRingBytes), "epilogue tile > ring");
  float* tile = reinterpret_cast<float*>(smem_raw + (act_s - raw));
  asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");  // both warpgroups are done with the ring
  if constexpr (!CLUSTER && sizeof(OutT) == 2) {
    static_assert(BN * T::kStagingPitch * 2 <= T::kRingBytes, "16-bit staging > ring");
    store_tile_16bit(act_s, row0, m0);  // (the 16-bit output staged in the ring)
    if (tid == 0) FP4C_EVENT(kEnd);
  } else {
#pragma unroll
    for (int i = 0; i < WM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) tile[(8 * j + 2 * t + e) * kPitch + wrow + 64 * i + 8 * h] = acc[i][4 * j + 2 * h + e];
    if constexpr (CLUSTER) {
      cluster_sync();  // every split's tile is complete
      if (tid == 0) FP4C_EVENT(kPublished);
    } else {
      asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
    }

    // Each thread owns runs of 4 consecutive outputs of a row (q: row r, columns c..c+3).
    constexpr int kRuns = T::kRows / 4;
    constexpr int kQ = BN * kRuns;
    const float scale = fp4c::coherent_load_f32(args.alpha) * 256.f;  // the 2^-8 of the decoded weight values
    const OutT* bias = static_cast<const OutT*>(args.bias);
    OutT* out = static_cast<OutT*>(args.out);
    const bool vec_out = args.ldo % 4 == 0 && reinterpret_cast<uintptr_t>(out) % (4 * sizeof(OutT)) == 0;
    auto store_run = [&](int m, int n, const float (&src)[4]) {  // alpha, bias, output type, 4 columns
      OutT* dst = out + static_cast<int64_t>(m) * args.ldo + n;
      OutT v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float b = (bias != nullptr && n + u < args.N) ? Convert<OutT>::from(bias[n + u]) : 0.f;
        v[u] = Convert<OutT>::to(src[u] * scale + b);
      }
      if (vec_out && n + 4 <= args.N) {
        if constexpr (sizeof(OutT) == 4) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
        } else {
          *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(v);
        }
      } else {
        for (int u = 0; u < 4 && n + u < args.N; ++u) dst[u] = v[u];
      }
    };

    if constexpr (!CLUSTER) {
      for (int q = tid; q < kQ; q += kConsumerThreads) {
        const int r = q / kRuns, c = 4 * (q % kRuns), m = m0 + r, n = row0 + c;
        if (m >= args.M || n >= args.N) continue;
        const float* src = tile + r * kPitch + c;
        store_run(m, n, {src[0], src[1], src[2], src[3]});
      }
      if (tid == 0) FP4C_EVENT(kEnd);
      return;
    }

    // In a cluster, the CTA of rank j stores the runs [j Q / S, (j + 1) Q / S), summed over the
    // cluster's tiles in rank order. A run's loads from every CTA are issued before the first add:
    // added as they came, each remote load's latency was waited for in turn (A/B on an H100, with the
    // relaxed last barrier: 2-5% of the call at M = 32..128; two runs in flight measured no better,
    // NOTES.md v33b).
    const int splits = gridDim.z;
    const int rank = static_cast<int>(cluster_rank());
    for (int q = kQ * rank / splits + tid; q < kQ * (rank + 1) / splits; q += kConsumerThreads) {
      const int r = q / kRuns, c = 4 * (q % kRuns), m = m0 + r, n = row0 + c;
      if (m >= args.M || n >= args.N) continue;
      const uint32_t local = act_s + 4 * (r * kPitch + c);
      float4 v[kMaxSplits];
#pragma unroll
      for (int j = 0; j < kMaxSplits; ++j)
        if (j < splits) v[j] = load_cluster_f4(local, j);
      float4 sum = v[0];
#pragma unroll
      for (int j = 1; j < kMaxSplits; ++j)
        if (j < splits) sum.x += v[j].x, sum.y += v[j].y, sum.z += v[j].z, sum.w += v[j].w;
      store_run(m, n, {sum.x, sum.y, sum.z, sum.w});
    }
    if (tid == 0) FP4C_EVENT(kSummed);
    cluster_sync_relaxed();  // no CTA of the cluster leaves while the others read its tile
    if (tid == 0) FP4C_EVENT(kEnd);
  }
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no libcuda link).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A tensor of RANK dims (innermost first, strides in bytes of dims 1..RANK-1) read in boxes; out-of-range
// elements read as zero.
template <int RANK>
cudaError_t make_map(CUtensorMap* map, const void* base, CUtensorMapDataType type, const cuuint64_t (&dims)[RANK],
                     const cuuint64_t (&strides)[RANK - 1], const cuuint32_t (&box)[RANK], CUtensorMapSwizzle swizzle) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  cuuint32_t steps[RANK];
  for (int i = 0; i < RANK; ++i) steps[i] = 1;
  const CUresult r = encode(map, type, RANK, const_cast<void*>(base), dims, strides, box, steps,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The tiled weight (ops/weight_layout.py: each 16-row tile's 256-k row pieces contiguous) as TMA sees it:
// codes [tile][piece][16 rows][4 stages][32 bytes] read a stage of `rows` rows at a time, and scales
// [tile][piece][16 rows][16 bytes] read 4 stages at a time. Either box lands in shared memory as the
// row-major [rows][32 or 16 bytes] tile of a 2D map of an untiled weight (the swizzle too: it is a function
// of the shared-memory address).
cudaError_t make_weight_maps(CUtensorMap* w_map, CUtensorMap* s_map, const void* w, const void* ws, int64_t np,
                             int64_t kp, int rows, bool scales) {
  const cuuint64_t tiles = static_cast<cuuint64_t>(np / 16), pieces = static_cast<cuuint64_t>(kp / 256);
  const cuuint32_t box_tiles = static_cast<cuuint32_t>(rows / 16);
  const cudaError_t err = make_map<5>(w_map, w, CU_TENSOR_MAP_DATA_TYPE_UINT8, {32, 4, 16, pieces, tiles},
                                      {32, 128, 2048, pieces * 2048}, {32, 1, 16, 1, box_tiles},
                                      CU_TENSOR_MAP_SWIZZLE_32B);
  if (err != cudaSuccess || !scales) return err;
  return make_map<4>(s_map, ws, CU_TENSOR_MAP_DATA_TYPE_UINT8, {16, 16, pieces, tiles}, {16, 256, pieces * 256},
                     {16, 16, 1, box_tiles}, CU_TENSOR_MAP_SWIZZLE_NONE);
}

// Lets the instance use its dynamic shared memory on the current device (once per instantiation and device).
template <bool FP16, int BN, int WM, typename OutT, bool CLUSTER, bool PERSIST>
cudaError_t allow_smem() {
  static std::atomic<bool> done[fp4c::kCachedDevices];
  return fp4c::allow_dynamic_smem(nvfp4_wgmma_kernel<FP16, BN, WM, OutT, CLUSTER, PERSIST>,
                                  Tile<BN, WM, PERSIST>::kSmemBytes, done);
}

template <bool FP16, int BN, int WM, typename OutT>
cudaError_t launch(const void* x, int64_t ldx, const void* w, int K, const Args& args, int splits,
                   bool pdl, cudaStream_t stream) {
  using T = Tile<BN, WM>;
  CUtensorMap x_map, w_map, s_map{};
  cudaError_t err = make_map<2>(&x_map, x, CU_TENSOR_MAP_DATA_TYPE_UINT16,
                                {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(args.M)},
                                {static_cast<cuuint64_t>(ldx) * 2}, {kBK, BN}, CU_TENSOR_MAP_SWIZZLE_128B);
  if (err != cudaSuccess) return err;
  err = make_weight_maps(&w_map, &s_map, w, args.ws, args.Np, args.Kp, T::kRows, args.scale_tma != 0);
  if (err != cudaSuccess) return err;
  const dim3 grid((args.N + T::kRows - 1) / T::kRows, (args.M + BN - 1) / BN, splits);
  const int64_t tiles = static_cast<int64_t>(grid.x) * grid.y;
  const int sms = fp4c::sm_count();
  if (args.tail_tiles > 0 && (sizeof(OutT) != 2 || splits > 1 || sms == 0 || tiles <= sms ||
                              args.tail_tiles >= tiles || args.tail_tiles * args.tail_splits > sms)) {
    return cudaErrorInvalidValue;  // a split tail belongs to a persistent launch whose last wave it fills
  }
  const bool clustered = splits > 1 && args.fixup == nullptr;
  if constexpr (sizeof(OutT) == 2) {
    // more unsplit tiles than SMs: the persistent kernel, one CTA per SM
    if (splits == 1 && sms > 0 && tiles > sms) {
      err = allow_smem<FP16, BN, WM, OutT, false, true>();
      if (err != cudaSuccess) return err;
      const fp4c::LaunchConfig persistent(dim3(sms), dim3(kThreads), Tile<BN, WM, true>::kSmemBytes, pdl, stream);
      return cudaLaunchKernelEx(&persistent.config, nvfp4_wgmma_kernel<FP16, BN, WM, OutT, false, true>, x_map,
                                w_map, s_map, args);
    }
  }
  auto kernel = clustered ? nvfp4_wgmma_kernel<FP16, BN, WM, OutT, true, false>
                          : nvfp4_wgmma_kernel<FP16, BN, WM, OutT, false, false>;
  err = clustered ? allow_smem<FP16, BN, WM, OutT, true, false>() : allow_smem<FP16, BN, WM, OutT, false, false>();
  if (err != cudaSuccess) return err;
  const fp4c::LaunchConfig launch(grid, dim3(kThreads), T::kSmemBytes, pdl, stream, clustered ? splits : 0);
  return cudaLaunchKernelEx(&launch.config, kernel, x_map, w_map, s_map, args);
}

template <bool FP16, typename OutT>
cudaError_t dispatch_tile(const void* x, int64_t ldx, const void* w, int K, const Args& args, int bn,
                          int wm, int splits, bool pdl, cudaStream_t stream) {
#define FP4C_TILE(BN_, WM_) \
  if (bn == BN_ && wm == WM_) return launch<FP16, BN_, WM_, OutT>(x, ldx, w, K, args, splits, pdl, stream);
  FP4C_TILE(32, 1) FP4C_TILE(32, 2) FP4C_TILE(64, 1) FP4C_TILE(64, 2) FP4C_TILE(128, 1) FP4C_TILE(128, 2)
  FP4C_TILE(256, 1)
#undef FP4C_TILE
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {

// Returns a cudaError_t (0 = success). x_fp16: 1 if x is fp16, 0 if bf16. out_fp32: 0 = output in
// x's type, 1 = float32. bn (activation rows per CTA): 32, 64, 128 or 256; wm: 1 or 2 (128 or 256
// weight rows per CTA; bn 256 takes 1); splits: 1..8, reduced in a cluster of that many CTAs, or,
// where fixup is given, through global memory: fixup then holds tiles x (splits - 1) x bn x 128 wm
// floats and tickets one int per tile (tiles = ceil(N / (128 wm)) x ceil(M / bn)). tail_tiles > 0
// (unsplit 16-bit launches with more tiles than SMs, which run persistent): the last tail_tiles
// tiles are split along K into tail_splits slices (tail_tiles x tail_splits at most the SM count);
// fixup holds tail_tiles x (tail_splits - 1) x bn x 128 wm floats, tickets tail_tiles ints.
// Tickets must be zero at launch; the kernel leaves them zero. pdl: 1 = programmatic dependent
// launch, 0 = a plain launch.
// The weight is tiled (ops/weight_layout.py): Np a multiple of 16, Kp of 256, ldw = Kp / 2 and ldws = Kp / 16;
// x and w 16-byte aligned, ldx a multiple of 8 (TMA); ws 4-byte aligned (scales not 16-byte aligned are read by
// 4-byte cp.async copies).
int fp4c_nvfp4_wgmma_gemm(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* ws, int64_t ldws,
                          void* out, int64_t ldo, float* fixup, int* tickets, const void* bias, const float* alpha,
                          int M, int N, int Np, int K, int Kp, int x_fp16, int out_fp32, int bn, int wm, int splits,
                          int tail_tiles, int tail_splits, int pdl, cudaStream_t stream) {
  if (M < 1 || N < 1 || N > Np || Np % 16 || K < 16 || K % 16 || K > Kp || Kp % 256 || ldx % 8 || ldw != Kp / 2 ||
      ldws != Kp / 16 || reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(w) % 16 ||
      reinterpret_cast<uintptr_t>(ws) % 4 || splits < 1 ||
      splits > kMaxSplits || tail_tiles < 0 || tail_splits < 1 || (fixup == nullptr) != (tickets == nullptr) ||
      reinterpret_cast<uintptr_t>(fixup) % 16 || (tail_tiles > 0 && (tail_splits < 2 || fixup == nullptr))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int scale_tma = reinterpret_cast<uintptr_t>(ws) % 16 == 0;  // (TMA's base alignment)
  const bool through_memory = tail_tiles > 0 || splits > 1;
  const Args args{static_cast<const uint8_t*>(ws), out, bias, alpha, ldws, ldo, M, N, Np, Kp,
                  (K + kBK - 1) / kBK, scale_tma, tail_tiles, tail_tiles > 0 ? tail_splits : 1,
                  through_memory ? fixup : nullptr, through_memory ? tickets : nullptr};
  cudaError_t err;
  if (x_fp16) {
    err = out_fp32 ? dispatch_tile<true, float>(x, ldx, w, K, args, bn, wm, splits, pdl != 0, stream)
                   : dispatch_tile<true, __half>(x, ldx, w, K, args, bn, wm, splits, pdl != 0, stream);
  } else {
    err = out_fp32 ? dispatch_tile<false, float>(x, ldx, w, K, args, bn, wm, splits, pdl != 0, stream)
                   : dispatch_tile<false, __nv_bfloat16>(x, ldx, w, K, args, bn, wm, splits, pdl != 0, stream);
  }
  return static_cast<int>(err);
}

#ifdef FP4C_TIMELINE
// Copies the events of the CTAs of the last launches ([4096][kTimelineEvents] uint64 ns, CTA
// blockIdx.x + gridDim.x (blockIdx.y + gridDim.y blockIdx.z)) to `dst` and zeroes them; a cudaError_t.
int fp4c_nvfp4_wgmma_timeline(void* dst) {
  void* events = nullptr;
  cudaError_t err = cudaMemcpyFromSymbol(dst, g_timeline, sizeof(g_timeline));
  if (err == cudaSuccess) err = cudaGetSymbolAddress(&events, g_timeline);
  if (err == cudaSuccess) err = cudaMemset(events, 0, sizeof(g_timeline));
  return static_cast<int>(err);
}
#endif

// How many clusters of `splits` CTAs of the kernel fit on the current device at once (every tile
// takes one SM: registers), or minus a cudaError_t. The launch configuration keeps split-K grids
// within that: a cluster that does not fit waits for a whole earlier one to finish.
int fp4c_nvfp4_wgmma_cluster_capacity(int splits) {
  if (splits < 1 || splits > kMaxSplits) return -static_cast<int>(cudaErrorInvalidValue);
  cudaError_t err = allow_smem<false, 256, 1, __nv_bfloat16, true, false>();
  if (err != cudaSuccess) return -static_cast<int>(err);
  const fp4c::LaunchConfig split(dim3(1, 1, splits), dim3(kThreads), Tile<256, 1>::kSmemBytes, false, nullptr,
                                 splits);
  int clusters = 0;
  err = cudaOccupancyMaxActiveClusters(&clusters, nvfp4_wgmma_kernel<false, 256, 1, __nv_bfloat16, true, false>,
                                       &split.config);
  return err == cudaSuccess ? clusters : -static_cast<int>(err);
}

}  // extern "C"
