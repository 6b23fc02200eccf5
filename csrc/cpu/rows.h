// Per-row CPU kernels shared by the standalone ops and the fused ones (exit_head_argmax, layer_range_forward), so
// that a fused result is bitwise the result of the ops one by one. Row-wise and batch invariant: see
// common/cpu_math.h. Internal linkage: each translation unit compiles its own (identical) copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_math.h"
#include "common/limits.h"
#include "cpu/gemm/gemm.h"
#include "cpu/pool.h"

namespace layerskip::cpu {
namespace {

// ---- rms_norm ------------------------------------------------------------------------------------------------
// y = (x * rsqrt(mean(x^2) + eps)) * w, in float32, rounded once to x's dtype (as rms_norm_reference).
template <typename T, typename W>
LS_CPU_CLONES void rms_norm_rows(const T* x, const W* w, T* y, int64_t row_begin, int64_t row_end, int64_t H,
                                 float eps) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * H;
    T* yr = y + r * H;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= H; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float v = to_f32(xr[i + j]);
        acc[j] += v * v;
      }
    for (int j = 0; i + j < H; ++j) {
      const float v = to_f32(xr[i + j]);
      acc[j] += v * v;
    }
    const float mean = lane_sum(acc) / static_cast<float>(H);
    const float inv = 1.0f / std::sqrt(mean + eps);
    for (int64_t k = 0; k < H; ++k) yr[k] = from_f32<T>((to_f32(xr[k]) * inv) * to_f32(w[k]));
  }
}

// ---- rope ------------------------------------------------------------------------------------------------------
// Rotate-half: out[i] = x[i] c[i] - x[i+D/2] s[i], out[i+D/2] = x[i+D/2] c[i] + x[i] s[i] (rope_reference).
// positions[b * pos_stride_b + t] (pos_stride_b = 0: [1, T] positions shared by the batch).
template <typename T>
LS_CPU_CLONES void rope_rows(const T* x, const int64_t* positions, const float* cos, const float* sin, T* out,
                             int64_t bt_begin, int64_t bt_end, int64_t T_, int64_t pos_stride_b, int64_t nH,
                             int64_t D) {
  const int64_t half = D / 2;
  for (int64_t bt = bt_begin; bt < bt_end; ++bt) {
    const int64_t pos = positions[(bt / T_) * pos_stride_b + bt % T_];
    const float* c = cos + pos * half;
    const float* s = sin + pos * half;
    for (int64_t h = 0; h < nH; ++h) {
      const T* xr = x + (bt * nH + h) * D;
      T* yr = out + (bt * nH + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
        yr[i] = from_f32<T>(x1 * c[i] - x2 * s[i]);
        yr[i + half] = from_f32<T>(x2 * c[i] + x1 * s[i]);
      }
    }
  }
}


// ---- attention over the cache, grouped --------------------------------------------------------------------------
// Rows r = 0..R-1 that read the same key/value head (a GQA group x T query tokens). Row r attends to keys
// [0, n_keys[r]) with exactly the arithmetic of one row alone:
//   scores_s = dot(q, k_s) * scale        the gemm.h dot (float32: 16 fused multiply-add lanes + the fixed tree;
//                                         bfloat16: the pair lanes) -- the same for every (row, key)
//   m = max_s scores_s (ascending s); e_s = exp(scores_s - m); l = sum_s e_s (kLanes accumulators + fixed tree)
//   out = (sum_s e_s v_s, ascending s, one fused multiply-add per element) * (1 / l), rounded once
// The rows of a group go through the kernels together, so each key/value vector is read once per group, not once
// per row; a row's result never depends on R, on the other rows or on its place in the group.
// (float16 takes the portable path below with the same definition for float32 arithmetic.)
constexpr int64_t kAttnKeyBlock = 64;

struct AttnScratch {
  float* scores;  // R x ld   (ld >= max n_keys)
  int64_t ld;
  float* qf;      // R x D    queries as float (padded panel for the gemm)
  uint16_t* qb;   // R x D    queries as bfloat16 bits (padded panel)
  float* acc;     // R x D    running sum_s e_s v_s
  float* inv_l;   // R
};

