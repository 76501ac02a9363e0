// How fast a thread-block cluster can sum its CTAs' fp32 tiles on Hopper (the wgmma kernel's K split in a
// cluster, csrc/hopper/nvfp4_wgmma.cu): each of S CTAs holds a tile of T bytes in shared memory; CTA j
// must sum share j (T / S bytes) of every CTA's tile, in rank order. Three ways, timed per CTA with
// %globaltimer from a cluster barrier to the sums:
//   ld     every thread loads its float4 of share j from each rank (ld.shared::cluster), as the kernel does;
//   push   each CTA sends share j of its tile to CTA j with one bulk copy (cp.async.bulk, the TMA unit)
//          into a receive area there, completing on CTA j's mbarrier; CTA j then sums locally;
//   local  the ld loop reading the CTA's own tile S times (shared-memory speed, no network).
// Build and run on an sm_90 GPU (benchmarks/NOTES.md v34):
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -o /tmp/dsmem benchmarks/dsmem_bandwidth.cu
//   /tmp/dsmem [CTAs]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <vector>

#include "../fp4_compile/csrc/hopper/cluster.cuh"

namespace {

using fp4c::cluster_address;
using fp4c::cluster_rank;
using fp4c::cluster_sync;
using fp4c::load_cluster_f4;

enum Mode { kLd, kPush, kLocal };
constexpr int kThreads = 256;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void add(float4& s, const float4& v) { s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w; }

// One reduction of share `rank` over the S tiles; out: the thread's running sum (kept live).
template <int S, Mode M>
__device__ void reduce_once(float* tile, float* recv, uint64_t* mbar, int bytes, int phase, float4& out) {
  const uint32_t rank = cluster_rank();
  const int share = bytes / S;  // bytes, a multiple of 16
  const uint32_t tile_s = smem_u32(tile), recv_s = smem_u32(recv);
  if constexpr (M == kPush) {
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(mbar)),
                   "r"((S - 1) * share) : "memory");
#pragma unroll
      for (int j = 0; j < S; ++j) {
        if (j == static_cast<int>(rank)) continue;
        const int slot = static_cast<int>(rank) < j ? rank : rank - 1;  // rank's place in CTA j's receive area
        asm volatile(
            "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                cluster_address(recv_s + slot * share, j)),
            "r"(tile_s + j * share), "r"(share), "r"(cluster_address(smem_u32(mbar), j))
            : "memory");
      }
    }
    uint32_t done = 0;
    while (!done) {
      asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                   : "=r"(done) : "r"(smem_u32(mbar)), "r"(phase & 1) : "memory");
    }
    for (int o = 16 * threadIdx.x; o < share; o += 16 * kThreads) {  // rank order: slots below rank, own, above
      float4 v[S];
#pragma unroll
      for (int j = 0; j < S; ++j) {
        const uint32_t a = j == static_cast<int>(rank) ? tile_s + rank * share + o
                                                       : recv_s + (j < static_cast<int>(rank) ? j : j - 1) * share + o;
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                     : "=f"(v[j].x), "=f"(v[j].y), "=f"(v[j].z), "=f"(v[j].w) : "r"(a));
      }
      float4 s = v[0];
#pragma unroll
      for (int j = 1; j < S; ++j) add(s, v[j]);
      add(out, s);
    }
  } else {
    for (int o = 16 * threadIdx.x; o < share; o += 16 * kThreads) {
      const uint32_t local = tile_s + rank * share + o;
      float4 v[S];
#pragma unroll
      for (int j = 0; j < S; ++j) v[j] = load_cluster_f4(local, M == kLd ? j : rank);
      float4 s = v[0];
#pragma unroll
      for (int j = 1; j < S; ++j) add(s, v[j]);
      add(out, s);
    }
  }
}

template <int S, Mode M>
__global__ void __launch_bounds__(kThreads) reduce_kernel(int bytes, int reps, uint64_t* first_ns, uint64_t* rest_ns,
                                                          float4* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* tile = reinterpret_cast<float*>(smem);
  float* recv = reinterpret_cast<float*>(smem + bytes);
  __shared__ __align__(8) uint64_t mbar;
  for (int i = threadIdx.x; i < bytes / 4; i += kThreads) tile[i] = static_cast<float>((i * 7 + blockIdx.x) % 13);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(&mbar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the tile's generic writes, to the bulk copies
  cluster_sync();
  float4 out = make_float4(0.f, 0.f, 0.f, 0.f);
  uint64_t first = 0, rest = 0;
  for (int r = 0; r < reps; ++r) {
    const uint64_t t0 = now_ns();
    reduce_once<S, M>(tile, recv, &mbar, bytes, r, out);
    __syncthreads();
    const uint64_t t1 = now_ns();
    (r == 0 ? first : rest) += t1 - t0;
    cluster_sync();  // every CTA's sums done before the next round overwrites the receive areas
  }
  if (threadIdx.x == 0) first_ns[blockIdx.x] = first, rest_ns[blockIdx.x] = rest;
  if (out.x == -1.f) sink[blockIdx.x * kThreads + threadIdx.x] = out;  // never true: keeps the loads
}

template <int S, Mode M>
void run(int ctas, int bytes, const char* name) {
  auto kernel = reduce_kernel<S, M>;
  const int smem = bytes + (M == kPush ? bytes / S * (S - 1) : 0);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const int grid = ctas / S * S, reps = 9;
  uint64_t *first, *rest;
  float4* sink;
  cudaMalloc(&first, grid * 8);
  cudaMalloc(&rest, grid * 8);
  cudaMalloc(&sink, grid * kThreads * sizeof(float4));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = S, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  std::vector<double> f, r;
  for (int launch = 0; launch < 6; ++launch) {
    cudaLaunchKernelEx(&cfg, kernel, bytes, reps, first, rest, sink);
    if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
      std::printf("%-6s S=%d %6d B: %s\n", name, S, bytes, cudaGetErrorString(e));
      return;
    }
    if (launch == 0) continue;  // warm-up
    std::vector<uint64_t> a(grid), b(grid);
    cudaMemcpy(a.data(), first, grid * 8, cudaMemcpyDeviceToHost);
    cudaMemcpy(b.data(), rest, grid * 8, cudaMemcpyDeviceToHost);
    for (int i = 0; i < grid; ++i) f.push_back(a[i]), r.push_back(b[i] / double(reps - 1));
  }
  auto median = [](std::vector<double> v) { std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end()); return v[v.size() / 2]; };
  const double remote = double(bytes) / S * (S - 1);  // bytes each CTA takes from the others
  const double fm = median(f), rm = median(r);
  std::printf("%-6s S=%d tile %6d B  %3d CTAs  first %6.2f us  steady %6.2f us  %6.1f GB/s a CTA from the others (steady)\n",
              name, S, bytes, grid, fm / 1e3, rm / 1e3, remote / rm);
  cudaFree(first), cudaFree(rest), cudaFree(sink);
}

template <int S>
void run_all(int ctas) {
  for (int bytes : {64 << 10, 96 << 10}) {
    run<S, kLd>(ctas, bytes, "ld");
    run<S, kPush>(ctas, bytes, "push");
    run<S, kLocal>(ctas, bytes, "local");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int ctas = argc > 1 ? std::atoi(argv[1]) : 128;
  run_all<2>(ctas);
  run_all<4>(ctas);
  run_all<8>(ctas);
  return 0;
}
