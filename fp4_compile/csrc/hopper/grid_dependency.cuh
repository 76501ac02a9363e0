// Programmatic dependent launch (sm_90), shared by the Hopper GEMMs. Launched with it
// (cudaLaunchAttributeProgrammaticStreamSerialization), a kernel may start while the kernel before
// it in the stream still runs; wait_for_prior_grid blocks until that grid has completed and its
// writes are visible. Launched without it, the wait returns at once. Our kernels wait before
// they touch global memory: what overlaps is one kernel's launch and set-up with the other's tail.
#pragma once

#include <cuda_runtime.h>

namespace fp4c {

// The launch attribute (cudaLaunchKernelEx) that makes a launch programmatic: only for kernels that
// call wait_for_prior_grid before they touch global memory.
inline cudaLaunchAttribute programmatic_launch() {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return attr;
}

// cudaLaunchKernelEx of `kernel` on `stream`, with programmatic dependent launch where `pdl`.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, bool pdl, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr = programmatic_launch();
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
}

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the kernel after this one (launched with PDL) start now; it still waits for this grid's
// completion in its own wait_for_prior_grid.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace fp4c
