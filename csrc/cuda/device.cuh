// Device helpers shared by the kernel files (csrc/cuda/*.cu): element conversions, warp reductions, 16-byte
// vector loads, the dtype dispatch and the capped 1-D grid. No torch headers; compiles under nvcc and under the
// CUDA emulator (a host compiler with LAYERSKIP_CUDA_EMULATOR).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"
#include "cuda/launchers.h"

namespace layerskip::cuda {
namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// v rounded to T and widened again: what a T tensor holds of a float result.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // every lane holds the same (fixed butterfly order) sum
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;  // exact in any order (fmaxf ignores NaN: a NaN score propagates through the exp/sum instead)
}

// RoPE of one pair (x1 = x[i], x2 = x[i + D/2]) at angle (c, s), rounded to T: the rope op's arithmetic (shared by
// the rope kernel and the decoder's fused attention, which must give the same bits).
template <typename T>
__device__ __forceinline__ void rope_pair(T x1, T x2, float c, float s, T& y1, T& y2) {
  const float a = to_f32(x1), b = to_f32(x2);
  y1 = from_f32<T>(a * c - b * s);
  y2 = from_f32<T>(b * c + a * s);
}

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// 16-byte vectors: 4 float32 or 8 bfloat16 / float16 elements.
template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);
  using Raw = uint4;
};

template <typename T>
__device__ __forceinline__ bool vec_aligned(const T* p, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(p) % 16) == 0 && (ld * int64_t(sizeof(T))) % 16 == 0;
}

// How a vector load goes through the caches: read-only data (ld.global.nc), data read once (cache-streaming
// ld.global.cs, evict first: a weight matrix; LDG...EF in the SASS, which benchmarks/gpu_static.py counts as HBM
// traffic), or data the same kernel may have written (a plain coherent load: the decoder's KV cache).
enum class Load { kReadOnly, kStreaming, kCoherent };

// The raw 16 bytes of elements [k, k + kN) of p: one vector load when vec_ok and the vector lies inside [0, K),
// else element by element with zeros past K (p null: all zeros).
template <typename T, Load kLoad = Load::kReadOnly>
__device__ __forceinline__ uint4 load_raw(const T* p, bool vec_ok, int64_t k, int64_t K) {
  constexpr int kN = Vec<T>::kN;
  if (p != nullptr && vec_ok && k + kN <= K) {
    const uint4* v = reinterpret_cast<const uint4*>(p + k);
    if constexpr (kLoad == Load::kStreaming)
      return __ldcs(v);
    else if constexpr (kLoad == Load::kReadOnly)
      return __ldg(v);
    else
      return *v;
  }
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kN; ++i) e[i] = (p != nullptr && k + i < K) ? p[k + i] : from_f32<T>(0.0f);
  return raw;
}

template <typename T>
__device__ __forceinline__ void widen(const uint4& raw, float (&v)[Vec<T>::kN]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kN; ++i) v[i] = to_f32(e[i]);
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, bool vec_ok, float (&v)[Vec<T>::kN], int64_t k, int64_t K) {
  widen<T>(load_raw<T>(p, vec_ok, k, K), v);
}

// Blocks of a 1-D grid over n items (at most LAYERSKIP_GRID_1D_CAP: the emulated tests shrink it so the grid-stride
// loops that cover the rest run).
#ifndef LAYERSKIP_GRID_1D_CAP
#define LAYERSKIP_GRID_1D_CAP (1 << 20)
#endif
inline unsigned grid_1d(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = LAYERSKIP_GRID_1D_CAP;  // grid-stride loops cover the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
  }
}

}  // namespace
}  // namespace layerskip::cuda
