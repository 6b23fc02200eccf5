// CUDA kernels of the native ops. No torch headers here (fast nvcc); see launchers.h for the contracts.
//
// Batch invariance: a row's result depends only on its own inputs and sizes. Launch configurations (block
// size, split of a reduction over threads) are fixed per op, never derived from the number of rows, and
// reductions combine partial results in a fixed order (warp butterflies, then warps in index order).
// The build passes --fmad=false: a*b+c is never contracted behind our back.
//
// No host synchronisation: start / positions are not validated here (the Python caller validates); the kernels
// only guard memory accesses (out-of-range rows are NaN, out-of-range cache slots are not written).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/head_filter.h"
#include "common/limits.h"
#include "common/sampling.h"
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // every lane holds the same (fixed butterfly order) sum
}

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

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
template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const int64_t* __restrict__ positions,
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
    const float c = cos[pos * half + i], s = sin[pos * half + i];
    const float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
    yr[i] = from_f32<T>(x1 * c - x2 * s);
    yr[i + half] = from_f32<T>(x2 * c + x1 * s);
  }
}

// ---- kv_cache_write: one thread per element ------------------------------------------------------------------------
template <typename T>
__global__ void kv_cache_write_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
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

// ---- cache_attention: one block of kAttnWarps warps per query row (b, t, h) ---------------------------------------
// Warp w takes keys w, w + kAttnWarps, ... with an online softmax; lane l holds elements l, l + 32, ... of the
// head dim (NPL = ceil(D / 32) of them). The warps' (max, sum, acc) are then merged in warp order.
constexpr int kAttnWarps = 4;

template <typename T, int NPL>
__global__ void __launch_bounds__(kAttnWarps * 32)
    cache_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                           const int64_t* __restrict__ start, T* __restrict__ out, int64_t T_, int64_t nH,
                           int64_t nKV, int64_t S, int64_t D, float scale) {
  __shared__ float sm_m[kAttnWarps];
  __shared__ float sm_l[kAttnWarps];
  __shared__ float sm_acc[kAttnWarps][NPL * 32];
  const int64_t row = blockIdx.x;  // (b * T + t) * nH + h
  const int64_t h = row % nH;
  const int64_t bt = row / nH;
  const int64_t t = bt % T_;
  const int64_t b = bt / T_;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  T* orow = out + row * D;
  const int64_t pos = start[b] + t;
  if (pos < 0 || pos >= S) {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) orow[i] = from_f32<T>(nan_f32());
    return;
  }
  const int64_t kvh = h / (nH / nKV);
  const T* K = k_cache + (b * nKV + kvh) * S * D;
  const T* V = v_cache + (b * nKV + kvh) * S * D;
  const T* qrow = q + row * D;

  float qv[NPL], acc[NPL];
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int64_t d = lane + 32 * i;
    qv[i] = d < D ? to_f32(qrow[d]) : 0.0f;
    acc[i] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t s = warp; s <= pos; s += kAttnWarps) {
    const T* kr = K + s * D;
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < D) part += qv[i] * to_f32(kr[d]);
    }
    const float sc = warp_sum(part) * scale;
    const float m_new = fmaxf(m, sc);
    // A key scoring -inf weighs 0 and rescales nothing, also before any finite score (where exp(-inf - -inf)
    // would be NaN); a NaN score still propagates, as on the CPU.
    const float corr = m == m_new ? 1.0f : expf(m - m_new);
    const float p = sc == -INFINITY ? 0.0f : expf(sc - m_new);
    l = l * corr + p;
    const T* vr = V + s * D;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int64_t d = lane + 32 * i;
      const float vv = d < D ? to_f32(vr[d]) : 0.0f;
      acc[i] = acc[i] * corr + p * vv;
    }
    m = m_new;
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < NPL; ++i) sm_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float M = sm_m[0];
  for (int w = 1; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w]);
  float L = 0.0f;
  float wscale[kAttnWarps];
  for (int w = 0; w < kAttnWarps; ++w) {
    wscale[w] = sm_m[w] == -INFINITY ? 0.0f : expf(sm_m[w] - M);  // warps that saw no key contribute nothing
    L += sm_l[w] * wscale[w];
  }
  const float inv_L = 1.0f / L;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) o += sm_acc[w][d] * wscale[w];
    orow[d] = from_f32<T>(o * inv_L);
  }
}

