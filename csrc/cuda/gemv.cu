// The small-M matrix kernel (decode: M = 1, verification: M = d + 1 <= 16) and everything that shares its column
// dot: linear (one or several weight matrices in one launch), the decoder's o_proj / down_proj with the residual add
// in the epilogue, and the exit heads' logits and partial argmax.
//
//   x [M, K] (row-major, of T), W [N, K] (of T)  ->  y[m, n] = sum_k x[m, k] W[n, k]
//
// Grid: x = ceil(N / kGemvCols) column blocks, y = ceil(M / ROWS) row tiles (ROWS = 1, 4, 8 or 16: the smallest
// that holds M, else 16), so W is streamed once for every M <= 16. Block: kGemvWarps warps, all on the block's
// kGemvCols columns, splitting K between them.
//
// The per-column arithmetic depends only on K (and T), never on M, N, the tile, the grid or pointer alignment, so a
// row gives the same bits alone, in a verification batch or in any launch (greedy self-speculation == autoregressive
// decoding). Its order:
//   vectors v = 0, 1, ... of kN = 16 / sizeof(T) elements (the last one zero-padded past K);
//   chunk j = vectors [j * 32U, (j + 1) * 32U), U = kGemvUnroll; chunk j belongs to warp j % kGemvWarps (a split-K
//   fixed by K alone), and within it lane l takes vectors j * 32U + 32u + l for u = 0 .. U-1;
//   each lane: acc = fmaf(x[k], W[n, k], acc) over its chunks ascending, then u, then the kN elements;
//   the block: the kGemvThreads lane sums (thread 32 warp + lane at index 32 warp + lane) added by a fixed pairwise
//   tree, v[i] += v[i + s] for s = 64, 32, ..., 1 (in shared memory: 7 barriers, no shuffles).
// Memory: each lane keeps U * kGemvCols independent 16-byte loads of W in flight per iteration (the chunk's vectors of
// all the block's columns, issued together as cache-streaming loads); x comes from L1 / L2.
#include "common/limits.h"
#include "cuda/device.cuh"

