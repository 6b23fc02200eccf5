// CUDA kernels of the elementwise and verification ops (rms_norm, rope, kv_cache_write, verify_*). The others:
// gemv.cu (linear, decoder projections, head GEMV), attention.cu, heads.cu. No torch headers here (fast nvcc); see
// launchers.h for the contracts.
//
// Batch invariance: a row's result depends only on its own inputs and sizes. Launch configurations (block
// size, split of a reduction over threads) are fixed per op, never derived from the number of rows, and
// reductions combine partial results in a fixed order (warp butterflies, then warps in index order).
// The build passes --fmad=false: a*b+c is never contracted behind our back.
//
// No host synchronisation: start / positions are not validated here (the Python caller validates); the kernels
// only guard memory accesses (out-of-range rows are NaN, out-of-range cache slots are not written).
#include <cstdint>

#include "common/limits.h"
#include "common/sampling.h"
#include "cuda/device.cuh"

namespace layerskip::cuda {
namespace {

// ---- rms_norm: one block of kNormThreads per row ----------------------------------------------------------------
constexpr int kNormThreads = 256;

template <typename T, typename W>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                                T* __restrict__ y, int64_t H, float eps) {
  __shared__ float warp_part[kNormThreads / 32];
  __shared__ float inv_s;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * H;
  T* yr = y + row * H;
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < H; i += kNormThreads) {
    const float v = to_f32(xr[i]);
    acc += v * v;
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < kNormThreads / 32; ++i) s += warp_part[i];
    inv_s = 1.0f / sqrtf(s / static_cast<float>(H) + eps);
  }
  __syncthreads();
  const float inv = inv_s;
  for (int64_t i = threadIdx.x; i < H; i += kNormThreads) yr[i] = from_f32<T>((to_f32(xr[i]) * inv) * to_f32(w[i]));
}

// ---- rope: one thread per (row, pair) -----------------------------------------------------------------------------
constexpr int kEltThreads = 256;  // elementwise kernels

template <typename T>
__global__ void __launch_bounds__(kEltThreads) rope_kernel(const T* __restrict__ x, const int64_t* __restrict__ positions,
                            const float* __restrict__ cos, const float* __restrict__ sin, T* __restrict__ out,
                            int64_t n_pairs, int64_t T_, int64_t pos_stride_b, int64_t nH, int64_t half, int64_t P) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n_pairs;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t row = idx / half;  // (b * T + t) * nH + h
    const int64_t bt = row / nH;
    const int64_t pos = positions[(bt / T_) * pos_stride_b + bt % T_];
    const T* xr = x + row * 2 * half;
    T* yr = out + row * 2 * half;
    if (pos < 0 || pos >= P) {
      yr[i] = from_f32<T>(nan_f32());
      yr[i + half] = from_f32<T>(nan_f32());
      continue;
    }
    rope_pair(xr[i], xr[i + half], cos[pos * half + i], sin[pos * half + i], yr[i], yr[i + half]);
  }
}

// ---- kv_cache_write: one thread per element ------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kEltThreads) kv_cache_write_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
                                      const T* __restrict__ v, const int64_t* __restrict__ start, int64_t n,
                                      int64_t T_, int64_t nKV, int64_t S, int64_t D) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D;
    int64_t rest = idx / D;
    const int64_t h = rest % nKV;
    rest /= nKV;
    const int64_t t = rest % T_;
    const int64_t b = rest / T_;
    const int64_t slot = start[b] + t;
    if (slot < 0 || slot >= S) continue;
    const int64_t dst = ((b * nKV + h) * S + slot) * D + d;
    k_cache[dst] = k[idx];
    v_cache[dst] = v[idx];
  }
}

// ---- verify_greedy: one thread per sequence -----------------------------------------------------------------------
constexpr int kVerifyGreedyThreads = 128;

__global__ void __launch_bounds__(kVerifyGreedyThreads) verify_greedy_kernel(const int64_t* __restrict__ drafts, const int64_t* __restrict__ target,
                                     int64_t* __restrict__ positions, int64_t* __restrict__ accepted,
                                     int64_t* __restrict__ next, int64_t B, int64_t D) {
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += int64_t(gridDim.x) * blockDim.x) {
    int64_t a = 0;
    while (a < D && drafts[b * D + a] == target[b * (D + 1) + a]) ++a;
    accepted[b] = a;
    next[b] = target[b * (D + 1) + a];
    positions[b] += a + 1;
  }
}

// ---- verify_sampling: one block per sequence; chunk sums in parallel, the rest as common/sampling.h ------------------
constexpr int kVerifyThreads = 256;

