// The exit heads' row kernels: the final argmax over the partials of the head GEMV (gemv.cu), and the sampling and
// log-softmax passes over a row of logits (one block per row).
#include "common/head_filter.h"
#include "common/sampling.h"
#include "cuda/device.cuh"

#include <algorithm>

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
struct WarpHistograms {
  uint32_t count[kRowWarps][kSelectBins];
  uint32_t weight_lo[kRowWarps][kSelectBins];
  uint32_t weight_hi[kRowWarps][kSelectBins];
};
struct SelectShared {
  WarpHistograms hist;
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

__device__ __forceinline__ void clear_histograms(WarpHistograms& h) {
  for (int i = threadIdx.x; i < kRowWarps * kSelectBins; i += blockDim.x) {
    (&h.count[0][0])[i] = 0;
    (&h.weight_lo[0][0])[i] = 0;
    (&h.weight_hi[0][0])[i] = 0;
  }
}

// Level `level` of a radix select over row[i0, i1) (this thread: every blockDim.x-th from i0 + threadIdx.x): the
// keys whose higher digits are prefix's, counted and weighed (1 each, or F(value) with mass) by their digit.
__device__ __forceinline__ void add_to_histograms(WarpHistograms& h, const float* row, int64_t i0, int64_t i1,
                                                  int level, uint32_t prefix, bool mass) {
  const int warp = threadIdx.x >> 5, shift = 24 - 8 * level;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const float v = row[i];
    const uint32_t k = order_key(v);
    if (level > 0 && (k >> (shift + 8)) != (prefix >> (shift + 8))) continue;
    const uint32_t dg = (k >> shift) & 0xffu;
    atomicAdd(&h.count[warp][dg], 1u);
    atomic_add_split64(&h.weight_lo[warp][dg], &h.weight_hi[warp][dg], mass ? prob_fixed(v) : 1u);
  }
}

// Bin b's count and weight over the warps' histograms.
__device__ __forceinline__ void histogram_bin(const WarpHistograms& h, int b, uint32_t& c, uint64_t& w) {
  c = 0;
  w = 0;
  for (int wi = 0; wi < kRowWarps; ++wi) {
    c += h.count[wi][b];
    w += (static_cast<uint64_t>(h.weight_hi[wi][b]) << 32) | h.weight_lo[wi][b];
  }
}

// Radix select over the order keys of row[0, V) (common/head_filter.h, the CPU's radix_select): weights 1 each or
// F(value) (mass). On return every thread may read sh.prefix (the selected key) and sh.carried (the weight above).
// Integer sums: exact in any order, so the selection is the CPU's bit for bit.
__device__ void row_radix_select(const float* row, int64_t V, bool mass, uint64_t limit, SelectShared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.carried = 0;
  }
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    clear_histograms(sh.hist);
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    add_to_histograms(sh.hist, row, 0, V, level, prefix, mass);
    __syncthreads();
    for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x) histogram_bin(sh.hist, b, sh.total_count[b],
                                                                                sh.total_weight[b]);
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

// The token a row's uniform u draws from its final weights and chunk sums S (one thread).
__device__ __forceinline__ int64_t draw_token(const float* row, const double* S, int64_t nchunks, int64_t V, float u,
                                              const int64_t* subset, int* errors) {
  if (!(u >= 0.0f && u < 1.0f)) atomicOr(errors, kDeviceErrorUniform);  // the CPU op raises
  int64_t j = sample_from_chunks(SampleWeights{row, nullptr}, S, nchunks, V, u);
  if (j < 0) j = V - 1;  // no mass (non-finite logits): the last column, as verify_sampling
  return subset != nullptr ? subset[j] : j;
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
  if (threadIdx.x == 0) tokens[m] = draw_token(row, S, nchunks, V, uniforms[m], subset, errors);
}