// Scale the scores and turn row r's first n_keys[r] into e_s = exp(s - max); inv_l[r] = 1 / sum e_s.
// Every loop is element-wise or keeps kLanes independent lanes, so the compiler vectorises each one (a running
// scalar maximum or sum would be one serial dependency chain: measured 15% of a 7-token verification layer).
// The maximum taken lane by lane is the same number as the serial one: a NaN score never wins a comparison, so
// both are the largest non-NaN score (up to the sign of a zero, which exp(s - m) cannot see); the sum adds, lane
// j, the e_s of s = j, j + kLanes, ... in increasing s, then lane_sum's fixed tree.
LS_CPU_CLONES inline void softmax_rows(float* scores, int64_t ld, const int64_t* n_keys, int64_t R, float scale,
                                       float* inv_l) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    float* srow = scores + r * ld;
    const int64_t n = n_keys[r];
    const int64_t full = n / kLanes * kLanes;
    for (int64_t s = 0; s < n; ++s) srow[s] = srow[s] * scale;
    float lmax[kLanes];
    for (int j = 0; j < kLanes; ++j) lmax[j] = kNegInf;
    for (int64_t s = 0; s < full; s += kLanes)
      for (int j = 0; j < kLanes; ++j) lmax[j] = srow[s + j] > lmax[j] ? srow[s + j] : lmax[j];
    for (int j = 0; full + j < n; ++j) lmax[j] = srow[full + j] > lmax[j] ? srow[full + j] : lmax[j];
    // Key p is always visible, so m is finite for finite inputs; a NaN score propagates as in the reference.
    float m = kNegInf;
    for (int j = 0; j < kLanes; ++j) m = lmax[j] > m ? lmax[j] : m;
    for (int64_t s = 0; s < n; ++s) srow[s] = exp_f32(srow[s] - m);
    float lsum[kLanes] = {};
    for (int64_t s = 0; s < full; s += kLanes)
      for (int j = 0; j < kLanes; ++j) lsum[j] += srow[s + j];
    for (int j = 0; full + j < n; ++j) lsum[j] += srow[full + j];
    inv_l[r] = 1.0f / lane_sum(lsum);
  }
}

// sum_i a[i] * b[i] as the float32 gemm computes it: lane j accumulates i = j, j + kLanes, ... with fused
// multiply-adds (std::fma: one rounding), the tail zero-padded, then lane_sum's tree. (float16 path only.)
template <typename TA, typename TB>
LS_INLINE float dot_fma(const TA* a, const TB* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = std::fma(to_f32(a[i + j]), to_f32(b[i + j]), acc[j]);
  for (int j = 0; j < kLanes; ++j) acc[j] = std::fma(i + j < n ? to_f32(a[i + j]) : 0.0f,
                                                     i + j < n ? to_f32(b[i + j]) : 0.0f, acc[j]);
  return lane_sum(acc);
}

template <typename T>
void attend_group(const T* const* q_rows, T* const* out_rows, const int64_t* n_keys, int64_t R, const T* K,
                  const T* V, int64_t D, float scale, AttnScratch sc) {
  int64_t max_keys = 0;
  for (int64_t r = 0; r < R; ++r) max_keys = n_keys[r] > max_keys ? n_keys[r] : max_keys;
  gemm::Out so;
  so.f32 = sc.scores;
  so.ld = sc.ld;
  const gemm::Kernels& kern = gemm::active();
  if constexpr (std::is_same_v<T, float>) {
    const int64_t ldq = gemm::padded_k(D, gemm::kBlockF32);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < ldq; ++i) sc.qf[r * ldq + i] = i < D ? q_rows[r][i] : 0.0f;
    kern.f32(sc.qf, R, ldq, K, D, nullptr, max_keys, D, so);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t ldq = gemm::padded_k(D, gemm::kBlockBF16);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < ldq; ++i) sc.qb[r * ldq + i] = i < D ? q_rows[r][i].x : uint16_t(0);
    kern.bf16(sc.qb, R, ldq, reinterpret_cast<const uint16_t*>(K), D, nullptr, max_keys, D, so);
  } else {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < D; ++i) sc.qf[r * D + i] = to_f32(q_rows[r][i]);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t s = 0; s < n_keys[r]; ++s) sc.scores[r * sc.ld + s] = dot_fma(sc.qf + r * D, K + s * D, D);
  }
  softmax_rows(sc.scores, sc.ld, n_keys, R, scale, sc.inv_l);
  for (int64_t i = 0; i < R * D; ++i) sc.acc[i] = 0.0f;
  if constexpr (std::is_same_v<T, float>) {
    kern.pv_f32(sc.scores, R, sc.ld, n_keys, V, D, sc.acc);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    kern.pv_bf16(sc.scores, R, sc.ld, n_keys, reinterpret_cast<const uint16_t*>(V), D, sc.acc);
  } else {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < n_keys[r]; ++k) {
        const float p = sc.scores[r * sc.ld + k];
        for (int64_t i = 0; i < D; ++i) sc.acc[r * D + i] = std::fma(p, to_f32(V[k * D + i]), sc.acc[r * D + i]);
      }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv_l = sc.inv_l[r];
    for (int64_t i = 0; i < D; ++i) out_rows[r][i] = from_f32<T>(sc.acc[r * D + i] * inv_l);
  }
}