template <typename T>
void attention_dispatch_npl(const void* q, const void* kc, const void* vc, const int64_t* start, void* out,
                            int64_t B, int64_t T_, int64_t nH, int64_t nKV, int64_t S, int64_t D, float scale,
                            cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(B * T_ * nH);
  const dim3 block(kAttnWarps * 32);
  auto args = [&](auto kernel) {
    launch(kernel, rows, block, 0, stream, static_cast<const T*>(q), static_cast<const T*>(kc),
           static_cast<const T*>(vc), start, static_cast<T*>(out), T_, nH, nKV, S, D, scale);
  };
  if (D <= 32)
    args(cache_attention_kernel<T, 1>);
  else if (D <= 64)
    args(cache_attention_kernel<T, 2>);
  else if (D <= 128)
    args(cache_attention_kernel<T, 4>);
  else
    args(cache_attention_kernel<T, 8>);
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
  }
}

// ---- linear / exit_head_argmax: one warp per output column, up to kLinRows rows of x per warp -------------------
// Lane l takes elements k = V*(l + 32 i) + e (V = 4 floats or 8 bfloat16 / float16 per 16-byte load; i ascending,
// then e),
// accumulating with fmaf in that order into one float per row; the warp then sums its lanes with the fixed
// butterfly of warp_sum. A column's arithmetic depends only on K: any M, any tile, any launch: the same bits.
constexpr int kLinRows = 8;     // rows of x per warp
constexpr int kLinWarps = 4;    // warps per block
constexpr int kLinCols = 8;     // columns per warp (one after another)

template <typename T>
struct LinVec;
template <>
struct LinVec<float> {
  static constexpr int kN = 4;
  using Load = float4;
};
template <>
struct LinVec<__nv_bfloat16> {
  static constexpr int kN = 8;
  using Load = uint4;
};
template <>
struct LinVec<__half> {
  static constexpr int kN = 8;
  using Load = uint4;
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, bool vec_ok, float (&v)[LinVec<T>::kN], int64_t k, int64_t K) {
  constexpr int kN = LinVec<T>::kN;
  if (vec_ok && k + kN <= K) {
    const typename LinVec<T>::Load raw = *reinterpret_cast<const typename LinVec<T>::Load*>(p + k);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] = to_f32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] = k + i < K ? to_f32(p[k + i]) : 0.0f;
  }
}

// acc[m] (every lane, after the butterfly) = dot(x[m, :K], w[:K]) for m < rows.
template <typename T>
__device__ __forceinline__ void warp_dot_rows(const T* __restrict__ x, int64_t ldx, int rows, const T* __restrict__ w,
                                              int64_t K, bool vec_ok, float (&acc)[kLinRows]) {
  constexpr int kN = LinVec<T>::kN;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 0; m < kLinRows; ++m) acc[m] = 0.0f;
  for (int64_t k = int64_t(lane) * kN; k < K; k += 32 * kN) {
    float wv[kN];
    load_vec(w, vec_ok, wv, k, K);
#pragma unroll
    for (int m = 0; m < kLinRows; ++m) {
      if (m < rows) {
        float xv[kN];
        load_vec(x + m * ldx, vec_ok, xv, k, K);
#pragma unroll
        for (int e = 0; e < kN; ++e) acc[m] = fmaf(xv[e], wv[e], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kLinRows; ++m) acc[m] = warp_sum(acc[m]);
}

template <typename T>
__device__ __forceinline__ bool vec_aligned(const T* p, int64_t ld) {
  constexpr int kBytes = 16;
  return (reinterpret_cast<uintptr_t>(p) % kBytes) == 0 && (ld * int64_t(sizeof(T))) % kBytes == 0;
}

template <typename T>
__global__ void __launch_bounds__(kLinWarps * 32)
    linear_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int64_t M, int64_t K,
                  int64_t N) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t m0 = int64_t(blockIdx.y) * kLinRows;
  const int rows = static_cast<int>(M - m0 < kLinRows ? M - m0 : kLinRows);
  const T* xt = x + m0 * K;
  const bool vec_ok = vec_aligned(x, K) && vec_aligned(w, K);
  const int64_t n0 = (int64_t(blockIdx.x) * kLinWarps + warp) * kLinCols;
  for (int c = 0; c < kLinCols; ++c) {
    const int64_t n = n0 + c;
    if (n >= N) break;
    float acc[kLinRows];
    warp_dot_rows(xt, K, rows, w + n * K, K, vec_ok, acc);
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < kLinRows; ++m)
        if (m < rows) out[(m0 + m) * N + n] = from_f32<T>(acc[m]);
    }
  }
}