__global__ void __launch_bounds__(kVerifyThreads)
    verify_sampling_kernel(const int64_t* __restrict__ drafts, const float* __restrict__ q,
                           const float* __restrict__ p, const float* __restrict__ uniforms,
                           int64_t* __restrict__ positions, int64_t* __restrict__ accepted, int64_t* __restrict__ next,
                           int64_t D, int64_t V, double* __restrict__ scratch, int* __restrict__ errors) {
  __shared__ int64_t s_j, s_tok;
  const int64_t b = blockIdx.x;
  const float* ub = uniforms + b * (D + 1);
  if (threadIdx.x == 0) {
    int64_t j = 0;
    for (; j < D; ++j) {
      const int64_t y = drafts[b * D + j];
      if (y < 0 || y >= V) {  // the CPU op raises: flagged, and the impossible draft is rejected
        atomicOr(errors, kDeviceErrorDraft);
        break;
      }
      const float qy = q[(b * D + j) * V + y], py = p[(b * (D + 1) + j) * V + y];
      if (!(__fmul_rn(ub[j], qy) < py)) break;
    }
    s_j = j;
  }
  __syncthreads();
  const int64_t j = s_j;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  double* S = scratch + b * nchunks;
  const float* pj = p + (b * (D + 1) + j) * V;
  for (int pass = 0; pass < 2; ++pass) {  // pass 0: residual (after a rejection) or bonus; pass 1: p if no mass
    if (pass == 1 && (j == D || s_tok >= 0)) break;  // block-uniform
    const SampleWeights w{pj, (pass == 0 && j < D) ? q + (b * D + j) * V : nullptr};
    for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) S[c] = sample_chunk_sum(w, c, V);
    __syncthreads();
    if (threadIdx.x == 0) s_tok = sample_from_chunks(w, S, nchunks, V, ub[D]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    accepted[b] = j;
    next[b] = s_tok >= 0 ? s_tok : V - 1;
    positions[b] += j + 1;
  }
}

}  // namespace


void launch_rms_norm(DType dt, bool w_f32, const void* x, const void* w, void* y, int64_t rows, int64_t H,
                     float eps, cudaStream_t stream) {
  if (rows == 0 || H == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    if (w_f32)
      launch(rms_norm_kernel<T, float>, static_cast<unsigned>(rows), kNormThreads, 0, stream, static_cast<const T*>(x),
             static_cast<const float*>(w), static_cast<T*>(y), H, eps);
    else
      launch(rms_norm_kernel<T, T>, static_cast<unsigned>(rows), kNormThreads, 0, stream, static_cast<const T*>(x),
             static_cast<const T*>(w), static_cast<T*>(y), H, eps);
  });
}

void launch_rope(DType dt, const void* x, const int64_t* positions, const float* cos, const float* sin, void* out,
                 int64_t B, int64_t T, int64_t pos_stride_b, int64_t nH, int64_t D, int64_t P, cudaStream_t stream) {
  const int64_t n_pairs = B * T * nH * (D / 2);
  if (n_pairs == 0) return;
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    launch(rope_kernel<Ty>, grid_1d(n_pairs, kEltThreads), kEltThreads, 0, stream, static_cast<const Ty*>(x), positions, cos, sin,
           static_cast<Ty*>(out), n_pairs, T, pos_stride_b, nH, D / 2, P);
  });
}

void launch_kv_cache_write(DType dt, void* k_cache, void* v_cache, const void* k, const void* v,
                           const int64_t* start, int64_t B, int64_t T, int64_t nKV, int64_t S, int64_t D,
                           cudaStream_t stream) {
  const int64_t n = B * T * nKV * D;
  if (n == 0) return;
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    launch(kv_cache_write_kernel<Ty>, grid_1d(n, kEltThreads), kEltThreads, 0, stream, static_cast<Ty*>(k_cache),
           static_cast<Ty*>(v_cache), static_cast<const Ty*>(k), static_cast<const Ty*>(v), start, n, T, nKV, S, D);
  });
}

}  // namespace layerskip::cuda

namespace layerskip::cuda {

void launch_verify_greedy(const int64_t* drafts, const int64_t* target, int64_t* positions, int64_t* accepted,
                          int64_t* next, int64_t B, int64_t D, cudaStream_t stream) {
  if (B == 0) return;
  launch(verify_greedy_kernel, grid_1d(B, kVerifyGreedyThreads), kVerifyGreedyThreads, 0, stream, drafts, target, positions, accepted, next, B, D);
}

int64_t verify_sampling_scratch(int64_t B, int64_t V) { return B * ((V + kSampleChunk - 1) / kSampleChunk); }

void launch_verify_sampling(const int64_t* drafts, const float* q, const float* p, const float* uniforms,
                            int64_t* positions, int64_t* accepted, int64_t* next, int64_t B, int64_t D, int64_t V,
                            double* scratch, int* errors, cudaStream_t stream) {
  if (B == 0) return;
  launch(verify_sampling_kernel, static_cast<unsigned>(B), kVerifyThreads, 0, stream, drafts, q, p, uniforms, positions,
         accepted, next, D, V, scratch, errors);
}

}  // namespace layerskip::cuda