namespace layerskip::cuda {
namespace {

constexpr int kGemvWarps = 4;     // the K split (fixed: part of the summation order)
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvUnroll = 2;    // vectors per lane per chunk (fixed: part of the summation order)
constexpr int kGemvCols = 4;      // columns per block (free: not part of the order)
constexpr int kGemvMaxRows = 16;  // rows per tile at most

enum GemvMode : int {
  kGemvDense = 0,  // y -> out[i] of the matrix the column belongs to (up to kMaxTargets side by side); with
                   // residual: h[m, n] = T(h[m, n] + T(y)) in place (the decoder's residual adds, as torch's add)
  kGemvGated = 1,  // residual over the rows T(x * x2) (the MLP's silu(gate) * up, as torch's mul)
  kGemvHead = 2,   // lm_head rows (vocab_subset): float(T(y)) into logits (NaN for a bad subset entry), or (part_val
                   // set) the partial argmax of T(y) over the block's columns
};

constexpr int kMaxTargets = 3;

template <typename T>
struct GemvParams {
  const T* x;   // [M, K]
  const T* x2;  // kGemvGated: [M, K], the rows are T(x * x2)
  int64_t M, K;
  bool residual;  // kGemvDense: add into out instead of storing
  // kGemvDense / kGemvGated: the weight matrices side by side; column n of the launch is column n - n_begin[i]
  // of matrix i (n_begin[i] <= n < n_begin[i + 1]); out[i] is [M, N_i].
  const T* w[kMaxTargets];
  T* out[kMaxTargets];
  int64_t n_begin[kMaxTargets + 1];
  int targets;
  // heads: w[0] is lm_head [rows_w, K]; column n reads row subset[n] (or n); V columns.
  const int64_t* subset;
  int64_t rows_w;
  float* logits;     // [M, V]
  float* part_val;   // [M, gridDim.x]
  int64_t* part_idx;
  int* errors;
};

template <typename T>
__device__ __forceinline__ int64_t gemv_columns(const GemvParams<T>& p) {
  return p.n_begin[p.targets];
}

// torch.argmax's order: NaN first (the first one wins), then larger; ties keep the earlier index.
__device__ __forceinline__ bool takes(float v, float best, int64_t best_idx) {
  return best_idx < 0 || (!isnan(best) && (isnan(v) || v > best));
}

// x's vector (row m, elements [k, k + kN)) as floats: x itself, or T(x * x2) (kGemvGated). kWhole: a whole
// in-bounds aligned vector (the fast path: one load, no tail checks).
template <typename T, int MODE, bool kWhole>
__device__ __forceinline__ void x_vector(const GemvParams<T>& p, int64_t row, int64_t k, bool vec_ok,
                                         float (&xf)[Vec<T>::kN]) {
  constexpr int kN = Vec<T>::kN;
  const T* xr = p.x + row * p.K;
  if constexpr (kWhole)
    widen<T>(__ldg(reinterpret_cast<const uint4*>(xr + k)), xf);
  else
    load_vec(xr, vec_ok, xf, k, p.K);
  if constexpr (MODE == kGemvGated) {
    const T* x2r = p.x2 + row * p.K;
    float x2f[kN];
    if constexpr (kWhole)
      widen<T>(__ldg(reinterpret_cast<const uint4*>(x2r + k)), x2f);
    else
      load_vec(x2r, vec_ok, x2f, k, p.K);
#pragma unroll
    for (int e = 0; e < kN; ++e) xf[e] = round_to<T>(__fmul_rn(xf[e], x2f[e]));
  }
}

// acc[m][c] += x[m, k .. k + kN) . W[c][k .. k + kN), elements in order.
template <typename T, int ROWS, int MODE, bool kWhole>
__device__ __forceinline__ void fma_vectors(const GemvParams<T>& p, int64_t m0, int rows,
                                            const uint4 (&wr)[kGemvCols], int64_t k, bool vec_ok,
                                            float (&acc)[ROWS][kGemvCols]) {
  constexpr int kN = Vec<T>::kN;
#pragma unroll
  for (int m = 0; m < ROWS; ++m) {
    if (m < rows) {
      float xf[kN];
      x_vector<T, MODE, kWhole>(p, m0 + m, k, vec_ok, xf);
#pragma unroll
      for (int c = 0; c < kGemvCols; ++c) {
        float wf[kN];
        widen<T>(wr[c], wf);
#pragma unroll
        for (int e = 0; e < kN; ++e) acc[m][c] = fmaf(xf[e], wf[e], acc[m][c]);
      }
    }
  }
}

template <typename T, int ROWS, int MODE>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_kernel(GemvParams<T> p) {
  constexpr int C = kGemvCols, U = kGemvUnroll, kN = Vec<T>::kN;
  constexpr int64_t kChunkVecs = 32 * U;
  constexpr bool kHead = MODE == kGemvHead;
  __shared__ float s_red[ROWS * C][kGemvThreads];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t K = p.K;
  const int64_t m0 = int64_t(blockIdx.y) * ROWS;
  const int rows = static_cast<int>(p.M - m0 < ROWS ? p.M - m0 : ROWS);
  const int64_t n0 = int64_t(blockIdx.x) * C;
  const int64_t ncols = gemv_columns(p);

  // The block's columns: their weight rows (null: read nothing, the column is invalid) and whether they exist.
  const T* wrow[C];
  bool valid[C];  // constant-indexed only (a bit mask below for the epilogue's runtime column)
  bool fast = vec_aligned(p.x, K) && (MODE != kGemvGated || vec_aligned(p.x2, K));
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int64_t n = n0 + c;
    if constexpr (kHead) {
      const int64_t r = n < ncols ? (p.subset != nullptr ? p.subset[n] : n) : -1;
      valid[c] = r >= 0 && r < p.rows_w;
      wrow[c] = valid[c] ? p.w[0] + r * K : nullptr;
      if (n < ncols && !valid[c] && threadIdx.x == 0 && blockIdx.y == 0) atomicOr(p.errors, kDeviceErrorVocabSubset);
    } else {
      valid[c] = n < ncols;
      const int64_t nn = valid[c] ? n : ncols - 1;  // a column past N reads the last one (never stored): no branch
      int i = 0;
      while (i + 1 < p.targets && nn >= p.n_begin[i + 1]) ++i;
      wrow[c] = p.w[i] + (nn - p.n_begin[i]) * K;
    }
    fast = fast && wrow[c] != nullptr && vec_aligned(wrow[c], K);
  }
  unsigned valid_bits = 0;
#pragma unroll
  for (int c = 0; c < C; ++c) valid_bits |= unsigned(valid[c]) << c;

  float acc[ROWS][C];
#pragma unroll
  for (int m = 0; m < ROWS; ++m)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[m][c] = 0.0f;

