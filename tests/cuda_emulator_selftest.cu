// Kernels that break CUDA's rules on purpose, and a few that check the emulator's semantics, for
// tests/test_cuda_emulated.py (built into the emulated library beside csrc/cuda/kernels.cu; never into the
// extension). Each is launched through csrc/cuda/launch.h like the real kernels.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

namespace {

using layerskip::cuda::launch;

// Threads 0..15 return before a barrier the others wait at.
__global__ void partial_barrier_kernel(float* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Odd and even threads wait at different barriers.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Odd lanes return before a full-warp shuffle.
__global__ void missing_lanes_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x & 1) return;
  v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}

// A full-warp mask in a block of 48 threads: lanes 16..31 of warp 1 do not exist.
__global__ void short_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// out[t] = what thread t + 1 wrote to shared memory; the barrier between the write and the read is optional.
__global__ void neighbour_kernel(float* out, int with_barrier) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x) + 0.5f;
  if (with_barrier) __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Shared memory read before any write: the emulator's poison (all bits set).
__global__ void read_before_write_kernel(uint32_t* out) {
  __shared__ uint32_t s[32];
  out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
  s[threadIdx.x] = 7;  // block 1 must not see block 0's writes either
}

// Every warp collective the emulator knows, with results the test computes by hand.
__global__ void collectives_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  int* o = out + threadIdx.x * 8;
  o[0] = __shfl_xor_sync(0xffffffffu, lane * 10, 5);
  o[1] = __shfl_down_sync(0xffffffffu, lane * 10, 3);
  o[2] = __shfl_up_sync(0xffffffffu, lane * 10, 3, 8);
  o[3] = __shfl_sync(0xffffffffu, lane * 10, 7, 16);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __any_sync(0xffffffffu, lane == 31);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  __syncwarp();
  o[7] = (lane < 16) ? __shfl_xor_sync(0x0000ffffu, lane, 1) : __shfl_xor_sync(0xffff0000u, lane, 1);
}

// A shared-memory histogram with atomicAdd (u32 and u64 counters), read after a barrier.
__global__ void histogram_kernel(const int* bins, int n, unsigned* counts, unsigned long long* weights) {
  __shared__ unsigned c[16];
  __shared__ unsigned long long w[16];
  if (threadIdx.x < 16) {
    c[threadIdx.x] = 0;
    w[threadIdx.x] = 0;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    atomicAdd(&c[bins[i]], 1u);
    atomicAdd(&w[bins[i]], static_cast<unsigned long long>(i));
  }
  __syncthreads();
  if (threadIdx.x < 16) {
    counts[threadIdx.x] = c[threadIdx.x];
    weights[threadIdx.x] = w[threadIdx.x];
  }
}

// Reads one element past the end of x (the harness guards x) / one past the end of a shared array.
__global__ void over_read_kernel(const float* x, int n, float* out) { out[0] = x[n]; }
__global__ void shared_over_read_kernel(float* out, int i) {
  __shared__ float s[8];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[i];
}

}  // namespace

#define LS_SELFTEST extern "C" __attribute__((visibility("default")))

// which: 0 partial barrier, 1 divergent barriers, 2 missing lanes, 3 short warp, 4 block too large, 5 grid y too
// large. out: 64 floats.
LS_SELFTEST void ls_emu_selftest_misuse(int which, float* out) {
  switch (which) {
    case 0: launch(partial_barrier_kernel, 1u, 64, 0, nullptr, out); break;
    case 1: launch(divergent_barrier_kernel, 1u, 64, 0, nullptr, out); break;
    case 2: launch(missing_lanes_kernel, 1u, 64, 0, nullptr, out); break;
    case 3: launch(short_warp_kernel, 1u, 48, 0, nullptr, out); break;
    case 4: launch(partial_barrier_kernel, 1u, 2048, 0, nullptr, out); break;
    case 5: launch(partial_barrier_kernel, dim3(1, 70000, 1), 32, 0, nullptr, out); break;
    default: break;
  }
}

LS_SELFTEST void ls_emu_selftest_neighbour(float* out, int blocks, int with_barrier) {
  launch(neighbour_kernel, static_cast<unsigned>(blocks), 64, 0, nullptr, out, with_barrier);
}

LS_SELFTEST void ls_emu_selftest_read_before_write(uint32_t* out) {
  launch(read_before_write_kernel, 2u, 32, 0, nullptr, out);
}

LS_SELFTEST void ls_emu_selftest_collectives(int* out) { launch(collectives_kernel, 1u, 64, 0, nullptr, out); }

LS_SELFTEST void ls_emu_selftest_histogram(const int* bins, int n, unsigned* counts, unsigned long long* weights) {
  launch(histogram_kernel, 1u, 96, 0, nullptr, bins, n, counts, weights);
}

LS_SELFTEST void ls_emu_selftest_over_read(const float* x, int n, float* out) {
  launch(over_read_kernel, 1u, 1, 0, nullptr, x, n, out);
}

LS_SELFTEST void ls_emu_selftest_shared_over_read(float* out, int i) {
  launch(shared_over_read_kernel, 1u, 8, 0, nullptr, out, i);
}