// Per-thread scratch of attend_group, grown on demand (never shrunk), so calls do not allocate.
struct AttnBuffers {
  std::vector<float> scores, qf, acc, inv_l;
  std::vector<uint16_t> qb;
  std::vector<const void*> q_rows;
  std::vector<void*> out_rows;
  std::vector<int64_t> n_keys;
  AttnScratch get(int64_t R, int64_t max_keys, int64_t D) {
    const int64_t ld = (max_keys + kLanes - 1) / kLanes * kLanes + kLanes;
    const int64_t Dp = gemm::padded_k(D, gemm::kBlockBF16);
    if (static_cast<int64_t>(scores.size()) < R * ld) scores.resize(static_cast<size_t>(R * ld));
    if (static_cast<int64_t>(qf.size()) < R * Dp) qf.resize(static_cast<size_t>(R * Dp));
    if (static_cast<int64_t>(qb.size()) < R * Dp) qb.resize(static_cast<size_t>(R * Dp));
    if (static_cast<int64_t>(acc.size()) < R * D) acc.resize(static_cast<size_t>(R * D));
    if (static_cast<int64_t>(inv_l.size()) < R) inv_l.resize(static_cast<size_t>(R));
    if (static_cast<int64_t>(q_rows.size()) < R) {
      q_rows.resize(static_cast<size_t>(R));
      out_rows.resize(static_cast<size_t>(R));
      n_keys.resize(static_cast<size_t>(R));
    }
    return {scores.data(), ld, qf.data(), qb.data(), acc.data(), inv_l.data()};
  }
};

inline AttnBuffers& attn_buffers() {
  thread_local AttnBuffers b;
  return b;
}

// The whole cache_attention: q, out [B, T, nH, D]; caches [B, nKV, S, D]; start [B] (validated by the caller).
// The rows of one (b, key/value head) -- GQA group x T tokens -- are computed together so each key/value vector is
// read once for all of them; with several threads a group may be cut into chunks of rows (a row's result does not
// depend on which chunk, thread or call computes it).
template <typename T>
void cache_attention_rows(const T* qp, const T* kp, const T* vp, const int64_t* sp, T* op, int64_t B, int64_t Tn,
                          int64_t nH, int64_t nKV, int64_t S, int64_t D, float scale) {
  if (B == 0 || Tn == 0 || nH == 0) return;
  const int64_t group = nH / nKV;
  const int64_t R = Tn * group;  // rows per (b, kv head), ordered (t, head in group)
  const int64_t threads = pool_threads();
  const int64_t groups = B * nKV;
  // Enough chunks to keep every thread busy; and for long T (prefill) chunks of at most 64 rows, so a chunk's scores
  // stop near its own last token instead of running over the whole causal range.
  const int64_t chunks = std::min<int64_t>(
      R, std::max<int64_t>({int64_t(1), (2 * threads + groups - 1) / groups, (R + 63) / 64}));
  const int64_t items = groups * chunks;
  parallel_items(items, [&](int64_t it) {
    AttnBuffers& buf = attn_buffers();
    {
      const int64_t chunk = it % chunks, bh = it / chunks;
      const int64_t kvh = bh % nKV, b = bh / nKV;
      const int64_t r0 = R * chunk / chunks, r1 = R * (chunk + 1) / chunks;
      const AttnScratch sc = buf.get(r1 - r0, sp[b] + Tn, D);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / group, h = kvh * group + r % group;
        const int64_t row = ((b * Tn + t) * nH + h) * D;
        buf.q_rows[r - r0] = qp + row;
        buf.out_rows[r - r0] = op + row;
        buf.n_keys[r - r0] = sp[b] + t + 1;
      }
      const int64_t cache_off = (b * nKV + kvh) * S * D;
      attend_group<T>(reinterpret_cast<const T* const*>(buf.q_rows.data()),
                      reinterpret_cast<T* const*>(buf.out_rows.data()), buf.n_keys.data(), r1 - r0, kp + cache_off,
                      vp + cache_off, D, scale, sc);
    }
  });
}

}  // namespace
}  // namespace layerskip::cpu
