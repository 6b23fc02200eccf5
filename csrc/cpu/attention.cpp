// CPU kernels: kv_cache_write and cache_attention (GQA over a static KV cache).
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
#include "cpu/pool.h"
#include "cpu/rows.h"

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
  parallel_chunks(items, grain, [&](int64_t begin, int64_t end) {
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

// ---- cache_attention ----------------------------------------------------------------------------------------------
// Query row (b, t, h) at position p = start[b] + t attends to keys/values [0, p] of its key/value head: see
// rows.h attend_group / cache_attention_rows.
at::Tensor cache_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& start, double scale) {
  const auto d = validate_cache_attention(q, k_cache, v_cache, start);
  check_device_type(q, c10::DeviceType::CPU, "cache_attention", "q");
  check_start_values("cache_attention", start, d.T, d.S);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (d.B == 0 || d.T == 0 || d.nH == 0) return out;
  LS_DISPATCH_FLOAT(q.scalar_type(), "cache_attention", "q", [&] {
    cache_attention_rows(q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                         v_cache.const_data_ptr<scalar_t>(), start.const_data_ptr<int64_t>(),
                         out.mutable_data_ptr<scalar_t>(), d.B, d.T, d.nH, d.nKV, d.S, d.D, static_cast<float>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("kv_cache_write", &kv_cache_write_cpu);
  m.impl("cache_attention", &cache_attention_cpu);
}

}  // namespace layerskip::cpu