// ---- exit_head_sample over several blocks per row ------------------------------------------------------------
// The same steps as head_sample_rows_kernel, each a launch over a grid (P blocks, M rows): block b owns the chunks
// [b cpb, (b + 1) cpb) of its row (kSampleChunk elements each, so a block's slice is whole chunks), and every value a
// step needs from the whole row is reduced exactly: the max (exact in any order), the chunk sums S (each chunk's own
// sum, by the block that owns it) added in chunk order by every block that needs the total (a few hundred adds),
// the radix-select histograms as integers (global 32-bit count / 64-bit weight atomics: native, and exact in any
// order), the top-p ties by their rank in id order (the blocks before, then the threads before). So the result is
// head_sample_rows_kernel's bit for bit (tested under the emulator), with P = 32 blocks a row at large V instead of
// one.
struct SampleRows {  // one row's scratch in the float64 buffer (head_sample_scratch: per row)
  double* S[2];               // chunk sums, two buffers: a step reads one while it writes the other
  float* block_max;           // [P]
  unsigned long long* ties;   // [P]
  uint32_t* count;            // [2 selects][4 levels][kSelectBins]
  unsigned long long* weight; // [2 selects][4 levels][kSelectBins]
};

__host__ __device__ __forceinline__ int64_t sample_row_doubles(int64_t nchunks, int64_t P) {
  return 2 * nchunks + P + P + 2 * 4 * kSelectBins + (2 * 4 * kSelectBins) / 2;
}

__device__ __forceinline__ SampleRows sample_rows(double* base, int64_t m, int64_t nchunks, int64_t P) {
  double* r = base + m * sample_row_doubles(nchunks, P);
  SampleRows v;
  v.S[0] = r;
  v.S[1] = r + nchunks;
  v.block_max = reinterpret_cast<float*>(r + 2 * nchunks);
  v.ties = reinterpret_cast<unsigned long long*>(r + 2 * nchunks + P);
  v.weight = reinterpret_cast<unsigned long long*>(r + 2 * nchunks + 2 * P);
  v.count = reinterpret_cast<uint32_t*>(r + 2 * nchunks + 2 * P + 2 * 4 * kSelectBins);
  return v;
}

struct Slice {
  int64_t c0, c1, i0, i1;  // the block's chunks [c0, c1) and elements [i0, i1)
};

__device__ __forceinline__ Slice slice_of(int64_t b, int64_t cpb, int64_t nchunks, int64_t V) {
  Slice s;
  s.c0 = b * cpb < nchunks ? b * cpb : nchunks;
  s.c1 = s.c0 + cpb < nchunks ? s.c0 + cpb : nchunks;
  s.i0 = s.c0 * kSampleChunk;
  s.i1 = s.c1 * kSampleChunk < V ? s.c1 * kSampleChunk : V;
  return s;
}

// The prefix (and carried weight) that levels [0, levels) of select sel chose: select_digit on the global totals,
// as row_radix_select does on its block's; run by one thread.
__device__ __forceinline__ void selected_prefix(const SampleRows& r, int sel, int levels, uint64_t limit,
                                                uint32_t& prefix, uint64_t& carried) {
  prefix = 0;
  carried = 0;
  for (int level = 0; level < levels; ++level) {
    const uint32_t* c = r.count + (sel * 4 + level) * kSelectBins;
    const uint64_t* w = reinterpret_cast<const uint64_t*>(r.weight + (sel * 4 + level) * kSelectBins);
    const int dg = select_digit(c, w, limit, carried);
    prefix |= static_cast<uint32_t>(dg < 0 ? 0 : dg) << (24 - 8 * level);
  }
}

__global__ void __launch_bounds__(kRowThreads) sample_zero_kernel(double* scratch, int64_t nchunks, int64_t P) {
  const SampleRows r = sample_rows(scratch, blockIdx.x, nchunks, P);
  for (int i = threadIdx.x; i < 2 * 4 * kSelectBins; i += blockDim.x) {
    r.count[i] = 0;
    r.weight[i] = 0;
  }
}

