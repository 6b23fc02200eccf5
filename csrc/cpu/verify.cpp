// CPU kernels: speculative verification (greedy and lossless sampling) with the in-place position update.
//
//   verify_greedy:   accepted[b] = length of the prefix where drafts[b, j] == target[b, j];
//                    next_token[b] = target[b, accepted[b]];  positions[b] += accepted[b] + 1
//   verify_sampling: draft j of sequence b is accepted while uniforms[b, j] * q[b, j, y] < p[b, j, y] (y the draft,
//                    float32 product: accept with probability min(1, p/q)); at the first rejection the correction is
//                    drawn from norm(max(p[b, j] - q[b, j], 0)) (p[b, j] when that has no mass), otherwise the bonus
//                    from p[b, d]; both with uniforms[b, d] through common/sampling.h's inverse CDF.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/sampling.h"
#include "common/validate.h"
#include "cpu/pool.h"

namespace layerskip::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& drafts, const at::Tensor& target,
                                                     const at::Tensor& positions) {
  const auto d = validate_verify_greedy(drafts, target, positions);
  check_device_type(drafts, c10::DeviceType::CPU, "verify_greedy", "drafts");
  at::Tensor accepted = at::empty({d.B}, drafts.options());
  at::Tensor next = at::empty({d.B}, drafts.options());
  const int64_t* dp = drafts.const_data_ptr<int64_t>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  int64_t* pos = positions.mutable_data_ptr<int64_t>();
  int64_t* ap = accepted.mutable_data_ptr<int64_t>();
  int64_t* np = next.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < d.B; ++b) {
    int64_t a = 0;
    while (a < d.d && dp[b * d.d + a] == tp[b * (d.d + 1) + a]) ++a;
    ap[b] = a;
    np[b] = tp[b * (d.d + 1) + a];
    pos[b] += a + 1;
  }
  return {accepted, next};
}

// One token from weights w with uniform u (common/sampling.h); S: scratch for the chunk sums.
int64_t sample(const SampleWeights& w, int64_t V, float u, std::vector<double>& S) {
  const int64_t nchunks = (V + kSampleChunk - 1) / kSampleChunk;
  S.resize(static_cast<size_t>(nchunks));
  for (int64_t c = 0; c < nchunks; ++c) S[c] = sample_chunk_sum(w, c, V);
  return sample_from_chunks(w, S.data(), nchunks, V, u);
}

std::tuple<at::Tensor, at::Tensor> verify_sampling_cpu(const at::Tensor& drafts, const at::Tensor& q,
                                                       const at::Tensor& p, const at::Tensor& uniforms,
                                                       const at::Tensor& positions) {
  const auto d = validate_verify_sampling(drafts, q, p, uniforms, positions);
  check_device_type(drafts, c10::DeviceType::CPU, "verify_sampling", "drafts");
  check_draft_values(drafts, d.V);
  at::Tensor accepted = at::empty({d.B}, drafts.options());
  at::Tensor next = at::empty({d.B}, drafts.options());
  const int64_t* dp = drafts.const_data_ptr<int64_t>();
  const float* qp = q.const_data_ptr<float>();
  const float* pp = p.const_data_ptr<float>();
  const float* up = uniforms.const_data_ptr<float>();
  int64_t* pos = positions.mutable_data_ptr<int64_t>();
  int64_t* ap = accepted.mutable_data_ptr<int64_t>();
  int64_t* np = next.mutable_data_ptr<int64_t>();
  const int64_t D = d.d, V = d.V;
  // Sequences are independent: any split over threads gives the same answer.
  const int64_t grain = std::max<int64_t>(1, 65536 / V);
  parallel_chunks(d.B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<double> S;
    for (int64_t b = b0; b < b1; ++b) {
      const float* ub = up + b * (D + 1);
      int64_t j = 0;
      for (; j < D; ++j) {
        const int64_t y = dp[b * D + j];
        const float qy = qp[(b * D + j) * V + y], py = pp[(b * (D + 1) + j) * V + y];
        if (!(ub[j] * qy < py)) break;
      }
      const float* pj = pp + (b * (D + 1) + j) * V;
      int64_t tok = -1;
      if (j < D) tok = sample({pj, qp + (b * D + j) * V}, V, ub[D], S);  // correction from the residual
      if (tok < 0) tok = sample({pj, nullptr}, V, ub[D], S);               // bonus, or no residual mass
      if (tok < 0) tok = V - 1;                                            // p has no mass either (invalid input)
      ap[b] = j;
      np[b] = tok;
      pos[b] += j + 1;
    }
  });
  return {accepted, next};
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("verify_greedy", &verify_greedy_cpu);
  m.impl("verify_sampling", &verify_sampling_cpu);
}

}  // namespace layerskip::cpu