// A head column: the dot of the rows of x with w[row]. A vocab_subset entry outside [0, rows_w) is flagged in the
// device error word (the CPU op raises on it) and scores NaN without reading w. `row` is the same on every lane.
template <typename T>
__device__ __forceinline__ bool head_column(const T* __restrict__ x, int rows, const T* __restrict__ w, int64_t row,
                                            int64_t rows_w, int64_t K, bool vec_ok, float (&acc)[kLinRows],
                                            int* __restrict__ errors) {
  if (row >= 0 && row < rows_w) {
    warp_dot_rows(x, K, rows, w + row * K, K, vec_ok, acc);
    return true;
  }
  if ((threadIdx.x & 31) == 0 && blockIdx.y == 0) atomicOr(errors, kDeviceErrorVocabSubset);
  return false;
}

// torch.argmax's order: NaN first (the first one wins), then larger; ties keep the earlier index.
__device__ __forceinline__ bool takes(float v, float best, int64_t best_idx) {
  return best_idx < 0 || (!isnan(best) && (isnan(v) || v > best));
}

// Partial argmax of linear(normed, lm_head[subset]) per (row, block of kLinWarps * kLinCols columns).
template <typename T>
__global__ void __launch_bounds__(kLinWarps * 32)
    head_argmax_partial_kernel(const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ subset,
                               int64_t M, int64_t K, int64_t V, int64_t rows_w, float* __restrict__ part_val,
                               int64_t* __restrict__ part_idx, int* __restrict__ errors) {
  __shared__ float sm_val[kLinWarps][kLinRows];
  __shared__ int64_t sm_idx[kLinWarps][kLinRows];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t m0 = int64_t(blockIdx.y) * kLinRows;
  const int rows = static_cast<int>(M - m0 < kLinRows ? M - m0 : kLinRows);
  const T* xt = x + m0 * K;
  const bool vec_ok = vec_aligned(x, K) && vec_aligned(w, K);
  float best[kLinRows];
  int64_t best_idx[kLinRows];
#pragma unroll
  for (int m = 0; m < kLinRows; ++m) {
    best[m] = -INFINITY;
    best_idx[m] = -1;
  }
  const int64_t n0 = (int64_t(blockIdx.x) * kLinWarps + warp) * kLinCols;
  for (int c = 0; c < kLinCols; ++c) {
    const int64_t n = n0 + c;
    if (n >= V) break;
    float acc[kLinRows];
    const bool row_ok = head_column(xt, rows, w, subset != nullptr ? subset[n] : n, rows_w, K, vec_ok, acc, errors);
#pragma unroll
    for (int m = 0; m < kLinRows; ++m) {
      const float v = row_ok ? to_f32(from_f32<T>(acc[m])) : nan_f32();  // the logit linear() returns, rounded to T
      if (takes(v, best[m], best_idx[m])) {
        best[m] = v;
        best_idx[m] = n;
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < kLinRows; ++m) {
      sm_val[warp][m] = best[m];
      sm_idx[warp][m] = best_idx[m];
    }
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    const int m = threadIdx.x;
    float b = -INFINITY;
    int64_t bi = -1;
    for (int wi = 0; wi < kLinWarps; ++wi) {  // warps in column order
      if (sm_idx[wi][m] >= 0 && takes(sm_val[wi][m], b, bi)) {
        b = sm_val[wi][m];
        bi = sm_idx[wi][m];
      }
    }
    part_val[(m0 + m) * gridDim.x + blockIdx.x] = b;
    part_idx[(m0 + m) * gridDim.x + blockIdx.x] = bi;
  }
}

__global__ void head_argmax_final_kernel(const float* __restrict__ part_val, const int64_t* __restrict__ part_idx,
                                         const int64_t* __restrict__ subset, int64_t M, int64_t nblk,
                                         int64_t* __restrict__ out) {
  for (int64_t m = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; m < M; m += int64_t(gridDim.x) * blockDim.x) {
    float b = -INFINITY;
    int64_t bi = -1;
    for (int64_t j = 0; j < nblk; ++j) {  // blocks in column order
      const float v = part_val[m * nblk + j];
      const int64_t i = part_idx[m * nblk + j];
      if (i >= 0 && takes(v, b, bi)) {
        b = v;
        bi = i;
      }
    }
    out[m] = bi < 0 ? 0 : (subset != nullptr ? subset[bi] : bi);
  }
}

// ---- exit_head_sample / exit_head_log_softmax ----------------------------------------------------------------------
// The logits: head_argmax_partial_kernel's columns (the linear kernel's dot per column), written out as float32.
template <typename T>
__global__ void __launch_bounds__(kLinWarps * 32)
    head_logits_kernel(const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ subset, int64_t M,
                       int64_t K, int64_t V, int64_t rows_w, float* __restrict__ out, int* __restrict__ errors) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t m0 = int64_t(blockIdx.y) * kLinRows;
  const int rows = static_cast<int>(M - m0 < kLinRows ? M - m0 : kLinRows);
  const T* xt = x + m0 * K;
  const bool vec_ok = vec_aligned(x, K) && vec_aligned(w, K);
  const int64_t n0 = (int64_t(blockIdx.x) * kLinWarps + warp) * kLinCols;
  for (int c = 0; c < kLinCols; ++c) {
    const int64_t n = n0 + c;
    if (n >= V) break;
    float acc[kLinRows];
    const bool row_ok = head_column(xt, rows, w, subset != nullptr ? subset[n] : n, rows_w, K, vec_ok, acc, errors);
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < kLinRows; ++m)
        if (m < rows) out[(m0 + m) * V + n] = row_ok ? to_f32(from_f32<T>(acc[m])) : nan_f32();
    }
  }
}