// Row m's slice / temperature; without top-k, also the block's max (the next step's input).
__global__ void __launch_bounds__(kRowThreads)
    sample_scale_kernel(float* __restrict__ probs, int64_t V, float temperature, bool with_max, double* scratch,
                        int64_t cpb) {
  __shared__ float s_red[kRowThreads];
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk, P = gridDim.x, m = blockIdx.y;
  const Slice sl = slice_of(blockIdx.x, cpb, nchunks, V);
  float* row = probs + m * V;
  float mx = -INFINITY;
  for (int64_t i = sl.i0 + threadIdx.x; i < sl.i1; i += blockDim.x) {
    const float v = __fdiv_rn(row[i], temperature);
    row[i] = v;
    mx = v > mx ? v : mx;
  }
  if (!with_max) return;
  s_red[threadIdx.x] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = -INFINITY;
    for (int t = 0; t < kRowThreads; ++t) r = s_red[t] > r ? s_red[t] : r;
    sample_rows(scratch, m, nchunks, P).block_max[blockIdx.x] = r;
  }
}

// Level `level` of select sel (0: top-k, unit weights; 1: top-p, mass weights) over the block's slice, added into the
// row's global histogram of that level.
__global__ void __launch_bounds__(kRowThreads)
    sample_hist_kernel(const float* __restrict__ probs, int64_t V, double* scratch, int64_t cpb, int sel, int level,
                       uint64_t limit) {
  __shared__ WarpHistograms sh;
  __shared__ uint32_t s_prefix;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk, P = gridDim.x, m = blockIdx.y;
  const SampleRows r = sample_rows(scratch, m, nchunks, P);
  const Slice sl = slice_of(blockIdx.x, cpb, nchunks, V);
  clear_histograms(sh);
  if (threadIdx.x == 0) {
    uint64_t carried;
    selected_prefix(r, sel, level, limit, s_prefix, carried);
  }
  __syncthreads();
  add_to_histograms(sh, probs + m * V, sl.i0, sl.i1, level, s_prefix, sel == 1);
  __syncthreads();
  for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x) {
    uint32_t c;
    uint64_t w;
    histogram_bin(sh, b, c, w);
    if (c != 0) {
      atomicAdd(&r.count[(sel * 4 + level) * kSelectBins + b], c);
      atomicAdd(&r.weight[(sel * 4 + level) * kSelectBins + b], static_cast<unsigned long long>(w));
    }
  }
}

// Top-k: the slice's keys below the k-th largest to -inf; then the block's max.
__global__ void __launch_bounds__(kRowThreads)
    sample_mask_max_kernel(float* __restrict__ probs, int64_t V, double* scratch, int64_t cpb, uint64_t top_k) {
  __shared__ float s_red[kRowThreads];
  __shared__ uint32_t s_kth;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk, P = gridDim.x, m = blockIdx.y;
  const SampleRows r = sample_rows(scratch, m, nchunks, P);
  const Slice sl = slice_of(blockIdx.x, cpb, nchunks, V);
  float* row = probs + m * V;
  if (threadIdx.x == 0) {
    uint64_t carried;
    selected_prefix(r, 0, 4, top_k, s_kth, carried);
  }
  __syncthreads();
  const uint32_t kth = s_kth;
  float mx = -INFINITY;
  for (int64_t i = sl.i0 + threadIdx.x; i < sl.i1; i += blockDim.x) {
    float v = row[i];
    if (order_key(v) < kth) row[i] = v = -INFINITY;
    mx = v > mx ? v : mx;
  }
  s_red[threadIdx.x] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = -INFINITY;
    for (int t = 0; t < kRowThreads; ++t) b = s_red[t] > b ? s_red[t] : b;
    r.block_max[blockIdx.x] = b;
  }
}

