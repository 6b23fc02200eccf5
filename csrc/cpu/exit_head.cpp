// CPU kernels: the exit head fused with what its caller needs.
//   exit_head_sample:      tokens drawn from the filtered distribution (temperature / top-k / top-p) by inverse CDF
//                          from the caller's uniforms, and that distribution (what verify_sampling takes as q / p)
//   exit_head_log_softmax: log-probabilities (scoring, evaluation)
//   exit_head_top2:        the argmax and the two largest logits (dynamic drafting's stop features: no softmax)
// The logits are linear(rms_norm(h, norm_weight), lm_head) exactly as the native ops compute them (the same panel
// and gemm kernel as exit_head_argmax / linear, rounded to h's dtype), written straight into the float32 output.
// Everything after the gemm is per row, in a fixed order (common/head_filter.h, common/sampling.h), so a row's
// result depends on nothing but that row: batch- and thread-invariant.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/cpu_math.h"
#include "common/head_filter.h"
#include "common/poison.h"
#include "common/sampling.h"
#include "common/validate.h"
#include "cpu/linear_cpu.h"
#include "cpu/pool.h"

namespace layerskip::cpu {
namespace {

// logits[M, ld >= V] (float32) = linear(rms_norm(h), lm_head[vocab_subset]) as the native ops return it (rounded to
// h's dtype, then widened): h[M, H], norm_weight[H], lm_head[rows, H], subset[V] or null.
void head_logits(const at::Tensor& h, const at::Tensor& norm_weight, float eps, const at::Tensor& lm_head,
                 const int64_t* subset, int64_t M, int64_t H, int64_t V, float* logits, int64_t ld) {
  XPanel panel;
  build_head_panel(panel, h, norm_weight, eps, M, H);
  const bool bf16 = h.scalar_type() == at::kBFloat16;
  const int64_t elt = lm_head.element_size();
  // Column blocks (the argmax head's split): each column's bits come from the gemm's fixed per-column order.
  const int64_t nb = gemm_block_cols(V, H, elt, M, 4 * pool_threads(), 2048);
  const int64_t nblocks = (V + nb - 1) / nb;
  const int64_t work = V * H * (elt + 4 * M);
  parallel_items(
      nblocks,
      [&](int64_t b) {
        const int64_t j0 = b * nb, nw = std::min(nb, V - j0);
        gemm::Out o;
        o.f32 = logits + j0;
        o.ld = ld;
        gemm_block(panel, lm_head, j0, nw, subset != nullptr ? subset + j0 : nullptr, o);
        if (bf16) {  // linear() returns bfloat16 for bfloat16 inputs: the logit is that rounded value
          for (int64_t m = 0; m < M; ++m) {
            float* row = logits + m * ld + j0;
            for (int64_t j = 0; j < nw; ++j) row[j] = to_f32(from_f32<c10::BFloat16>(row[j]));
          }
        }
      },
      work < (int64_t(1) << 16) ? 1 : pool_threads());
}

// S(w): common/sampling.h's float64 chunk sums of w[0, V) into S, and their total in chunk order.
double chunked_sum(const SampleWeights& w, int64_t V, std::vector<double>& S) {
  const int64_t n = (V + kSampleChunk - 1) / kSampleChunk;
  S.resize(static_cast<size_t>(n));
  double total = 0.0;
  for (int64_t c = 0; c < n; ++c) S[c] = sample_chunk_sum(w, c, V);
  for (int64_t c = 0; c < n; ++c) total += S[c];
  return total;
}

// Radix select over the order keys of row[0, V) (common/head_filter.h): weights 1 each (mass = false) or F(value);
// returns the selected key and the weight of the keys above it. limit >= 1 and V >= 1, so every level finds a digit.
std::pair<uint32_t, uint64_t> radix_select(const float* row, int64_t V, bool mass, uint64_t limit) {
  uint32_t prefix = 0;
  uint64_t carried = 0;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    uint32_t count[kSelectBins] = {};
    uint64_t weight[kSelectBins] = {};
    for (int64_t i = 0; i < V; ++i) {
      const uint32_t k = order_key(row[i]);
      if (level > 0 && (k >> (shift + 8)) != (prefix >> (shift + 8))) continue;  // outside the chosen digits
      const uint32_t dg = (k >> shift) & 0xffu;
      ++count[dg];
      weight[dg] += mass ? prob_fixed(row[i]) : 1;
    }
    const int dg = select_digit(count, weight, limit, carried);
    TORCH_CHECK(dg >= 0, "exit_head_sample: internal error: radix select found no digit");
    prefix |= static_cast<uint32_t>(dg) << shift;
  }
  return {prefix, carried};
}

// One row, in place: logits[V] in, the filtered probabilities out (common/head_filter.h). Returns the column drawn
// with u (-1: no mass, e.g. NaN logits).
int64_t filter_and_sample_row(float* row, int64_t V, float t, int64_t top_k, double top_p, float u,
                              std::vector<double>& S) {
  for (int64_t i = 0; i < V; ++i) row[i] = row[i] / t;
  if (top_k > 0 && top_k < V) {
    const uint32_t kth = radix_select(row, V, false, static_cast<uint64_t>(top_k)).first;
    for (int64_t i = 0; i < V; ++i)
      if (order_key(row[i]) < kth) row[i] = -std::numeric_limits<float>::infinity();
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) m = row[i] > m ? row[i] : m;
  for (int64_t i = 0; i < V; ++i) row[i] = static_cast<float>(std::exp(static_cast<double>(row[i]) - double(m)));
  const double total = chunked_sum({row, nullptr}, V, S);
  for (int64_t i = 0; i < V; ++i) row[i] = static_cast<float>(static_cast<double>(row[i]) / total);
  if (top_p < 1.0) {
    const uint64_t limit = top_p_fixed(top_p);
    const auto [vkey, above] = radix_select(row, V, true, limit);
    uint64_t ties = 0;
    for (int64_t i = 0; i < V; ++i) ties += order_key(row[i]) == vkey;
    const uint64_t keep = top_p_ties_kept(ties, prob_fixed(key_value(vkey)), above, limit);
    uint64_t r = 0;  // rank among the ties, in id order
    for (int64_t i = 0; i < V; ++i) {
      const uint32_t k = order_key(row[i]);
      if (k > vkey || (k == vkey && r++ < keep)) continue;
      row[i] = 0.0f;
    }
    const double z = chunked_sum({row, nullptr}, V, S);
    for (int64_t i = 0; i < V; ++i) row[i] = static_cast<float>(static_cast<double>(row[i]) / z);
  }
  chunked_sum({row, nullptr}, V, S);
  return sample_from_chunks({row, nullptr}, S.data(), static_cast<int64_t>(S.size()), V, u);
}

std::vector<int64_t> row_shape(const at::Tensor& h) { return {h.sizes().begin(), h.sizes().end() - 1}; }

std::tuple<at::Tensor, at::Tensor> exit_head_sample_cpu(const at::Tensor& h, const at::Tensor& norm_weight,
                                                        double eps, const at::Tensor& lm_head,
                                                        const at::Tensor& uniforms, double temperature, int64_t top_k,
                                                        double top_p, const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_sample";
  const auto d = validate_exit_head_sample(h, norm_weight, lm_head, uniforms, temperature, top_k, top_p,
                                           vocab_subset);
  check_device_type(h, c10::DeviceType::CPU, op, "h");
  if (d.subset) check_subset_values(*vocab_subset, lm_head.size(0), op);
  check_uniform_values(uniforms, op);
  std::vector<int64_t> shape = row_shape(h);
  at::Tensor tokens = at::empty(shape, h.options().dtype(at::kLong));
  shape.push_back(d.V);
  at::Tensor probs = at::empty(shape, h.options().dtype(at::kFloat));
  if (poison_outputs().load()) {
    tokens.fill_(-1);
    probs.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (d.M == 0) return {tokens, probs};
  const int64_t* subset = d.subset ? vocab_subset->const_data_ptr<int64_t>() : nullptr;
  float* pp = probs.mutable_data_ptr<float>();
  head_logits(h, norm_weight, static_cast<float>(eps), lm_head, subset, d.M, d.H, d.V, pp, d.V);
  const float* up = uniforms.const_data_ptr<float>();
  int64_t* tp = tokens.mutable_data_ptr<int64_t>();
  const float t = static_cast<float>(temperature);
  // Rows are independent: any split over threads gives the same bits.
  parallel_chunks(d.M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<double> S;
    for (int64_t m = m0; m < m1; ++m) {
      int64_t j = filter_and_sample_row(pp + m * d.V, d.V, t, top_k, top_p, up[m], S);
      if (j < 0) j = d.V - 1;  // no mass (non-finite logits): the last column, as verify_sampling
      tp[m] = subset != nullptr ? subset[j] : j;
    }
  });
  return {tokens, probs};
}

at::Tensor exit_head_log_softmax_cpu(const at::Tensor& h, const at::Tensor& norm_weight, double eps,
                                     const at::Tensor& lm_head, const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_log_softmax";
  const auto d = validate_exit_head_log_softmax(h, norm_weight, lm_head, vocab_subset);
  check_device_type(h, c10::DeviceType::CPU, op, "h");
  if (d.subset) check_subset_values(*vocab_subset, lm_head.size(0), op);
  std::vector<int64_t> shape = row_shape(h);
  shape.push_back(d.V);
  at::Tensor out = at::empty(shape, h.options().dtype(at::kFloat));
  if (poison_outputs().load()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (d.M == 0) return out;
  float* op_ = out.mutable_data_ptr<float>();
  head_logits(h, norm_weight, static_cast<float>(eps), lm_head, d.subset ? vocab_subset->const_data_ptr<int64_t>()
                                                                         : nullptr,
              d.M, d.H, d.V, op_, d.V);
  const int64_t V = d.V, nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  parallel_chunks(d.M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* row = op_ + m * V;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < V; ++i) mx = row[i] > mx ? row[i] : mx;
      // log(sum exp(x - max)) in float64: chunk sums in ascending order, then the chunks in order (as the CUDA
      // kernel, whose threads take one chunk each).
      double total = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) {
        double s = 0.0;
        for (int64_t i = c * kSampleChunk; i < std::min(V, (c + 1) * kSampleChunk); ++i)
          s += std::exp(static_cast<double>(row[i]) - double(mx));
        total += s;
      }
      const double lse = double(mx) + std::log(total);
      for (int64_t i = 0; i < V; ++i) row[i] = static_cast<float>(static_cast<double>(row[i]) - lse);
    }
  });
  return out;
}