// One block of kRowThreads per row. Every step is the CPU kernel's (csrc/cpu/exit_head.cpp) with the same
// arithmetic: elementwise steps are per element; sums are common/sampling.h's chunk sums (a thread per chunk, then
// thread 0 adds them in order); max is exact in any order; the selects count / add integers (exact in any order).
constexpr int kRowThreads = 256;

__device__ __forceinline__ float row_max(const float* row, int64_t V, float* s_red) {
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) m = row[i] > m ? row[i] : m;  // NaN ignored, as the CPU
  s_red[threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = -INFINITY;
    for (int t = 0; t < kRowThreads; ++t) r = s_red[t] > r ? s_red[t] : r;
    s_red[0] = r;
  }
  __syncthreads();
  const float r = s_red[0];
  __syncthreads();  // s_red is reused
  return r;
}

// S(row): chunk sums into S, their total in chunk order (thread 0), returned to every thread.
__device__ __forceinline__ double row_chunked_sum(const float* row, int64_t V, double* S, double* s_total) {
  const int64_t n = (V + kSampleChunk - 1) / kSampleChunk;
  const SampleWeights w{row, nullptr};
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) S[c] = sample_chunk_sum(w, c, V);
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int64_t c = 0; c < n; ++c) t += S[c];
    *s_total = t;
  }
  __syncthreads();
  return *s_total;  // rewritten only after the next call's first barrier, which every thread reaches after this read
}

struct SelectShared {
  uint32_t count[kSelectBins];
  unsigned long long weight[kSelectBins];
  uint32_t prefix;
  unsigned long long carried;
};

