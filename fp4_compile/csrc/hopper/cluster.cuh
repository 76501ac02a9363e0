// Thread-block cluster primitives (sm_90): the barrier over a cluster's CTAs and reads of another CTA's
// shared memory (distributed shared memory). Used by the wgmma kernel's K split in a cluster and by
// benchmarks/dsmem_bandwidth.cu, which measures how fast such reads go (about 30 GB/s an SM on an
// H100, benchmarks/NOTES.md v34c).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace fp4c {

// Cluster barrier over every thread of the cluster's CTAs (a CTA launched alone is a cluster of one).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The same barrier where no memory needs releasing (the wgmma epilogue's last: the reads of the other
// CTAs' tiles have returned, their values stored): a release arrive is a GPU-scope fence (SASS
// MEMBAR.ALL.GPU) that would wait for the output's stores to reach L2.
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The shared::cluster address of this CTA's shared-memory address `local` in cluster CTA `rank`.
__device__ __forceinline__ uint32_t cluster_address(uint32_t local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
}
// Four floats at the same shared-memory offset in cluster CTA `rank`.
__device__ __forceinline__ float4 load_cluster_f4(uint32_t local, uint32_t rank) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(cluster_address(local, rank)) : "memory");
  return v;
}

}  // namespace fp4c
