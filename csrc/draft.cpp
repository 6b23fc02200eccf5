// draft_greedy -- the whole greedy draft stage of a self-speculative round in one native call.
//
// Not a kernel of its own: d + 1 steps of embedding -> layer_range_forward (layers < E) -> exit_head_argmax, calling
// those ops through the dispatcher, so it runs the same kernels on the same device as the Python loop it replaces
// (generation/self_speculative.py) and gives bitwise its result. What it saves is the Python between them: per
// draft token a forward state, an embedding call, a layer-range call and a head call with their argument handling,
// which on a small model is several percent of a round. On a GPU the argmax never leaves the device (no host sync).
// Registered for CPU and CUDA alike (the ops it calls have both twins).
//
// Dynamic drafting (stop_below > 0): the stage drafts while the rows' mean chance that their drafts so far are all
// accepted stays >= stop_below (one row: its own chance); at the first step where it falls below, that step's drafts
// are dropped and the stage ends with d' < num_drafts drafts (d' + 1 hidden states). Every row proposes its real
// tokens while the stage runs (they cost nothing more: the step runs for the batch anyway, and verification
// accepts what the full model agrees with), so the output is unchanged whatever the threshold. The mean, not the
// most confident row, decides: in a batch one sure row would otherwise make every round as long as its run. Both
// chances below are computed by one loop on the host, from B tokens and B (or 2B) values copied there per step (on
// a GPU, the one sync that stopping needs anyway):
//   - threshold: the chance is the least of the row's drafts' own probabilities under the exit head
//     (exit_head_log_softmax's largest), so one row drafts while each of its drafts is that probable;
//   - stop model (stop_model[6] float64 on the CPU: generation/draft_stop.py fits it): the chance that the row's
//     whole run of drafts is accepted, the product of sigmoid(w0 + w1 margin + w2..w5 [match >= 1..4]) over them,
//     with margin = the exit head's largest logit minus the next (exit_head_top2: no softmax) and match = the
//     longest k <= 4 such that the row's last k tokens followed by the draft occur earlier in its context
//     (context[B, C] int64 on the CPU, context_len[B]: each row's prompt and emitted tokens, ending with tokens[b];
//     the drafts of the round extend it).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/max.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/poison.h"

namespace layerskip {
namespace {

using LayerRangeFn = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                                double);
using ExitHeadArgmaxFn = at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
                                    const std::optional<at::Tensor>&);
using ExitHeadLogSoftmaxFn = ExitHeadArgmaxFn;
using ExitHeadTop2Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                                          const at::Tensor&, const std::optional<at::Tensor>&);

constexpr int64_t kStopModelSize = 6;  // w0 (bias), w1 (margin), w2..w5 (match >= 1, 2, 3, 4)
constexpr int64_t kLongestMatch = 4;

// The longest k <= kLongestMatch such that seq[n - k, n) followed by next occurs in seq[0, n) (0: next never follows
// seq's last token there). O(n x k): contexts are thousands of tokens at most.
int64_t match_level(const std::vector<int64_t>& seq, int64_t next) {
  const int64_t n = static_cast<int64_t>(seq.size());
  int64_t best = 0;
  for (int64_t j = 1; j < n && best < kLongestMatch; ++j) {
    if (seq[j] != next) continue;
    int64_t k = 0;
    while (k < kLongestMatch && j - 1 - k >= 0 && seq[j - 1 - k] == seq[n - 1 - k]) ++k;
    best = std::max(best, k);
  }
  return best;
}

double log_sigmoid(double z) { return z >= 0 ? -std::log1p(std::exp(-z)) : z - std::log1p(std::exp(z)); }