// -> tokens[...] int64 (the argmax, ties: the lowest column, ids through vocab_subset as exit_head_argmax), top2[..., 2]
// float32: the largest logit and the next one (equal on a tie). Their difference is the log-probability margin
// between the two most probable tokens, which needs no log-sum-exp: the draft's stop model reads only that.
std::tuple<at::Tensor, at::Tensor> exit_head_top2_cpu(const at::Tensor& h, const at::Tensor& norm_weight, double eps,
                                                      const at::Tensor& lm_head,
                                                      const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_top2";
  const auto d = validate_exit_head(op, h, norm_weight, lm_head, vocab_subset);
  check_device_type(h, c10::DeviceType::CPU, op, "h");
  if (d.subset) check_subset_values(*vocab_subset, lm_head.size(0), op);
  std::vector<int64_t> shape = row_shape(h);
  at::Tensor tokens = at::empty(shape, h.options().dtype(at::kLong));
  shape.push_back(2);
  at::Tensor top2 = at::empty(shape, h.options().dtype(at::kFloat));
  if (poison_outputs().load()) {
    tokens.fill_(-1);
    top2.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (d.M == 0) return {tokens, top2};
  TORCH_CHECK(d.V >= 2, op, ": needs at least 2 vocabulary columns, got V = ", d.V);
  const int64_t* subset = d.subset ? vocab_subset->const_data_ptr<int64_t>() : nullptr;
  std::vector<float> logits(static_cast<size_t>(d.M * d.V));
  head_logits(h, norm_weight, static_cast<float>(eps), lm_head, subset, d.M, d.H, d.V, logits.data(), d.V);
  int64_t* tp = tokens.mutable_data_ptr<int64_t>();
  float* vp = top2.mutable_data_ptr<float>();
  for (int64_t m = 0; m < d.M; ++m) {
    const float* row = logits.data() + m * d.V;
    int64_t best = 0;
    float first = row[0], second = -std::numeric_limits<float>::infinity();
    for (int64_t j = 1; j < d.V; ++j) {
      const float x = row[j];
      if (x > first) {
        second = first;
        first = x;
        best = j;
      } else if (x > second) {
        second = x;
      }
    }
    tp[m] = subset != nullptr ? subset[best] : best;
    vp[2 * m] = first;
    vp[2 * m + 1] = second;
  }
  return {tokens, top2};
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("exit_head_sample", &exit_head_sample_cpu);
  m.impl("exit_head_log_softmax", &exit_head_log_softmax_cpu);
  m.impl("exit_head_top2", &exit_head_top2_cpu);
}

}  // namespace layerskip::cpu