// exp(x - max) over the slice (max: the blocks' maxima, exact in any order); the slice's chunk sums into S[0].
__global__ void __launch_bounds__(kRowThreads)
    sample_exp_kernel(float* __restrict__ probs, int64_t V, double* scratch, int64_t cpb) {
  __shared__ float s_mx;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk, P = gridDim.x, m = blockIdx.y;
  const SampleRows r = sample_rows(scratch, m, nchunks, P);
  const Slice sl = slice_of(blockIdx.x, cpb, nchunks, V);
  float* row = probs + m * V;
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int64_t b = 0; b < P; ++b) mx = r.block_max[b] > mx ? r.block_max[b] : mx;
    s_mx = mx;
  }
  __syncthreads();
  const double mx = static_cast<double>(s_mx);
  for (int64_t i = sl.i0 + threadIdx.x; i < sl.i1; i += blockDim.x)
    row[i] = __double2float_rn(exp(__dsub_rn(static_cast<double>(row[i]), mx)));
  __syncthreads();
  const SampleWeights w{row, nullptr};
  for (int64_t c = sl.c0 + threadIdx.x; c < sl.c1; c += blockDim.x) r.S[0][c] = sample_chunk_sum(w, c, V);
}

// The slice / the row's total (S[from] in chunk order); its chunk sums into S[1 - from].
__global__ void __launch_bounds__(kRowThreads)
    sample_normalize_kernel(float* __restrict__ probs, int64_t V, double* scratch, int64_t cpb, int from) {
  __shared__ double s_total;
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk, P = gridDim.x, m = blockIdx.y;
  const SampleRows r = sample_rows(scratch, m, nchunks, P);
  const Slice sl = slice_of(blockIdx.x, cpb, nchunks, V);
  float* row = probs + m * V;
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) t += r.S[from][c];
    s_total = t;
  }
  __syncthreads();
  const double total = s_total;
  for (int64_t i = sl.i0 + threadIdx.x; i < sl.i1; i += blockDim.x)
    row[i] = __double2float_rn(__ddiv_rn(static_cast<double>(row[i]), total));
  __syncthreads();
  const SampleWeights w{row, nullptr};
  for (int64_t c = sl.c0 + threadIdx.x; c < sl.c1; c += blockDim.x) r.S[1 - from][c] = sample_chunk_sum(w, c, V);
}

// Contiguous spans per thread inside the block's slice, so a tie's rank in id order is: the ties of the blocks
// before, of the threads before, and its place in the span.
__device__ __forceinline__ void thread_span(const Slice& sl, int64_t& i0, int64_t& i1) {
  const int64_t span = (sl.i1 - sl.i0 + kRowThreads - 1) / kRowThreads;
  i0 = sl.i0 + int64_t(threadIdx.x) * span < sl.i1 ? sl.i0 + int64_t(threadIdx.x) * span : sl.i1;
  i1 = i0 + span < sl.i1 ? i0 + span : sl.i1;
}

// Top-p: how many of the slice's keys equal the threshold key (into ties[b]).
__global__ void __launch_bounds__(kRowThreads)
    sample_ties_kernel(const float* __restrict__ probs, int64_t V, double* scratch, int64_t cpb, uint64_t limit) {
  __shared__ uint32_t s_vkey;
  __shared__ unsigned long long s_ties[kRowThreads];
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk, P = gridDim.x, m = blockIdx.y;
  const SampleRows r = sample_rows(scratch, m, nchunks, P);
  const Slice sl = slice_of(blockIdx.x, cpb, nchunks, V);
  const float* row = probs + m * V;
  if (threadIdx.x == 0) {
    uint64_t carried;
    selected_prefix(r, 1, 4, limit, s_vkey, carried);
  }
  __syncthreads();
  const uint32_t vkey = s_vkey;
  unsigned long long mine = 0;
  for (int64_t i = sl.i0 + threadIdx.x; i < sl.i1; i += blockDim.x) mine += order_key(row[i]) == vkey;
  s_ties[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long t = 0;
    for (int i = 0; i < kRowThreads; ++i) t += s_ties[i];
    r.ties[blockIdx.x] = t;
  }
}

