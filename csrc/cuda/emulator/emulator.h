// The CUDA emulator: csrc/cuda/kernels.cu compiled by a host C++ compiler runs on the CPU, unchanged.
//
// Only the emulated-CUDA test build includes this (csrc/cuda/launch.h does, when LAYERSKIP_CUDA_EMULATOR is
// defined and the compiler is not nvcc); the extension never does. The model it implements:
//   - a launch runs its grid block after block, synchronously (streams are ignored);
//   - inside a block, one fiber per CUDA thread on one OS thread; a thread runs until it reaches a barrier
//     (__syncthreads) or a warp collective (__shfl_*_sync, __syncwarp), or returns;
//   - __syncthreads releases when every thread of the block waits at the same barrier site; a warp collective
//     when every lane of its mask waits at the same collective site. Anything else is reported with the
//     site's file, line and function (a barrier reached by part of the block, divergent barriers, a shuffle
//     with lanes missing, a mask naming lanes that do not exist);
//   - released threads resume in the order the test chose (forward, reverse, or a seeded random permutation,
//     drawn anew at every release), so a missing barrier shows up as a wrong result in some order;
//   - __shared__ variables are function-local statics; the build moves the kernels' zero-initialised data into
//     one section (ls_emu_shared, see tests/emulated_cuda.py), which is filled with 0xFF at every block start:
//     a read before a write sees NaN / all-ones;
//   - atomics are plain read-modify-writes (fibers never interleave between two barriers);
//   - launch configurations are checked as the driver does (block <= 1024 threads, grid.y/z <= 65535, ...);
//   - dry run (ls_emu_set_dry_run): launches are checked and recorded (kernel, grid, block), not run, so a
//     launcher can be called with any shape and null pointers to see what it would launch.
// Arithmetic: device intrinsics map to the IEEE host operations they name (__fmul_rn is a*b rounded to nearest);
// the build uses -ffp-contract=off and no fast-math, as nvcc's --fmad=false. Transcendentals (expf, exp, log)
// are the host libm's, so results are close to, not bitwise, a GPU's.
#pragma once

#if defined(__CUDACC__)
#error "csrc/cuda/emulator/emulator.h is for a host C++ compiler; nvcc launches kernels itself"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>

// The CUDA headers declare the built-in index variables as host globals: the emulator's are per fiber.
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define __launch_bounds__(...)

namespace ls_emu {

// Where a barrier or collective is in the source (the kernel or device function named by __PRETTY_FUNCTION__).
struct Site {
  const char* file;
  int line;
  const char* function;
};
#define LS_EMU_SITE (::ls_emu::Site{__FILE__, __LINE__, __PRETTY_FUNCTION__})

// The launch site (captured where launch() is called, through this implicit conversion).
struct Grid {
  dim3 dim;
  std::source_location where;
  Grid(dim3 d, std::source_location w = std::source_location::current()) : dim(d), where(w) {}
  Grid(unsigned x, std::source_location w = std::source_location::current()) : dim(x), where(w) {}
};

// The running CUDA thread's indices (valid inside a launch only).
struct Indices {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
extern const Indices* g_indices;

// Runs body as every thread of the grid. kernel: the kernel's address, recorded instead of run in dry-run mode
// (ls_emu_set_dry_run: benchmarks/gpu_static.py reads the real launch configurations of any shape that way).
void run(const Grid& grid, dim3 block, size_t dynamic_smem, const void* kernel, const std::function<void()>& body);

// Block barrier.
void sync_block(const Site& site);

// Warp collectives: every lane of mask deposits a value; the emulator computes each lane's result once all have.
enum class WarpOp : int { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
uint64_t warp_collective(const Site& site, WarpOp op, unsigned mask, uint64_t value, int param, int width);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
template <typename T>
inline T shfl(const Site& s, WarpOp op, unsigned mask, T v, int param, int width) {
  return from_bits<T>(warp_collective(s, op, mask, to_bits(v), param, width));
}
template <typename T>
T shfl_idx(const Site& s, unsigned mask, T v, int lane, int width = 32) { return shfl(s, WarpOp::kShflIdx, mask, v, lane, width); }
template <typename T>
T shfl_up(const Site& s, unsigned mask, T v, int delta, int width = 32) { return shfl(s, WarpOp::kShflUp, mask, v, delta, width); }
template <typename T>
T shfl_down(const Site& s, unsigned mask, T v, int delta, int width = 32) { return shfl(s, WarpOp::kShflDown, mask, v, delta, width); }
template <typename T>
T shfl_xor(const Site& s, unsigned mask, T v, int lane_mask, int width = 32) { return shfl(s, WarpOp::kShflXor, mask, v, lane_mask, width); }
inline void syncwarp(const Site& s, unsigned mask = 0xffffffffu) { warp_collective(s, WarpOp::kSync, mask, 0, 0, 32); }
inline unsigned ballot(const Site& s, unsigned mask, int pred) {
  return static_cast<unsigned>(warp_collective(s, WarpOp::kBallot, mask, pred != 0, 0, 32));
}
inline int any(const Site& s, unsigned mask, int pred) { return static_cast<int>(warp_collective(s, WarpOp::kAny, mask, pred != 0, 0, 32)); }
inline int all(const Site& s, unsigned mask, int pred) { return static_cast<int>(warp_collective(s, WarpOp::kAll, mask, pred != 0, 0, 32)); }

}  // namespace ls_emu

#define threadIdx (::ls_emu::g_indices->thread)
#define blockIdx (::ls_emu::g_indices->block)
#define blockDim (::ls_emu::g_indices->block_dim)
#define gridDim (::ls_emu::g_indices->grid_dim)

#define __syncthreads() ::ls_emu::sync_block(LS_EMU_SITE)
#define __syncwarp(...) ::ls_emu::syncwarp(LS_EMU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::ls_emu::shfl_idx(LS_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::ls_emu::shfl_up(LS_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::ls_emu::shfl_down(LS_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::ls_emu::shfl_xor(LS_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(...) ::ls_emu::ballot(LS_EMU_SITE, __VA_ARGS__)
#define __any_sync(...) ::ls_emu::any(LS_EMU_SITE, __VA_ARGS__)
#define __all_sync(...) ::ls_emu::all(LS_EMU_SITE, __VA_ARGS__)

// Shared memory: a function-local static (the CUDA headers define __shared__ as nothing for a host compiler).
#undef __shared__
#define __shared__ static

// ---- atomics: no other fiber runs between a thread's barriers, so a plain read-modify-write is atomic ----------
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// Cache-streaming load (ld.global.cs, evict first: data read once, such as a weight matrix): a plain load here.
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}

// ---- device intrinsics: the IEEE host operation each one names ------------------------------------------------
inline float __int_as_float(int v) { return ls_emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(static_cast<uint32_t>(ls_emu::to_bits(v))); }
inline float __uint_as_float(unsigned v) { return ls_emu::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return static_cast<uint32_t>(ls_emu::to_bits(v)); }
inline double __longlong_as_double(long long v) { return ls_emu::from_bits<double>(static_cast<uint64_t>(v)); }
inline long long __double_as_longlong(double v) { return static_cast<long long>(ls_emu::to_bits(v)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
using std::isinf;
using std::isnan;
