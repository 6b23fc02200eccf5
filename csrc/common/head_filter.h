// The sampling filter of exit_head_sample (temperature, top-k, top-p, renormalisation), shared bit for bit by the
// CPU kernel (csrc/cpu/exit_head.cpp), the CUDA kernel (csrc/cuda/kernels.cu) and mirrored by ops.py
// `sampling_probs_reference`. Host and device code, no torch headers.
//
// Per row of logits l[0..V) (float32, as the linear op returns them), temperature t (float32), top_k, top_p:
//   x_i   = l_i / t                                          float32 division
//   top-k (0 < top_k < V): kth = the top_k-th largest x (duplicates counted); x_i < kth -> -inf (ties at kth stay)
//   m     = max x;  e_i = float32(exp(double(x_i) - double(m)))
//   p_i   = float32(e_i / S(e))                              S: common/sampling.h's float64 chunked sum
//   top-p (top_p < 1): the tokens in (p descending, id ascending) order; token r is kept iff r == 0 or the mass
//         before it, F(p_0) + ... + F(p_{r-1}), is < F(top_p), with F(v) = floor(v * 2^60) as an unsigned 64-bit
//         integer (F(top_p) at least 1). Integer sums are exact, so the kept set does not depend on any summation
//         order: the GPU finds it by radix select, the CPU the same way, PyTorch by a sort. The rest -> 0, then
//         p_i = float32(p_i / S(p)) (renormalised, as generation/sampling.py's filtered_probs).
//   token = common/sampling.h's inverse CDF of the final p with the row's uniform.
// Keys: order_key maps a float to a uint32 that sorts like the float (-0 as +0), so "x >= kth" is "key >= kth key"
// and a select over keys is a select over values.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LS_HD __host__ __device__ __forceinline__
#else
#define LS_HD inline
#endif

namespace layerskip {

constexpr double kProbFixedOne = 1152921504606846976.0;  // 2^60: F's unit (sum of V <= 2^20 probabilities < 2^63)
constexpr int kSelectBins = 256;                         // radix select: 8 bits per level, 4 levels

LS_HD uint32_t order_key(float v) {
  if (v == 0.0f) v = 0.0f;  // -0 sorts as +0 (they compare equal)
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

LS_HD float key_value(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

// F(p) for a probability p in [0, 1] (exact: p * 2^60 is a power-of-two scaling of a float32).
LS_HD uint64_t prob_fixed(float p) { return p > 0.0f ? static_cast<uint64_t>(static_cast<double>(p) * kProbFixedOne) : 0; }

LS_HD uint64_t top_p_fixed(double top_p) {
  const double t = top_p * kProbFixedOne;
  return t >= 1.0 ? static_cast<uint64_t>(t) : 1;  // at least the first token's "before" (0) passes
}

// One level of a radix select from the top. count[d] / weight[d]: number and total weight of the candidates whose
// current digit is d; carried: weight of everything above the candidates. Returns the lowest non-empty digit whose
// "weight above" (carried + weight of the higher digits) is < limit, and sets carried to that weight above.
//   count weights (1 each), limit k:      the digit holding the k-th largest key (the top-k threshold)
//   mass weights F(p),      limit F(top_p): the digit holding the last kept key of top-p
// The top non-empty digit always qualifies when carried < limit on entry, which every caller guarantees.
LS_HD int select_digit(const uint32_t* count, const uint64_t* weight, uint64_t limit, uint64_t& carried) {
  uint64_t above = carried, found_above = carried;
  int found = -1;
  for (int d = kSelectBins - 1; d >= 0; --d) {
    if (count[d] == 0) continue;
    if (above >= limit) break;
    found = d;
    found_above = above;
    above += weight[d];
  }
  carried = found_above;
  return found;
}

// How many of the n tokens whose p equals the top-p threshold value (each of weight f, in id order) are kept, given
// the weight A < limit above them: those whose "before" A + r f is < limit.
LS_HD uint64_t top_p_ties_kept(uint64_t n, uint64_t f, uint64_t A, uint64_t limit) {
  if (f == 0) return n;
  const uint64_t k = (limit - A + f - 1) / f;
  return k < n ? k : n;
}

}  // namespace layerskip

#undef LS_HD