// tokens[B] int64: each row's newest token (not yet in the cache), at position start[B]; embed[V, H];
// weights / caches / cos / sin / heads / eps / scale: layer_range_forward's, for layers [0, E);
// norm_weight / norm_eps / lm_head / vocab_subset: exit_head_argmax's.
// -> drafts[B, d] int64, hidden[B, d + 1, H]: layer E's output for tokens, drafts[:, 0], ..., drafts[:, d - 1]
// (d' <= d of them with stop_below > 0: see above). stop_model / context / context_len: see above (all or none).
std::tuple<at::Tensor, at::Tensor> draft_greedy(const at::Tensor& tokens, const at::Tensor& embed,
                                                at::TensorList weights, at::TensorList k_caches,
                                                at::TensorList v_caches, const at::Tensor& start,
                                                const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                                                int64_t num_kv_heads, double eps, double scale,
                                                const at::Tensor& norm_weight, double norm_eps,
                                                const at::Tensor& lm_head, const std::optional<at::Tensor>& vocab_subset,
                                                int64_t num_drafts, double stop_below,
                                                const std::optional<at::Tensor>& stop_model,
                                                const std::optional<at::Tensor>& context,
                                                const std::optional<at::Tensor>& context_len) {
  constexpr const char* op = "draft_greedy";
  check_rank(tokens, 1, op, "tokens", "[B]");
  check_dtype(tokens, at::kLong, op, "tokens");
  check_rank(embed, 2, op, "embed", "[V, H]");
  check_same_device(embed, tokens, op, "embed", "tokens");
  check_rank(start, 1, op, "start", "[B]");
  check_size(start, 0, tokens.size(0), op, "start", "B = tokens.size(0)");
  TORCH_CHECK(num_drafts >= 0, op, ": num_drafts must be >= 0, got ", num_drafts);
  TORCH_CHECK(stop_below >= 0.0 && stop_below <= 1.0, op, ": stop_below must be a probability in [0, 1], got ",
              stop_below);
  TORCH_CHECK(!weights.empty(), op, ": weights is empty (the draft needs at least one layer)");
  const int64_t B = tokens.size(0), H = embed.size(1), d = num_drafts;
  const bool modelled = stop_model.has_value() && stop_model->defined();
  TORCH_CHECK(modelled == (context.has_value() && context->defined()) &&
                  modelled == (context_len.has_value() && context_len->defined()),
              op, ": stop_model, context and context_len go together (all or none)");
  TORCH_CHECK(!modelled || stop_below > 0.0, op, ": a stop_model needs stop_below > 0 (its threshold)");
  std::vector<double> w;
  std::vector<std::vector<int64_t>> seqs;  // each row's context, extended by the round's drafts
  if (modelled) {
    TORCH_CHECK(stop_model->device().is_cpu() && stop_model->scalar_type() == at::kDouble && stop_model->dim() == 1 &&
                    stop_model->size(0) == kStopModelSize,
                op, ": stop_model must be a CPU float64 tensor [", kStopModelSize, "], got ", stop_model->sizes(), " ",
                stop_model->scalar_type(), " on ", stop_model->device());
    check_rank(*context, 2, op, "context", "[B, C]");
    check_dtype(*context, at::kLong, op, "context");
    check_size(*context, 0, B, op, "context", "B = tokens.size(0)");
    check_rank(*context_len, 1, op, "context_len", "[B]");
    check_dtype(*context_len, at::kLong, op, "context_len");
    check_size(*context_len, 0, B, op, "context_len", "B = tokens.size(0)");
    TORCH_CHECK(context->device().is_cpu() && context_len->device().is_cpu(), op,
                ": context and context_len must be on the CPU (the stop features are computed on the host)");
    const at::Tensor sm = stop_model->contiguous(), ctx = context->contiguous(), len = context_len->contiguous();
    w.assign(sm.const_data_ptr<double>(), sm.const_data_ptr<double>() + kStopModelSize);
    const int64_t C = ctx.size(1);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = len.const_data_ptr<int64_t>()[b];
      TORCH_CHECK(n >= 1 && n <= C, op, ": context_len[", b, "] = ", n, " is outside [1, ", C, "]");
      const int64_t* row = ctx.const_data_ptr<int64_t>() + b * C;
      seqs.emplace_back(row, row + n);
      seqs.back().reserve(n + d);
    }
  }

  static auto layer_range = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("layerskip::layer_range_forward", "")
                                .typed<LayerRangeFn>();
  static auto head_argmax = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("layerskip::exit_head_argmax", "")
                                .typed<ExitHeadArgmaxFn>();
  static auto head_log_softmax = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("layerskip::exit_head_log_softmax", "")
                                     .typed<ExitHeadLogSoftmaxFn>();
  static auto head_top2 = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("layerskip::exit_head_top2", "")
                              .typed<ExitHeadTop2Fn>();
  const bool subset = vocab_subset.has_value() && vocab_subset->defined();
  std::vector<double> chance(B, 0.0);  // log of each row's chance that its drafts so far are accepted
  const bool dynamic = stop_below > 0.0;
  const double log_stop = dynamic ? std::log(stop_below) : 0.0;

  at::Tensor drafts = at::empty({B, d}, tokens.options());
  at::Tensor hidden = at::empty({B, d + 1, H}, embed.options());
  if (poison_outputs().load()) {
    drafts.fill_(-1);
    hidden.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  // On a device the step's tokens and values come to the host through two pinned buffers: the tokens' copy is
  // queued without waiting and the values' copy waits for the stream, so both arrive with one sync per step.
  const bool on_device = !tokens.device().is_cpu();
  at::Tensor tok_buf, val_buf;
  if (dynamic && on_device) {
    const auto pinned = at::TensorOptions().device(at::kCPU).pinned_memory(true);
    tok_buf = at::empty({B}, pinned.dtype(at::kLong));
    val_buf = at::empty(modelled ? at::IntArrayRef{B, 2} : at::IntArrayRef{B}, pinned.dtype(at::kFloat));
  }
  at::Tensor token = tokens;
  int64_t used = d;
  for (int64_t i = 0; i <= d; ++i) {
    const at::Tensor pos = i == 0 ? start : at::add(start, i);  // [B]: this step's token's position
    const at::Tensor x = at::embedding(embed, token.view({B, 1}));  // [B, 1, H]
    const at::Tensor h = layer_range.call(x, weights, k_caches, v_caches, pos, pos.view({B, 1}), cos, sin, num_heads,
                                          num_kv_heads, eps, scale);
    hidden.select(1, i).copy_(h.select(1, 0));
    if (i == d) break;
    if (!dynamic) {
      token = head_argmax.call(h.view({B, H}), norm_weight, norm_eps, lm_head, vocab_subset);  // [B]
      drafts.select(1, i).copy_(token);
      continue;
    }
    // Dynamic drafting: the step's tokens and what each row's chance is computed from, on the host.
    at::Tensor values;  // [B, 2] the two largest logits (stop model) or [B] the top log-probability
    if (modelled) {
      std::tie(token, values) = head_top2.call(h.view({B, H}), norm_weight, norm_eps, lm_head, vocab_subset);
    } else {
      const at::Tensor logp = head_log_softmax.call(h.view({B, H}), norm_weight, norm_eps, lm_head, vocab_subset);
      const auto [top, col] = at::max(logp, 1);  // [B]: the most probable column and its log-probability
      token = subset ? vocab_subset->index_select(0, col) : col;
      values = top;
    }
    at::Tensor tok_host, step_host;
    if (on_device) {
      tok_buf.copy_(token, /*non_blocking=*/true);
      val_buf.copy_(values);  // waits for the stream: the tokens' copy, queued before, is done too
      tok_host = tok_buf;
      step_host = val_buf;
    } else {
      tok_host = token.contiguous();
      step_host = values.to(at::kFloat).contiguous();
    }
    const int64_t* tk = tok_host.const_data_ptr<int64_t>();
    const float* sv = step_host.const_data_ptr<float>();
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < B; ++b) {
      if (modelled) {  // the whole run's chance: the product over the row's drafts
        const int64_t m = match_level(seqs[b], tk[b]);
        const double z = w[0] + w[1] * (double(sv[2 * b]) - double(sv[2 * b + 1])) + w[2] * (m >= 1) +
                         w[3] * (m >= 2) + w[4] * (m >= 3) + w[5] * (m >= 4);
        chance[b] += log_sigmoid(z);
        seqs[b].push_back(tk[b]);
      } else {  // every draft so far confident: the least probable of them
        chance[b] = i == 0 ? double(sv[b]) : std::min(chance[b], double(sv[b]));
      }
      top = std::max(top, chance[b]);
    }
    double sum = 0.0;  // log of the rows' mean chance, max-shifted (one row: exactly its own)
    for (int64_t b = 0; b < B; ++b) sum += std::exp(chance[b] - top);
    if (top + std::log(sum) - std::log(double(B)) < log_stop) {  // the round verifies the i drafts made so far
      used = i;
      break;
    }
    drafts.select(1, i).copy_(token);
  }
  if (used < d) {
    return {drafts.narrow(1, 0, used).contiguous(), hidden.narrow(1, 0, used + 1).contiguous()};
  }
  return {drafts, hidden};
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("draft_greedy", &draft_greedy); }
TORCH_LIBRARY_IMPL(layerskip, CUDA, m) { m.impl("draft_greedy", &draft_greedy); }

}  // namespace layerskip
