// CPU kernel: layer_range_forward -- decoder layers [start, end) of a Llama-family model in one call.
//
// Per layer, exactly the sequence model/llama.py runs with the native op set, with the same kernels and the same
// roundings, so the result is bitwise the ops' one by one:
//   x = rms_norm(h, input_layernorm)                      rows.h rms_norm_rows
//   q, k, v = linear(x, q_proj / k_proj / v_proj)         one parallel region for the three (gemm_jobs)
//   q, k = rope(q), rope(k); kv_cache_write(k, v)         rows.h rope_rows, then memcpy into the cache slots
//   a = cache_attention(q, caches)                        rows.h cache_attention_rows
//   h = h + linear(a, o_proj)                             float32 add, rounded once (as torch's add)
//   x = rms_norm(h, post_attention_layernorm)
//   g, u = linear(x, gate_proj / up_proj)                 one parallel region for the two
//   h = h + linear(silu(g) * u, down_proj)                silu and * by ATen's kernels, as the model (silu_mul)
// Scratch buffers live across calls (grown on demand): no allocation per layer, one output tensor per call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_math.h"
#include "common/validate.h"
#include "cpu/pool.h"
#include "cpu/linear_cpu.h"
#include "cpu/rows.h"

namespace layerskip::cpu {
namespace {

template <typename T>
struct Buf {
  std::vector<T> v;
  T* get(int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    return v.data();
  }
};

template <typename T>
struct FusedScratch {
  Buf<T> xn, q, k, v, qr, kr, attn, o, gate, up, act, down;
  XPanel panel;
};

template <typename T>
FusedScratch<T>& fused_scratch() {
  thread_local FusedScratch<T> s;
  return s;
}

template <typename T>
gemm::Out out_of(T* p, int64_t ld) {
  gemm::Out o;
  o.ld = ld;
  if constexpr (std::is_same_v<T, float>)
    o.f32 = p;
  else
    o.bf16 = reinterpret_cast<uint16_t*>(p);
  return o;
}

template <typename T>
void build_panel(XPanel& panel, const T* x, int64_t M, int64_t K) {
  if constexpr (std::is_same_v<T, float>)
    panel.build_f32(x, M, K);
  else
    panel.build_bf16(x, M, K);
}

template <typename T>
void norm_rows(const T* x, const at::Tensor& w, T* y, int64_t M, int64_t H, float eps) {
  if (w.scalar_type() == at::kFloat)
    rms_norm_rows(x, w.const_data_ptr<float>(), y, 0, M, H, eps);
  else
    rms_norm_rows(x, w.const_data_ptr<T>(), y, 0, M, H, eps);
}

// h += y, in float32, rounded once to T (torch's a + b).
template <typename T>
void residual_add(T* h, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = from_f32<T>(to_f32(h[i]) + to_f32(y[i]));
}

// act = silu(gate) * up over n elements, by ATen's own kernels (bitwise the model's F.silu and *), in chunks of
// kEltChunk elements spread over our pool. A chunk is below ATen's grain size, so ATen runs it serially on the pool
// thread: one call over a prefill's whole [T, I] would wake ATen's OpenMP team, whose threads then spin on and take
// the cores the next gemm needs (measured: ~9% of a 512-token prefill's samples in libgomp, ~10% slower fp32 and
// ~20% slower bf16 layers). Chunks start at multiples of 64 elements, where one whole-tensor pass has its vector
// blocks too (ATen's scalar tail stays the last elements'), so every bit is what the single call gives.
constexpr int64_t kEltChunk = 16384;
constexpr int64_t kAtenGrain = 32768;  // at::internal::GRAIN_SIZE (ATen/TensorIterator.h, a heavy header)
static_assert(kEltChunk % 64 == 0 && kEltChunk < kAtenGrain);

// act_t / gate_t / up_t: the same n elements as tensors, for the one-call case (a decode step: no per-layer wrapping).
template <typename T>
void silu_mul(T* act, const T* gate, const T* up, int64_t n, const at::TensorOptions& opts, at::Tensor& act_t,
              const at::Tensor& gate_t, const at::Tensor& up_t) {
  if (n <= kEltChunk) {
    at::silu_out(act_t, gate_t);
    at::mul_out(act_t, act_t, up_t);
    return;
  }
  parallel_items((n + kEltChunk - 1) / kEltChunk, [&](int64_t c) {
    const int64_t b = c * kEltChunk, len = std::min(kEltChunk, n - b);
    at::Tensor a = at::from_blob(act + b, {len}, opts);
    const at::Tensor g = at::from_blob(const_cast<T*>(gate + b), {len}, opts);
    const at::Tensor u = at::from_blob(const_cast<T*>(up + b), {len}, opts);
    at::silu_out(a, g);
    at::mul_out(a, a, u);
  });
}

template <typename T>
void run_layers(const LayerRangeDims& d, T* hp, at::TensorList weights, at::TensorList k_caches,
                at::TensorList v_caches, const int64_t* start, const int64_t* pos, const float* cos, const float* sin,
                float eps, float scale, const at::TensorOptions& opts) {
  const int64_t M = d.B * d.T, H = d.H, D = d.D, qd = d.nH * D, kvd = d.nKV * D, I = d.I;
  FusedScratch<T>& s = fused_scratch<T>();
  T* xn = s.xn.get(M * std::max(H, qd));
  T* q = s.q.get(M * qd);
  T* k = s.k.get(M * kvd);
  T* v = s.v.get(M * kvd);
  T* qr = s.qr.get(M * qd);
  T* kr = s.kr.get(M * kvd);
  T* attn = s.attn.get(M * qd);
  T* o = s.o.get(M * H);
  T* gate = s.gate.get(M * I);
  T* up = s.up.get(M * I);
  T* act = s.act.get(M * I);
  T* down = s.down.get(M * H);
  const at::Tensor gate_t = at::from_blob(gate, {M * I}, opts);
  const at::Tensor up_t = at::from_blob(up, {M * I}, opts);
  at::Tensor act_t = at::from_blob(act, {M * I}, opts);
  const size_t row_bytes = sizeof(T) * D;
  for (int64_t l = 0; l < d.L; ++l) {
    const at::Tensor* W = weights.data() + l * kLayerWeights;
    T* kc = k_caches[l].mutable_data_ptr<T>();
    T* vc = v_caches[l].mutable_data_ptr<T>();
    // attention block
    norm_rows(hp, W[0], xn, M, H, eps);
    build_panel(s.panel, xn, M, H);
    const GemmJob qkv[3] = {{&W[1], out_of(q, qd)}, {&W[2], out_of(k, kvd)}, {&W[3], out_of(v, kvd)}};
    gemm_jobs(s.panel, qkv, 3);
    rope_rows(q, pos, cos, sin, qr, 0, M, d.T, d.pos_stride_b, d.nH, D);
    rope_rows(k, pos, cos, sin, kr, 0, M, d.T, d.pos_stride_b, d.nKV, D);
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t t = 0; t < d.T; ++t)
        for (int64_t hh = 0; hh < d.nKV; ++hh) {
          const int64_t dst = ((b * d.nKV + hh) * d.S + start[b] + t) * D;
          const int64_t src = ((b * d.T + t) * d.nKV + hh) * D;
          std::memcpy(kc + dst, kr + src, row_bytes);
          std::memcpy(vc + dst, v + src, row_bytes);
        }
    cache_attention_rows(qr, kc, vc, start, attn, d.B, d.T, d.nH, d.nKV, d.S, D, scale);
    build_panel(s.panel, attn, M, qd);
    const GemmJob oj{&W[4], out_of(o, H)};
    gemm_jobs(s.panel, &oj, 1);
    residual_add(hp, o, M * H);
    // MLP block
    norm_rows(hp, W[5], xn, M, H, eps);
    build_panel(s.panel, xn, M, H);
    const GemmJob gu[2] = {{&W[6], out_of(gate, I)}, {&W[7], out_of(up, I)}};
    gemm_jobs(s.panel, gu, 2);
    silu_mul(act, gate, up, M * I, opts, act_t, gate_t, up_t);
    build_panel(s.panel, act, M, I);
    const GemmJob dj{&W[8], out_of(down, H)};
    gemm_jobs(s.panel, &dj, 1);
    residual_add(hp, down, M * H);
  }
}

at::Tensor layer_range_forward_cpu(const at::Tensor& h, at::TensorList weights, at::TensorList k_caches,
                                   at::TensorList v_caches, const at::Tensor& start, const at::Tensor& positions,
                                   const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                                   int64_t num_kv_heads, double eps, double scale) {
  constexpr const char* op = "layer_range_forward";
  const auto d = validate_layer_range(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads,
                                      num_kv_heads);
  check_device_type(h, c10::DeviceType::CPU, op, "h");
  at::Tensor out = at::empty(h.sizes(), h.options());
  if (h.numel() > 0) std::memcpy(out.mutable_data_ptr(), h.const_data_ptr(), h.nbytes());
  if (d.L == 0 || d.B == 0 || d.T == 0) return out;
  check_start_values(op, start, d.T, d.S);
  const int64_t* pp = positions.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < positions.numel(); ++i) {
    TORCH_CHECK(pp[i] >= 0 && pp[i] < d.P, op, ": positions[", i / d.T, ", ", i % d.T, "] = ", pp[i],
                " is out of range [0, P) with P = cos.size(0) = ", d.P);
  }
  const float feps = static_cast<float>(eps), fscale = static_cast<float>(scale);
  if (h.scalar_type() == at::kFloat)
    run_layers<float>(d, out.mutable_data_ptr<float>(), weights, k_caches, v_caches, start.const_data_ptr<int64_t>(),
                      pp, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), feps, fscale, h.options());
  else
    run_layers<c10::BFloat16>(d, out.mutable_data_ptr<c10::BFloat16>(), weights, k_caches, v_caches,
                              start.const_data_ptr<int64_t>(), pp, cos.const_data_ptr<float>(),
                              sin.const_data_ptr<float>(), feps, fscale, h.options());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("layer_range_forward", &layer_range_forward_cpu); }

}  // namespace layerskip::cpu
