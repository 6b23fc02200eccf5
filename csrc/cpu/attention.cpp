// CPU kernels: kv_cache_write and cache_attention (GQA over a static KV cache).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_math.h"
#include "common/dispatch.h"
#include "common/validate.h"

namespace layerskip::cpu {
namespace {

// ---- kv_cache_write --------------------------------------------------------------------------------------------
// Token t of sequence b goes to slot start[b] + t of every key/value head; nothing else is touched.
void kv_cache_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& start) {
  const auto d = validate_kv_cache_write(k_cache, v_cache, k, v, start);
  check_device_type(k, c10::DeviceType::CPU, "kv_cache_write", "k");
  check_start_values("kv_cache_write", start, d.T, d.S);
  if (d.B == 0 || d.T == 0 || d.nKV == 0 || d.D == 0) return;
  const int64_t esize = static_cast<int64_t>(k.element_size());
  const int64_t row_bytes = d.D * esize;
  const auto* kp = static_cast<const char*>(k.const_data_ptr());
  const auto* vp = static_cast<const char*>(v.const_data_ptr());
  auto* kc = static_cast<char*>(k_cache.mutable_data_ptr());
  auto* vc = static_cast<char*>(v_cache.mutable_data_ptr());
  const int64_t* sp = start.const_data_ptr<int64_t>();
  // One item per (b, h): T rows of D elements, contiguous in the cache.
  const int64_t items = d.B * d.nKV;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, d.T * row_bytes));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / d.nKV, h = it % d.nKV;
      const int64_t dst = ((b * d.nKV + h) * d.S + sp[b]) * row_bytes;
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t src = ((b * d.T + t) * d.nKV + h) * row_bytes;
        std::memcpy(kc + dst + t * row_bytes, kp + src, row_bytes);
        std::memcpy(vc + dst + t * row_bytes, vp + src, row_bytes);
      }
    }
  });
}

// ---- cache_attention -------------------------------------------------------------------------------------------
// One query row (b, t, h) at position p = start[b] + t against keys/values [0, p] of head h / group:
//   scores_s = (q . k_s) * scale            (dot: kLanes accumulators + fixed tree)
//   e_s = exp(scores_s - max), l = sum e_s  (kLanes accumulators + fixed tree)
//   out = (sum_s e_s v_s) / l               (s in increasing order, vectorised over D)
// Everything depends only on the row's own q, the cache and p: batch invariant by construction.
// kD > 0 is the head dim known at compile time (common Llama sizes: the accumulators then live in registers);
// kD == 0 takes D at run time. Both do exactly the same arithmetic. scratch: n_keys floats.
template <typename T, int kD>
LS_CPU_CLONES void attend_row(const T* q, const T* K, const T* V, int64_t n_keys, int64_t D_rt, float scale,
                              float* scratch, T* out) {
  const int64_t D = kD > 0 ? kD : D_rt;
  float qf[LAYERSKIP_MAX_HEAD_DIM];
  float acc[LAYERSKIP_MAX_HEAD_DIM];
  for (int64_t i = 0; i < D; ++i) qf[i] = to_f32(q[i]);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n_keys; ++s) {
    const float sc = dot(qf, K + s * D, D) * scale;
    scratch[s] = sc;
    m = sc > m ? sc : m;
  }
  // Key p is always visible, so m is finite for finite inputs; a NaN score propagates as in the reference.
  float lsum[kLanes] = {};
  int64_t s = 0;
  for (; s + kLanes <= n_keys; s += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float e = exp_f32(scratch[s + j] - m);
      scratch[s + j] = e;
      lsum[j] += e;
    }
  for (int j = 0; s + j < n_keys; ++j) {
    const float e = exp_f32(scratch[s + j] - m);
    scratch[s + j] = e;
    lsum[j] += e;
  }
  const float l = lane_sum(lsum);
  for (int64_t i = 0; i < D; ++i) acc[i] = 0.0f;
  for (int64_t k = 0; k < n_keys; ++k) {
    const float p = scratch[k];
    const T* vr = V + k * D;
    for (int64_t i = 0; i < D; ++i) acc[i] += p * to_f32(vr[i]);
  }
  const float inv_l = 1.0f / l;
  for (int64_t i = 0; i < D; ++i) out[i] = from_f32<T>(acc[i] * inv_l);
}

template <typename T>
using AttendRowFn = void (*)(const T*, const T*, const T*, int64_t, int64_t, float, float*, T*);

template <typename T>
AttendRowFn<T> pick_attend_row(int64_t D) {
  switch (D) {
    case 64: return &attend_row<T, 64>;
    case 128: return &attend_row<T, 128>;
    default: return &attend_row<T, 0>;
  }
}

at::Tensor cache_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& start, double scale) {
  const auto d = validate_cache_attention(q, k_cache, v_cache, start);
  check_device_type(q, c10::DeviceType::CPU, "cache_attention", "q");
  check_start_values("cache_attention", start, d.T, d.S);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (d.B == 0 || d.T == 0 || d.nH == 0) return out;
  const int64_t group = d.nH / d.nKV;
  const float fscale = static_cast<float>(scale);
  const int64_t* sp = start.const_data_ptr<int64_t>();
  // Work items ordered (b, kv head, t, head in group) so the rows that read one key/value head run back to back
  // on one thread (its K/V stay in cache). Each item is one row: any split over threads gives the same bits.
  const int64_t items = d.B * d.nKV * d.T * group;
  int64_t max_start = 0;
  for (int64_t b = 0; b < d.B; ++b) max_start = std::max(max_start, sp[b]);
  const int64_t max_keys = max_start + d.T;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, max_keys * d.D));
  LS_DISPATCH_FLOAT(q.scalar_type(), "cache_attention", "q", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const AttendRowFn<scalar_t> row_fn = pick_attend_row<scalar_t>(d.D);
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(static_cast<size_t>(max_keys) + kLanes);
      for (int64_t it = begin; it < end; ++it) {
        int64_t rest = it;
        const int64_t g = rest % group;
        rest /= group;
        const int64_t t = rest % d.T;
        rest /= d.T;
        const int64_t kvh = rest % d.nKV;
        const int64_t b = rest / d.nKV;
        const int64_t h = kvh * group + g;
        const int64_t n_keys = sp[b] + t + 1;
        const int64_t row = ((b * d.T + t) * d.nH + h) * d.D;
        const int64_t cache_off = (b * d.nKV + kvh) * d.S * d.D;
        row_fn(qp + row, kp + cache_off, vp + cache_off, n_keys, d.D, fscale, scratch.data(), op + row);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("kv_cache_write", &kv_cache_write_cpu);
  m.impl("cache_attention", &cache_attention_cpu);
}

}  // namespace layerskip::cpu