  // Whole chunks on the fast path (every load a 16-byte vector: all of W's loads of a chunk issued first), the rest
  // (the chunk that ends past K, or everything when a pointer is misaligned or a column invalid) element-safe. Both
  // visit a lane's vectors in the same order, so the result is the same bits.
  const bool x_ok = vec_aligned(p.x, K) && (MODE != kGemvGated || vec_aligned(p.x2, K));
  const int64_t nchunks = ((K + kN - 1) / kN + kChunkVecs - 1) / kChunkVecs;
  const int64_t full = fast ? K / (kChunkVecs * kN) : 0;
  for (int64_t j = warp; j < full; j += kGemvWarps) {
    const int64_t k0 = (j * kChunkVecs + lane) * kN;
    uint4 wr[U][C];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int c = 0; c < C; ++c) wr[u][c] = __ldcs(reinterpret_cast<const uint4*>(wrow[c] + k0 + u * 32 * kN));
#pragma unroll
    for (int u = 0; u < U; ++u) fma_vectors<T, ROWS, MODE, true>(p, m0, rows, wr[u], k0 + u * 32 * kN, true, acc);
  }
  for (int64_t j = full + ((warp - full) % kGemvWarps + kGemvWarps) % kGemvWarps; j < nchunks; j += kGemvWarps) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (j * kChunkVecs + u * 32 + lane) * kN;
      uint4 wr[C];
#pragma unroll
      for (int c = 0; c < C; ++c)
        wr[c] = load_raw<T, Load::kStreaming>(wrow[c], wrow[c] != nullptr && vec_aligned(wrow[c], K), k, K);
      fma_vectors<T, ROWS, MODE, false>(p, m0, rows, wr, k, x_ok, acc);
    }
  }

  // The block's kGemvThreads partials of each (row, column), thread t = 32 warp + lane at index t, summed by a fixed
  // pairwise tree: s_red[t] += s_red[t + s] for s = kGemvThreads / 2, ..., 1.
  const int t = threadIdx.x;
#pragma unroll
  for (int m = 0; m < ROWS; ++m)
    if (m < rows)
#pragma unroll
      for (int c = 0; c < C; ++c) s_red[m * C + c][t] = acc[m][c];
  __syncthreads();
#pragma unroll
  for (int stride = kGemvThreads / 2; stride >= 1; stride /= 2) {
    if (t < stride)
      for (int q = 0; q < rows * C; ++q) s_red[q][t] += s_red[q][t + stride];
    __syncthreads();
  }

  if (kHead && p.part_val != nullptr) {
    if (t < rows) {
      float best = -INFINITY;
      int64_t best_idx = -1;
#pragma unroll
      for (int c = 0; c < C; ++c) {  // columns in order
        if (n0 + c >= ncols) break;
        const float v = valid[c] ? round_to<T>(s_red[t * C + c][0]) : nan_f32();  // the logit linear() returns, rounded to T
        if (takes(v, best, best_idx)) {
          best = v;
          best_idx = n0 + c;
        }
      }
      p.part_val[(m0 + t) * gridDim.x + blockIdx.x] = best;
      p.part_idx[(m0 + t) * gridDim.x + blockIdx.x] = best_idx;
    }
  } else if (t < rows * C) {
    const int m = t / C, c = t % C;
    const int64_t n = n0 + c;
    const bool ok = (valid_bits >> c) & 1u;
    if (ok || (kHead && n < ncols)) {
      const float s = s_red[m * C + c][0];
      if constexpr (kHead) {
        p.logits[(m0 + m) * ncols + n] = ok ? round_to<T>(s) : nan_f32();
      } else {
        int i = 0;
        while (i + 1 < p.targets && n >= p.n_begin[i + 1]) ++i;
        T* o = p.out[i] + (m0 + m) * (p.n_begin[i + 1] - p.n_begin[i]) + (n - p.n_begin[i]);
        if (MODE == kGemvGated || p.residual)
          *o = from_f32<T>(to_f32(*o) + round_to<T>(s));
        else
          *o = from_f32<T>(s);
      }
    }
  }
}

