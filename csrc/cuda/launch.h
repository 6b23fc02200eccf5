// The one way kernels.cu launches a kernel, so the same file compiles as CUDA and as host C++:
//   launch(kernel, grid, block, shared_bytes, stream, args...)
// nvcc: kernel<<<grid, block, shared_bytes, stream>>>(args...). A host compiler (the emulated-CUDA test build,
// LAYERSKIP_CUDA_EMULATOR): the kernel runs on the CPU under csrc/cuda/emulator, synchronously.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#if !defined(__CUDACC__)
#if !defined(LAYERSKIP_CUDA_EMULATOR)
#error "kernels.cu compiles with nvcc, or with a host compiler for the CUDA emulator (LAYERSKIP_CUDA_EMULATOR)"
#endif
#include "cuda/emulator/emulator.h"
#endif

namespace layerskip::cuda {

#if defined(__CUDACC__)
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   A... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
}
#else
// ls_emu::Grid converts from dim3 / unsigned and records where launch() was called, for the emulator's reports.
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), ::ls_emu::Grid grid, dim3 block, size_t shared_bytes, cudaStream_t,
                   A... args) {
  ::ls_emu::run(grid, block, shared_bytes, reinterpret_cast<const void*>(kernel), [&] { kernel(args...); });
}
#endif

}  // namespace layerskip::cuda