// Radix select over the order keys of row[0, V) (common/head_filter.h, the CPU's radix_select): weights 1 each or
// F(value) (mass). On return every thread may read sh.prefix (the selected key) and sh.carried (the weight above).
__device__ void row_radix_select(const float* row, int64_t V, bool mass, uint64_t limit, SelectShared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.carried = 0;
  }
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int i = threadIdx.x; i < kSelectBins; i += blockDim.x) {
      sh.count[i] = 0;
      sh.weight[i] = 0;
    }
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float v = row[i];
      const uint32_t k = order_key(v);
      if (level > 0 && (k >> (shift + 8)) != (prefix >> (shift + 8))) continue;
      const uint32_t dg = (k >> shift) & 0xffu;
      atomicAdd(&sh.count[dg], 1u);
      atomicAdd(&sh.weight[dg], mass ? static_cast<unsigned long long>(prob_fixed(v)) : 1ull);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t carried = sh.carried;
      const int dg = select_digit(sh.count, reinterpret_cast<const uint64_t*>(sh.weight), limit, carried);
      sh.prefix = prefix | (static_cast<uint32_t>(dg < 0 ? 0 : dg) << shift);  // dg >= 0 always (see select_digit)
      sh.carried = carried;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kRowThreads)
    head_sample_rows_kernel(float* __restrict__ probs, const float* __restrict__ uniforms,
                            const int64_t* __restrict__ subset, int64_t V, float temperature, int64_t top_k,
                            double top_p, double* __restrict__ scratch, int64_t* __restrict__ tokens,
                            int* __restrict__ errors) {
  __shared__ SelectShared sh;
  __shared__ float s_red[kRowThreads];
  __shared__ unsigned long long s_ties[kRowThreads];
  __shared__ unsigned long long s_keep;
  __shared__ double s_total;
  const int64_t m = blockIdx.x;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  float* row = probs + m * V;
  double* S = scratch + m * nchunks;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) row[i] = __fdiv_rn(row[i], temperature);
  __syncthreads();
  if (top_k > 0 && top_k < V) {
    row_radix_select(row, V, false, static_cast<uint64_t>(top_k), sh);
    const uint32_t kth = sh.prefix;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      if (order_key(row[i]) < kth) row[i] = -INFINITY;
    __syncthreads();
  }
  const float mx = row_max(row, V, s_red);
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    row[i] = __double2float_rn(exp(__dsub_rn(static_cast<double>(row[i]), static_cast<double>(mx))));
  __syncthreads();
  const double total = row_chunked_sum(row, V, S, &s_total);
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    row[i] = __double2float_rn(__ddiv_rn(static_cast<double>(row[i]), total));
  __syncthreads();
  if (top_p < 1.0) {
    const uint64_t limit = top_p_fixed(top_p);
    row_radix_select(row, V, true, limit, sh);
    const uint32_t vkey = sh.prefix;
    const uint64_t above = sh.carried;
    // Contiguous spans per thread, so a tie's rank (in id order) is its span's offset plus its place in the span.
    const int64_t span = (V + kRowThreads - 1) / kRowThreads;
    const int64_t i0 = int64_t(threadIdx.x) * span < V ? int64_t(threadIdx.x) * span : V;
    const int64_t i1 = i0 + span < V ? i0 + span : V;
    unsigned long long mine = 0;
    for (int64_t i = i0; i < i1; ++i) mine += order_key(row[i]) == vkey;
    s_ties[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long run = 0;
      for (int t = 0; t < kRowThreads; ++t) {
        const unsigned long long c = s_ties[t];
        s_ties[t] = run;
        run += c;
      }
      s_keep = top_p_ties_kept(run, prob_fixed(key_value(vkey)), above, limit);
    }
    __syncthreads();
    unsigned long long r = s_ties[threadIdx.x];
    const unsigned long long keep = s_keep;
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t k = order_key(row[i]);
      if (k > vkey || (k == vkey && r++ < keep)) continue;
      row[i] = 0.0f;
    }
    __syncthreads();
    const double z = row_chunked_sum(row, V, S, &s_total);
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      row[i] = __double2float_rn(__ddiv_rn(static_cast<double>(row[i]), z));
    __syncthreads();
  }
  row_chunked_sum(row, V, S, &s_total);
  if (threadIdx.x == 0) {
    const float u = uniforms[m];
    if (!(u >= 0.0f && u < 1.0f)) atomicOr(errors, kDeviceErrorUniform);  // the CPU op raises
    int64_t j = sample_from_chunks(SampleWeights{row, nullptr}, S, nchunks, V, u);
    if (j < 0) j = V - 1;  // no mass (non-finite logits): the last column, as verify_sampling
    tokens[m] = subset != nullptr ? subset[j] : j;
  }
}

__global__ void __launch_bounds__(kRowThreads)
    head_log_softmax_rows_kernel(float* __restrict__ rows, int64_t V, double* __restrict__ scratch) {
  __shared__ float s_red[kRowThreads];
  __shared__ double s_total;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  float* row = rows + int64_t(blockIdx.x) * V;
  double* S = scratch + int64_t(blockIdx.x) * nchunks;
  const float mx = row_max(row, V, s_red);
  const double dmx = static_cast<double>(mx);
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    double s = 0.0;
    const int64_t end = (c + 1) * kSampleChunk < V ? (c + 1) * kSampleChunk : V;
    for (int64_t i = c * kSampleChunk; i < end; ++i) s = __dadd_rn(s, exp(__dsub_rn(static_cast<double>(row[i]), dmx)));
    S[c] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) t += S[c];
    s_total = t;
  }
  __syncthreads();
  const double lse = __dadd_rn(dmx, log(s_total));
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    row[i] = __double2float_rn(__dsub_rn(static_cast<double>(row[i]), lse));
}

// ---- verify_greedy: one thread per sequence -----------------------------------------------------------------------
__global__ void verify_greedy_kernel(const int64_t* __restrict__ drafts, const int64_t* __restrict__ target,
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

static_assert(LAYERSKIP_MAX_HEAD_DIM <= 8 * 32, "cache_attention_kernel handles D <= 256");

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
    launch(rope_kernel<Ty>, grid_1d(n_pairs, 256), 256, 0, stream, static_cast<const Ty*>(x), positions, cos, sin,
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
    launch(kv_cache_write_kernel<Ty>, grid_1d(n, 256), 256, 0, stream, static_cast<Ty*>(k_cache),
           static_cast<Ty*>(v_cache), static_cast<const Ty*>(k), static_cast<const Ty*>(v), start, n, T, nKV, S, D);
  });
}