// The launch: the ROWS variant for M (all give a row the same bits), ceil(M / ROWS) row tiles.
template <typename T, int MODE>
void launch_gemv(const GemvParams<T>& p, cudaStream_t stream) {
  const int64_t ncols = p.n_begin[p.targets];
  const unsigned gx = static_cast<unsigned>((ncols + kGemvCols - 1) / kGemvCols);
  auto go = [&](auto rows_tag) {
    constexpr int R = decltype(rows_tag)::value;
    const dim3 grid(gx, static_cast<unsigned>((p.M + R - 1) / R));
    launch(gemv_kernel<T, R, MODE>, grid, kGemvThreads, 0, stream, p);
  };
  if (p.M <= 1)
    go(std::integral_constant<int, 1>{});
  else if (p.M <= 4)
    go(std::integral_constant<int, 4>{});
  else if (p.M <= 8)
    go(std::integral_constant<int, 8>{});
  else
    go(std::integral_constant<int, kGemvMaxRows>{});
}

template <typename T>
GemvParams<T> dense_params(const void* x, const void* x2, int64_t M, int64_t K, const LinearTarget* targets, int n) {
  GemvParams<T> p{};
  p.x = static_cast<const T*>(x);
  p.x2 = static_cast<const T*>(x2);
  p.M = M;
  p.K = K;
  p.targets = n;
  p.n_begin[0] = 0;
  for (int i = 0; i < n; ++i) {
    p.w[i] = static_cast<const T*>(targets[i].w);
    p.out[i] = static_cast<T*>(targets[i].out);
    p.n_begin[i + 1] = p.n_begin[i] + targets[i].N;
  }
  return p;
}

template <typename T>
GemvParams<T> head_params(const void* normed, const void* w, int64_t rows_w, const int64_t* subset, int64_t M,
                          int64_t H, int64_t V, int* errors) {
  GemvParams<T> p{};
  p.x = static_cast<const T*>(normed);
  p.M = M;
  p.K = H;
  p.w[0] = static_cast<const T*>(w);
  p.targets = 1;
  p.n_begin[1] = V;
  p.subset = subset;
  p.rows_w = rows_w;
  p.errors = errors;
  return p;
}

}  // namespace

void launch_linear_multi(DType dt, const void* x, int64_t M, int64_t K, const LinearTarget* targets, int n,
                         cudaStream_t stream) {
  int64_t N = 0;
  for (int i = 0; i < n; ++i) N += targets[i].N;
  if (M == 0 || N == 0 || n < 1 || n > kMaxTargets) return;
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    launch_gemv<Ty, kGemvDense>(dense_params<Ty>(x, nullptr, M, K, targets, n), stream);
  });
}

void launch_linear(DType dt, const void* x, const void* w, void* out, int64_t M, int64_t K, int64_t N,
                   cudaStream_t stream) {
  const LinearTarget t{w, out, N};
  launch_linear_multi(dt, x, M, K, &t, 1, stream);
}

void launch_linear_residual(DType dt, const void* x, const void* x2, const void* w, void* h, int64_t M, int64_t K,
                            int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  const LinearTarget t{w, h, N};
  auto go = [&](auto tag) {
    using Ty = decltype(tag);
    GemvParams<Ty> p = dense_params<Ty>(x, x2, M, K, &t, 1);
    p.residual = true;
    if (x2 != nullptr)
      launch_gemv<Ty, kGemvGated>(p, stream);
    else
      launch_gemv<Ty, kGemvDense>(p, stream);
  };
  if (dt == DType::kFloat32) go(float{});
  if (dt == DType::kBFloat16) go(__nv_bfloat16{});  // the decoder takes float32 / bfloat16 (validate_layer_range)
}

int64_t head_argmax_blocks(int64_t V) { return (V + kGemvCols - 1) / kGemvCols; }

void launch_head_argmax_partial(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset,
                                int64_t M, int64_t H, int64_t V, float* part_val, int64_t* part_idx, int* errors,
                                cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    GemvParams<Ty> p = head_params<Ty>(normed, w, rows_w, subset, M, H, V, errors);
    p.part_val = part_val;
    p.part_idx = part_idx;
    launch_gemv<Ty, kGemvHead>(p, stream);
  });
}

void launch_head_logits(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset, int64_t M,
                        int64_t H, int64_t V, float* logits, int* errors, cudaStream_t stream) {
  if (M == 0 || V == 0) return;
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    GemvParams<Ty> p = head_params<Ty>(normed, w, rows_w, subset, M, H, V, errors);
    p.logits = logits;
    launch_gemv<Ty, kGemvHead>(p, stream);
  });
}

}  // namespace layerskip::cuda
