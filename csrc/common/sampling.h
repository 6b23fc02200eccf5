// Inverse-CDF sampling shared bit for bit by the CPU and CUDA verification kernels (host and device code, no
// torch headers) and mirrored by ops.py `sample_inverse_cdf_reference`.
//
// Weights w[0..V) >= 0 (float32) and u in [0, 1). All sums in float64, each in ascending order:
//   S_c    = w[cC] + ... + w[cC + C - 1]          chunk sums, C = kSampleChunk elements (the last chunk shorter)
//   total  = S_0 + S_1 + ...                       and the running prefix P_c = S_0 + ... + S_{c-1}
//   target = u * total
//   chunk  = the first c with P_c + S_c > target
//   token  = the first i of that chunk with P_c + w[cC] + ... + w[i] > target (added in that order from P_c);
//            if rounding leaves none, the last i of the chunk with w[i] > 0
// The two levels let a GPU block compute the chunk sums in parallel and still agree with the CPU exactly.
// No chunk found (total mass 0, or NaN): returns -1 and the caller falls back.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LS_HD __host__ __device__ __forceinline__
#else
#define LS_HD inline
#endif

namespace layerskip {

constexpr int64_t kSampleChunk = 256;

// Weight i of the distribution being sampled: p[i], or the residual max(p[i] - q[i], 0) (float32 arithmetic).
struct SampleWeights {
  const float* p;
  const float* q;  // null: plain p
  LS_HD float operator()(int64_t i) const {
    if (q == nullptr) return p[i];
    const float r = p[i] - q[i];
    return r > 0.0f ? r : 0.0f;
  }
};

LS_HD double sample_chunk_sum(const SampleWeights& w, int64_t c, int64_t V) {
  double s = 0.0;
  const int64_t end = (c + 1) * kSampleChunk < V ? (c + 1) * kSampleChunk : V;
  for (int64_t i = c * kSampleChunk; i < end; ++i) s += static_cast<double>(w(i));
  return s;
}

// Given the chunk sums S[0..nchunks), u: the token (or -1).
LS_HD int64_t sample_from_chunks(const SampleWeights& w, const double* S, int64_t nchunks, int64_t V, float u) {
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) total += S[c];
  const double target = static_cast<double>(u) * total;
  double prefix = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (prefix + S[c] > target) {
      double run = prefix;
      int64_t last_pos = -1;
      const int64_t end = (c + 1) * kSampleChunk < V ? (c + 1) * kSampleChunk : V;
      for (int64_t i = c * kSampleChunk; i < end; ++i) {
        const float wi = w(i);
        run += static_cast<double>(wi);
        if (wi > 0.0f) last_pos = i;
        if (run > target) return i;
      }
      return last_pos;
    }
    prefix += S[c];
  }
  return -1;
}

}  // namespace layerskip

#undef LS_HD