void launch_cache_attention(DType dt, const void* q, const void* k_cache, const void* v_cache,
                            const int64_t* start, void* out, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                            int64_t S, int64_t D, float scale, cudaStream_t stream) {
  if (B * T * nH == 0 || D == 0) return;
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    attention_dispatch_npl<Ty>(q, k_cache, v_cache, start, out, B, T, nH, nKV, S, D, scale, stream);
  });
}

}  // namespace layerskip::cuda

namespace layerskip::cuda {

void launch_linear(DType dt, const void* x, const void* w, void* out, int64_t M, int64_t K, int64_t N,
                   cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  const int64_t cols_per_block = int64_t(kLinWarps) * kLinCols;
  const dim3 grid(static_cast<unsigned>((N + cols_per_block - 1) / cols_per_block),
                  static_cast<unsigned>((M + kLinRows - 1) / kLinRows));
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    launch(linear_kernel<Ty>, grid, kLinWarps * 32, 0, stream, static_cast<const Ty*>(x), static_cast<const Ty*>(w),
           static_cast<Ty*>(out), M, K, N);
  });
}

int64_t head_argmax_blocks(int64_t V) {
  const int64_t cols_per_block = int64_t(kLinWarps) * kLinCols;
  return (V + cols_per_block - 1) / cols_per_block;
}

void launch_head_argmax(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset, int64_t M,
                        int64_t H, int64_t V, float* part_val, int64_t* part_idx, int64_t* out, int* errors,
                        cudaStream_t stream) {
  if (M == 0) return;
  const int64_t nblk = head_argmax_blocks(V);
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>((M + kLinRows - 1) / kLinRows));
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    launch(head_argmax_partial_kernel<Ty>, grid, kLinWarps * 32, 0, stream, static_cast<const Ty*>(normed),
           static_cast<const Ty*>(w), subset, M, H, V, rows_w, part_val, part_idx, errors);
  });
  launch(head_argmax_final_kernel, grid_1d(M, 128), 128, 0, stream, part_val, part_idx, subset, M, nblk, out);
}

}  // namespace layerskip::cuda

namespace layerskip::cuda {

void launch_head_logits(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset, int64_t M,
                        int64_t H, int64_t V, float* logits, int* errors, cudaStream_t stream) {
  if (M == 0 || V == 0) return;
  const int64_t cols_per_block = int64_t(kLinWarps) * kLinCols;
  const dim3 grid(static_cast<unsigned>((V + cols_per_block - 1) / cols_per_block),
                  static_cast<unsigned>((M + kLinRows - 1) / kLinRows));
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    launch(head_logits_kernel<Ty>, grid, kLinWarps * 32, 0, stream, static_cast<const Ty*>(normed),
           static_cast<const Ty*>(w), subset, M, H, V, rows_w, logits, errors);
  });
}

int64_t head_rows_scratch(int64_t M, int64_t V) { return M * ((V + kSampleChunk - 1) / kSampleChunk); }

void launch_head_sample_rows(float* probs, const float* uniforms, const int64_t* subset, int64_t M, int64_t V,
                             float temperature, int64_t top_k, double top_p, double* scratch, int64_t* tokens,
                             int* errors, cudaStream_t stream) {
  if (M == 0 || V == 0) return;
  launch(head_sample_rows_kernel, static_cast<unsigned>(M), kRowThreads, 0, stream, probs, uniforms, subset, V,
         temperature, top_k, top_p, scratch, tokens, errors);
}

void launch_head_log_softmax_rows(float* rows, int64_t M, int64_t V, double* scratch, cudaStream_t stream) {
  if (M == 0 || V == 0) return;
  launch(head_log_softmax_rows_kernel, static_cast<unsigned>(M), kRowThreads, 0, stream, rows, V, scratch);
}

void launch_verify_greedy(const int64_t* drafts, const int64_t* target, int64_t* positions, int64_t* accepted,
                          int64_t* next, int64_t B, int64_t D, cudaStream_t stream) {
  if (B == 0) return;
  launch(verify_greedy_kernel, grid_1d(B, 128), 128, 0, stream, drafts, target, positions, accepted, next, B, D);
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
