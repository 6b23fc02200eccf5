// draft_greedy -- the whole greedy draft stage of a self-speculative round in one native call.
//
// Not a kernel of its own: d + 1 steps of embedding -> layer_range_forward (layers < E) -> exit_head_argmax, calling
// those ops through the dispatcher, so it runs the same kernels on the same device as the Python loop it replaces
// (generation/self_speculative.py) and gives bitwise its result. What it saves is the Python between them: per
// draft token a forward state, an embedding call, a layer-range call and a head call with their argument handling,
// which on a small model is several percent of a round. On a GPU the argmax never leaves the device (no host sync).
// Registered for CPU and CUDA alike (the ops it calls have both twins).
//
// Dynamic drafting (stop_below > 0): each step's exit head is its log-softmax (exit_head_log_softmax, the same
// logits); a row keeps proposing while its top token's probability is >= stop_below, and its first proposal below
// that, and all after, are -1 (verification rejects them: the full model's token comes instead, so the output is
// unchanged whatever the threshold). The loop stops once no row proposes confidently; the outputs then have d' <
// num_drafts drafts (d' + 1 hidden states). Deciding that reads one bool per step on the host (on a GPU, a sync).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/any.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/max.h>
#include <ATen/ops/where.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

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

// tokens[B] int64: each row's newest token (not yet in the cache), at position start[B]; embed[V, H];
// weights / caches / cos / sin / heads / eps / scale: layer_range_forward's, for layers [0, E);
// norm_weight / norm_eps / lm_head / vocab_subset: exit_head_argmax's.
// -> drafts[B, d] int64, hidden[B, d + 1, H]: layer E's output for tokens, drafts[:, 0], ..., drafts[:, d - 1]
// (d' <= d of them with stop_below > 0: see above).
std::tuple<at::Tensor, at::Tensor> draft_greedy(const at::Tensor& tokens, const at::Tensor& embed,
                                                at::TensorList weights, at::TensorList k_caches,
                                                at::TensorList v_caches, const at::Tensor& start,
                                                const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                                                int64_t num_kv_heads, double eps, double scale,
                                                const at::Tensor& norm_weight, double norm_eps,
                                                const at::Tensor& lm_head, const std::optional<at::Tensor>& vocab_subset,
                                                int64_t num_drafts, double stop_below) {
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

  static auto layer_range = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("layerskip::layer_range_forward", "")
                                .typed<LayerRangeFn>();
  static auto head_argmax = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("layerskip::exit_head_argmax", "")
                                .typed<ExitHeadArgmaxFn>();
  static auto head_log_softmax = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("layerskip::exit_head_log_softmax", "")
                                     .typed<ExitHeadLogSoftmaxFn>();
  const bool dynamic = stop_below > 0.0;
  const double log_stop = dynamic ? std::log(stop_below) : 0.0;

  at::Tensor drafts = at::empty({B, d}, tokens.options());
  at::Tensor hidden = at::empty({B, d + 1, H}, embed.options());
  if (poison_outputs().load()) {
    drafts.fill_(-1);
    hidden.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  at::Tensor token = tokens;
  at::Tensor active;  // [B] bool: rows still proposing (dynamic drafting)
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
    const at::Tensor logp = head_log_softmax.call(h.view({B, H}), norm_weight, norm_eps, lm_head, vocab_subset);
    const auto [top, col] = at::max(logp, 1);  // [B]: the most probable column and its log-probability
    token = vocab_subset.has_value() && vocab_subset->defined() ? vocab_subset->index_select(0, col) : col;
    const at::Tensor confident = at::ge(top, log_stop);
    active = i == 0 ? confident : at::logical_and(active, confident);
    drafts.select(1, i).copy_(at::where(active, token, at::full({}, -1, token.options())));
    if (!at::any(active).item<bool>()) {  // nobody proposes: the round verifies the i drafts made so far
      used = i;
      break;
    }
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
