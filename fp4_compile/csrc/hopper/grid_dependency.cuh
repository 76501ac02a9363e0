// Kernel launches and programmatic dependent launch (sm_90), shared by the Hopper kernels. Launched with it
// (cudaLaunchAttributeProgrammaticStreamSerialization), a kernel may start while the kernel before
// it in the stream still runs; wait_for_prior_grid blocks until that grid has completed and its
// writes are visible. Launched without it, the wait returns at once. Our kernels wait before
// they touch global memory: what overlaps is one kernel's launch and set-up with the other's tail.
// Not even an L2 prefetch of the weights, which the kernel before cannot write, may come first: on
// an H100 it made later loads read stale bytes (benchmarks/NOTES.md v17a; test_first_call_on_fresh_weights).
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace fp4c {

// A cudaLaunchKernelEx configuration: grid, block, dynamic shared memory and stream, with a
// cluster of `cluster_z` CTAs along z (0: none) and programmatic dependent launch where `pdl` (only
// for kernels that call wait_for_prior_grid before they touch global memory). Not copyable: the
// configuration points at its own attributes.
struct LaunchConfig {
  cudaLaunchAttribute attrs[2]{};
  cudaLaunchConfig_t config{};
  LaunchConfig(dim3 grid, dim3 block, size_t smem, bool pdl, cudaStream_t stream, unsigned cluster_z = 0) {
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attrs;
    if (cluster_z > 0) {
      attrs[config.numAttrs].id = cudaLaunchAttributeClusterDimension;
      attrs[config.numAttrs].val.clusterDim.x = 1;
      attrs[config.numAttrs].val.clusterDim.y = 1;
      attrs[config.numAttrs].val.clusterDim.z = cluster_z;
      ++config.numAttrs;
    }
    if (pdl) {
      attrs[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attrs[config.numAttrs].val.programmaticStreamSerializationAllowed = 1;
      ++config.numAttrs;
    }
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// Devices whose per-device facts the launchers cache (beyond it, they are asked again on every call).
constexpr int kCachedDevices = 64;

// The current device's SM count (0 if it cannot be read), cached per device: launchers size their
// grids with it on every call.
inline int sm_count() {
  static std::atomic<int> cache[kCachedDevices];  // (zero: static storage)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 0;
  if (device < kCachedDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) return 0;
  if (device < kCachedDevices) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// A kernel's opt-in to `bytes` of dynamic shared memory on the current device. The attribute belongs to
// the device that is current when it is set, so a process using two GPUs needs it on each (a launch
// without it fails with cudaErrorInvalidValue); `done` is the kernel's own per-device record.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, int bytes, std::atomic<bool> (&done)[kCachedDevices]) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < kCachedDevices;
  if (cached && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cached) done[device].store(true, std::memory_order_release);
  return err;
}

// cudaLaunchKernelEx of `kernel` on `stream`, with programmatic dependent launch where `pdl`.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, bool pdl, cudaStream_t stream,
                   Args&&... args) {
  const LaunchConfig launch(grid, block, smem, pdl, stream);
  return cudaLaunchKernelEx(&launch.config, kernel, static_cast<Args&&>(args)...);
}

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Loads of what the kernel before may have written (activations, their scales, global scales, alpha): coherent
// ld.global, never the read-only path. Launched with PDL, a grid starts while the kernel before still runs, and
// ld.global.nc after wait_for_prior_grid returned stale activations: W4A4 groups at M = 9..16 captured in a CUDA
// graph, relative error 0.25-0.34 (benchmarks/NOTES.md v25g). Volatile: kept after the wait in program order.
// Weights (written by no kernel of a forward) keep their .nc streaming loads.
__device__ __forceinline__ uint4 coherent_load_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// As coherent_load_v4, without allocating in L1 (data read once).
__device__ __forceinline__ uint4 coherent_load_v4_once(const void* p) {
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t coherent_load_u16(const void* p) {
  unsigned short v;
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float coherent_load_f32(const float* p) {
  float v;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

// Lets the kernel after this one (launched with PDL) start now; it still waits for this grid's
// completion in its own wait_for_prior_grid.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace fp4c