// Top-p: zero what it drops (below the threshold key, and the ties past the kept ones in id order); the slice's
// chunk sums into S[0].
__global__ void __launch_bounds__(kRowThreads)
    sample_drop_kernel(float* __restrict__ probs, int64_t V, double* scratch, int64_t cpb, uint64_t limit) {
  __shared__ uint32_t s_vkey;
  __shared__ unsigned long long s_keep, s_before;
  __shared__ unsigned long long s_ties[kRowThreads];
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk, P = gridDim.x, m = blockIdx.y;
  const SampleRows r = sample_rows(scratch, m, nchunks, P);
  const Slice sl = slice_of(blockIdx.x, cpb, nchunks, V);
  float* row = probs + m * V;
  int64_t i0, i1;
  thread_span(sl, i0, i1);
  if (threadIdx.x == 0) {
    uint64_t above;
    selected_prefix(r, 1, 4, limit, s_vkey, above);
    unsigned long long before = 0, run = 0;
    for (int64_t b = 0; b < blockIdx.x; ++b) before += r.ties[b];
    for (int64_t b = 0; b < P; ++b) run += r.ties[b];
    s_before = before;
    s_keep = top_p_ties_kept(run, prob_fixed(key_value(s_vkey)), above, limit);
  }
  __syncthreads();
  const uint32_t vkey = s_vkey;
  unsigned long long mine = 0;
  for (int64_t i = i0; i < i1; ++i) mine += order_key(row[i]) == vkey;
  s_ties[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long run = s_before;
    for (int t = 0; t < kRowThreads; ++t) {
      const unsigned long long c = s_ties[t];
      s_ties[t] = run;
      run += c;
    }
  }
  __syncthreads();
  unsigned long long rank = s_ties[threadIdx.x];
  const unsigned long long keep = s_keep;
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t k = order_key(row[i]);
    if (k > vkey || (k == vkey && rank++ < keep)) continue;
    row[i] = 0.0f;
  }
  __syncthreads();
  const SampleWeights w{row, nullptr};
  for (int64_t c = sl.c0 + threadIdx.x; c < sl.c1; c += blockDim.x) r.S[0][c] = sample_chunk_sum(w, c, V);
}

