// Read-only streaming kernels for benchmarks/bench_read_floor.py: how fast can this GPU read a
// weight's bytes with the access pattern of the small-M kernel (nvfp4_small_m.cu), with a blocked
// layout that makes each warp load one contiguous 512-byte piece, and with a plain contiguous
// stream? Nothing is computed: every loaded word is xor-ed into a value that is stored only if it
// equals a magic number, so no load can be dropped. Each kernel first waits for the grid before
// (grid_dependency.cuh) and may be launched with programmatic dependent launch, as the package's
// kernels are, so that a chain of them pays the launch cost the GEMMs pay; `empty` does nothing else.
#include <cuda_runtime.h>
#include <stdint.h>

#include "grid_dependency.cuh"

namespace {

template <int PREFETCH>
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  if constexpr (PREFETCH == 128) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else if constexpr (PREFETCH == 256) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  }
  return v;
}

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

constexpr uint32_t kMagic = 0x9e3779b9u;

// Every thread reads 16-byte pieces at a grid stride, UNROLL loads in flight.
template <int UNROLL>
__global__ void read_contiguous(const uint4* p, int64_t pieces, uint32_t* sink) {
  fp4c::wait_for_prior_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint32_t acc = 0;
  for (; i + (UNROLL - 1) * stride < pieces; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = load_stream<0>(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= fold(v[u]);
  }
  for (; i < pieces; i += stride) acc ^= fold(load_stream<0>(p + i));
  if (acc == kMagic) sink[0] = acc;
}

// The small-M kernel's loads: a 16-row block per CTA step, the block's 128-k groups (64 bytes of
// each row) split over the warps, lane (g, t) loading 16 bytes of rows g and g + 8 per group, PF
// groups in flight. BLOCKED: the 16 rows x 64 bytes of a group are one contiguous kilobyte
// (lane l reads bytes 16 l and 512 + 16 l of it); else rows are ldw bytes apart. The grid may be
// smaller than the number of row blocks (persistent): CTAs then loop over blocks.
template <int PF, bool BLOCKED, int PREFETCH>
__global__ void read_rows(const uint8_t* w, int64_t ldw, int row_blocks, int groups, uint32_t* sink) {
  fp4c::wait_for_prior_grid();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int gb = groups * warp / warps, ge = groups * (warp + 1) / warps;
  uint32_t acc = 0;
  for (int rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
    const uint8_t* p0;
    const uint8_t* p1;
    int64_t step;
    if constexpr (BLOCKED) {
      p0 = w + (static_cast<int64_t>(rb) * groups) * 1024 + 16 * lane;
      p1 = p0 + 512;
      step = 1024;
    } else {
      p0 = w + (static_cast<int64_t>(rb) * 16 + g) * ldw + 16 * t;
      p1 = p0 + 8 * ldw;
      step = 64;
    }
    uint4 buf[PF][2];
#pragma unroll
    for (int p = 0; p < PF; ++p) {
      if (gb + p < ge) {
        buf[p][0] = load_stream<PREFETCH>(p0 + (gb + p) * step);
        buf[p][1] = load_stream<PREFETCH>(p1 + (gb + p) * step);
      }
    }
    for (int s = gb; s < ge; s += PF) {
#pragma unroll
      for (int p = 0; p < PF; ++p) {
        if (s + p < ge) acc ^= fold(buf[p][0]) ^ fold(buf[p][1]);
        if (s + p + PF < ge) {
          buf[p][0] = load_stream<PREFETCH>(p0 + (s + p + PF) * step);
          buf[p][1] = load_stream<PREFETCH>(p1 + (s + p + PF) * step);
        }
      }
    }
  }
  if (acc == kMagic) sink[0] = acc;
}

__global__ void empty(uint32_t*) { fp4c::wait_for_prior_grid(); }

template <int PF, bool BLOCKED>
cudaError_t launch_rows(const void* w, int64_t ldw, int row_blocks, int groups, int ctas, int warps, int prefetch,
                        bool pdl, uint32_t* sink, cudaStream_t stream) {
  const auto* p = static_cast<const uint8_t*>(w);
  const dim3 grid(ctas), block(32 * warps);
  if (prefetch == 0) return fp4c::launch(read_rows<PF, BLOCKED, 0>, grid, block, 0, pdl, stream, p, ldw, row_blocks, groups, sink);
  if (prefetch == 128) return fp4c::launch(read_rows<PF, BLOCKED, 128>, grid, block, 0, pdl, stream, p, ldw, row_blocks, groups, sink);
  if (prefetch == 256) return fp4c::launch(read_rows<PF, BLOCKED, 256>, grid, block, 0, pdl, stream, p, ldw, row_blocks, groups, sink);
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {
// pattern 0: contiguous (ctas x 32*warps threads, stages = loads in flight: 2, 4 or 8);
// 1: small-M rows; 2: blocked rows (rows a multiple of 16, ldw of 64 bytes per row); 3: empty (ctas x
// 32*warps threads that only wait). pdl: launched with programmatic dependent launch.
int fp4c_read_floor(int pattern, const void* w, int64_t rows, int64_t ldw, int ctas, int warps, int stages,
                    int prefetch, int pdl, uint32_t* sink, cudaStream_t stream) {
  if (rows % 16 || ldw % 64 || warps < 1 || warps > 32 || ctas < 1) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(ctas), block(32 * warps);
  const bool use_pdl = pdl != 0;
  if (pattern == 3) return static_cast<int>(fp4c::launch(empty, grid, block, 0, use_pdl, stream, sink));
  if (pattern == 0) {
    const auto* p = static_cast<const uint4*>(w);
    const int64_t pieces = rows * ldw / 16;
    if (stages == 2) return static_cast<int>(fp4c::launch(read_contiguous<2>, grid, block, 0, use_pdl, stream, p, pieces, sink));
    if (stages == 4) return static_cast<int>(fp4c::launch(read_contiguous<4>, grid, block, 0, use_pdl, stream, p, pieces, sink));
    if (stages == 8) return static_cast<int>(fp4c::launch(read_contiguous<8>, grid, block, 0, use_pdl, stream, p, pieces, sink));
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int row_blocks = static_cast<int>(rows / 16), groups = static_cast<int>(ldw / 64);
  const bool blocked = pattern == 2;
  cudaError_t err = cudaErrorInvalidValue;
  if (stages == 2) {
    err = blocked ? launch_rows<2, true>(w, ldw, row_blocks, groups, ctas, warps, prefetch, use_pdl, sink, stream)
                  : launch_rows<2, false>(w, ldw, row_blocks, groups, ctas, warps, prefetch, use_pdl, sink, stream);
  } else if (stages == 4) {
    err = blocked ? launch_rows<4, true>(w, ldw, row_blocks, groups, ctas, warps, prefetch, use_pdl, sink, stream)
                  : launch_rows<4, false>(w, ldw, row_blocks, groups, ctas, warps, prefetch, use_pdl, sink, stream);
  }
  return static_cast<int>(err);
}
}  // extern "C"
