// The exit heads' row kernels: the final argmax over the partials of the head GEMV (gemv.cu), and the sampling and
// log-softmax passes over a row of logits (one block per row).
#include "common/head_filter.h"
#include "common/sampling.h"
#include "cuda/device.cuh"

namespace layerskip::cuda {
namespace {

// ---- argmax: the partials of a row reduced by one block in a tree -------------------------------------------------
// torch.argmax's order (NaN first, the lowest index among NaNs; then larger; ties to the lower index) is a total
// order on (value, index) pairs, so any reduction tree picks the same pair as a scan in index order.
constexpr int kArgmaxThreads = 256;

__device__ __forceinline__ bool beats(float v, int64_t i, float bv, int64_t bi) {
  if (bi < 0) return i >= 0;
  if (i < 0) return false;
  const bool n = isnan(v), bn = isnan(bv);
  if (n || bn) return n && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

__global__ void __launch_bounds__(kArgmaxThreads)
    head_argmax_final_kernel(const float* __restrict__ part_val, const int64_t* __restrict__ part_idx,
                             const int64_t* __restrict__ subset, int64_t M, int64_t nblk, int64_t* __restrict__ out) {
  __shared__ float s_val[kArgmaxThreads / 32];
  __shared__ int64_t s_idx[kArgmaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    float b = -INFINITY;
    int64_t bi = -1;
    for (int64_t j = threadIdx.x; j < nblk; j += kArgmaxThreads) {
      const float v = part_val[m * nblk + j];
      const int64_t i = part_idx[m * nblk + j];
      if (beats(v, i, b, bi)) {
        b = v;
        bi = i;
      }
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) {
      const float v = __shfl_xor_sync(0xffffffffu, b, off);
      const int64_t i = __shfl_xor_sync(0xffffffffu, bi, off);
      if (beats(v, i, b, bi)) {
        b = v;
        bi = i;
      }
    }
    if (lane == 0) {
      s_val[warp] = b;
      s_idx[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kArgmaxThreads / 32; ++w) {
        if (beats(s_val[w], s_idx[w], b, bi)) {
          b = s_val[w];
          bi = s_idx[w];
        }
      }
      out[m] = bi < 0 ? 0 : (subset != nullptr ? subset[bi] : bi);
    }
    __syncthreads();  // s_val / s_idx are reused by the next row
  }
}

// ---- exit_head_sample / exit_head_log_softmax: one block per row of logits ----------------------------------------
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

// Radix-select histograms: one per warp (a warp's lanes still collide on a hot bin, but warps do not), counts in
// 32 bits and each weight as two 32-bit words, so every update is a native 32-bit shared atomic (a 64-bit shared
// atomicAdd compiles to a CAS spin loop on sm_80 / sm_90, and mass weights crowd a few bins).
constexpr int kRowWarps = kRowThreads / 32;
struct SelectShared {
  uint32_t count[kRowWarps][kSelectBins];
  uint32_t weight_lo[kRowWarps][kSelectBins];
  uint32_t weight_hi[kRowWarps][kSelectBins];
  uint32_t total_count[kSelectBins];
  uint64_t total_weight[kSelectBins];
  uint32_t prefix;
  uint64_t carried;
};

// *lo + *hi * 2^32 += w: the low word's atomic returns its old value, so each addition knows whether it carried and
// adds the carry to the high word; the sum is exact (mod 2^64) in any order of the atomics.
__device__ __forceinline__ void atomic_add_split64(uint32_t* lo, uint32_t* hi, uint64_t w) {
  const uint32_t wl = static_cast<uint32_t>(w);
  const uint32_t old = atomicAdd(lo, wl);
  const uint32_t wh = static_cast<uint32_t>(w >> 32) + (old + wl < old ? 1u : 0u);
  if (wh != 0) atomicAdd(hi, wh);
}

// Radix select over the order keys of row[0, V) (common/head_filter.h, the CPU's radix_select): weights 1 each or
// F(value) (mass). On return every thread may read sh.prefix (the selected key) and sh.carried (the weight above).
// Integer sums: exact in any order, so the selection is the CPU's bit for bit.
__device__ void row_radix_select(const float* row, int64_t V, bool mass, uint64_t limit, SelectShared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.carried = 0;
  }
  const int warp = threadIdx.x >> 5;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int i = threadIdx.x; i < kRowWarps * kSelectBins; i += blockDim.x) {
      (&sh.count[0][0])[i] = 0;
      (&sh.weight_lo[0][0])[i] = 0;
      (&sh.weight_hi[0][0])[i] = 0;
    }
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float v = row[i];
      const uint32_t k = order_key(v);
      if (level > 0 && (k >> (shift + 8)) != (prefix >> (shift + 8))) continue;
      const uint32_t dg = (k >> shift) & 0xffu;
      atomicAdd(&sh.count[warp][dg], 1u);
      atomic_add_split64(&sh.weight_lo[warp][dg], &sh.weight_hi[warp][dg], mass ? prob_fixed(v) : 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x) {
      uint32_t c = 0;
      uint64_t w = 0;
      for (int wi = 0; wi < kRowWarps; ++wi) {
        c += sh.count[wi][b];
        w += (static_cast<uint64_t>(sh.weight_hi[wi][b]) << 32) | sh.weight_lo[wi][b];
      }
      sh.total_count[b] = c;
      sh.total_weight[b] = w;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t carried = sh.carried;
      const int dg = select_digit(sh.total_count, sh.total_weight, limit, carried);
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
  __shared__ double s_lse;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  float* row = rows + int64_t(blockIdx.x) * V;
  double* S = scratch + int64_t(blockIdx.x) * nchunks;
  const float mx = row_max(row, V, s_red);
  const double dmx = static_cast<double>(mx);
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    double s = 0.0;
    const float* rc = row + c * kSampleChunk;
    const int n = static_cast<int>(V - c * kSampleChunk < kSampleChunk ? V - c * kSampleChunk : kSampleChunk);
    for (int i = 0; i < n; ++i) s = __dadd_rn(s, exp(__dsub_rn(static_cast<double>(rc[i]), dmx)));
    S[c] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) t += S[c];
    s_lse = __dadd_rn(dmx, log(t));  // one thread: the log's slow path (a call) stays out of the other threads
  }
  __syncthreads();
  const double lse = s_lse;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    row[i] = __double2float_rn(__dsub_rn(static_cast<double>(row[i]), lse));
}

}  // namespace

void launch_head_argmax(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset, int64_t M,
                        int64_t H, int64_t V, float* part_val, int64_t* part_idx, int64_t* out, int* errors,
                        cudaStream_t stream) {
  if (M == 0) return;
  launch_head_argmax_partial(dt, normed, w, rows_w, subset, M, H, V, part_val, part_idx, errors, stream);
  launch(head_argmax_final_kernel, grid_1d(M, 1), kArgmaxThreads, 0, stream, part_val, part_idx, subset, M,
         head_argmax_blocks(V), out);
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

}  // namespace layerskip::cuda