// The draw: one thread per row over the final chunk sums S[from].
__global__ void __launch_bounds__(32)
    sample_draw_kernel(const float* __restrict__ probs, const float* __restrict__ uniforms,
                       const int64_t* __restrict__ subset, int64_t V, double* scratch, int64_t P, int from,
                       int64_t* __restrict__ tokens, int* __restrict__ errors) {
  if (threadIdx.x != 0) return;
  const int64_t m = blockIdx.x, nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  const SampleRows r = sample_rows(scratch, m, nchunks, P);
  tokens[m] = draw_token(probs + m * V, r.S[from], nchunks, V, uniforms[m], subset, errors);
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

// Blocks a row takes: 1 (the one-block kernel, one launch) up to 8 chunks; else about 32, each >= 4 chunks.
int64_t head_sample_blocks(int64_t V) {
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  if (nchunks <= 8) return 1;
  const int64_t cpb = std::max<int64_t>(4, (nchunks + 31) / 32);
  return (nchunks + cpb - 1) / cpb;
}

namespace {
struct SampleGrid {
  int64_t nchunks, cpb, P;  // chunks of a row, chunks a block, blocks a row
  bool multi;               // several launches over (P, M) blocks, not the one-block kernel
};

SampleGrid sample_grid(int64_t V, int64_t blocks_per_row) {
  SampleGrid g;
  g.nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  const int64_t want = blocks_per_row > 0 ? blocks_per_row : head_sample_blocks(V);
  g.multi = want > 1;
  const int64_t w = std::max<int64_t>(1, std::min(want, g.nchunks));
  g.cpb = std::max<int64_t>(1, (g.nchunks + w - 1) / w);
  g.P = (g.nchunks + g.cpb - 1) / g.cpb;  // every block owns >= 1 chunk
  return g;
}
}  // namespace

int64_t head_sample_scratch(int64_t M, int64_t V, int64_t blocks_per_row) {
  const SampleGrid g = sample_grid(V, blocks_per_row);
  return g.multi ? M * sample_row_doubles(g.nchunks, g.P) : head_rows_scratch(M, V);
}

void launch_head_sample_rows(float* probs, const float* uniforms, const int64_t* subset, int64_t M, int64_t V,
                             float temperature, int64_t top_k, double top_p, double* scratch, int64_t* tokens,
                             int* errors, cudaStream_t stream, int64_t blocks_per_row) {
  if (M == 0 || V == 0) return;
  const SampleGrid g = sample_grid(V, blocks_per_row);
  const int64_t nchunks = g.nchunks, cpb = g.cpb, P = g.P;
  if (!g.multi) {
    launch(head_sample_rows_kernel, static_cast<unsigned>(M), kRowThreads, 0, stream, probs, uniforms, subset, V,
           temperature, top_k, top_p, scratch, tokens, errors);
    return;
  }
  // P blocks x M rows per step (the steps of head_sample_rows_kernel, in its order); rows past 65535 in turns.
  for (int64_t m0 = 0; m0 < M; m0 += 65535) {
    const int64_t rows = std::min<int64_t>(65535, M - m0);
    float* pr = probs + m0 * V;
    double* sc = scratch + m0 * sample_row_doubles(nchunks, P);
    const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(rows));
    const bool topk = top_k > 0 && top_k < V, topp = top_p < 1.0;
    if (topk || topp)
      launch(sample_zero_kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream, sc, nchunks, P);
    launch(sample_scale_kernel, grid, kRowThreads, 0, stream, pr, V, temperature, !topk, sc, cpb);
    if (topk) {
      for (int level = 0; level < 4; ++level)
        launch(sample_hist_kernel, grid, kRowThreads, 0, stream, static_cast<const float*>(pr), V, sc, cpb, 0, level,
               static_cast<uint64_t>(top_k));
      launch(sample_mask_max_kernel, grid, kRowThreads, 0, stream, pr, V, sc, cpb, static_cast<uint64_t>(top_k));
    }
    launch(sample_exp_kernel, grid, kRowThreads, 0, stream, pr, V, sc, cpb);
    launch(sample_normalize_kernel, grid, kRowThreads, 0, stream, pr, V, sc, cpb, 0);  // sums of it: S[1]
    int from = 1;
    if (topp) {
      const uint64_t limit = top_p_fixed(top_p);
      for (int level = 0; level < 4; ++level)
        launch(sample_hist_kernel, grid, kRowThreads, 0, stream, static_cast<const float*>(pr), V, sc, cpb, 1, level,
               limit);
      launch(sample_ties_kernel, grid, kRowThreads, 0, stream, static_cast<const float*>(pr), V, sc, cpb, limit);
      launch(sample_drop_kernel, grid, kRowThreads, 0, stream, pr, V, sc, cpb, limit);       // sums: S[0]
      launch(sample_normalize_kernel, grid, kRowThreads, 0, stream, pr, V, sc, cpb, 0);      // sums: S[1]
    }
    launch(sample_draw_kernel, static_cast<unsigned>(rows), 32, 0, stream, static_cast<const float*>(pr),
           uniforms + m0, subset, V, sc, P, from, tokens + m0, errors);
  }
}

void launch_head_log_softmax_rows(float* rows, int64_t M, int64_t V, double* scratch, cudaStream_t stream) {
  if (M == 0 || V == 0) return;
  launch(head_log_softmax_rows_kernel, static_cast<unsigned>(M), kRowThreads, 0, stream, rows, V, scratch);
}

}  // namespace layerskip::cuda
