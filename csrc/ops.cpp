// The ONE list of native op schemas. Kernels: csrc/cpu/*.cpp (CPU), csrc/cuda/ops_cuda.cpp (CUDA).
// Python wrappers, fake (meta) kernels and the PyTorch references: python/layerskip_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(layerskip, m) {
  // x[..., H], weight[H] -> [..., H]
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // x[B, T, nH, D], positions[B, T] (or [1, T]) int64, cos/sin[P, D/2] float32 -> [B, T, nH, D]  (rotate-half)
  m.def("rope(Tensor x, Tensor positions, Tensor cos, Tensor sin) -> Tensor");
  // k_cache/v_cache[B, nKV, S, D] (written in place), k/v[B, T, nKV, D], start[B] int64
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor start) -> ()");
  // q[B, T, nH, D], k_cache/v_cache[B, nKV, S, D], start[B] int64 -> [B, T, nH, D]
  m.def("cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor start, float scale) -> Tensor");
  // x[..., K], weight[N, K] (x's dtype: float32 or bfloat16) -> [..., N]; float32 accumulation, rounded once
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  // h[..., H] -> [...] int64: argmax(linear(rms_norm(h, norm_weight, eps), lm_head[V, H]), -1), ties -> lowest;
  // with vocab_subset[V'] int64 only those rows of lm_head are scored (the chosen id is returned)
  m.def("exit_head_argmax(Tensor h, Tensor norm_weight, float eps, Tensor lm_head, Tensor? vocab_subset) -> Tensor");
  // The exit head for sampling: h[..., H], uniforms[...] float32 in [0, 1) (one per row), temperature > 0,
  // top_k >= 0 (0: off), top_p in (0, 1] (1: off) -> tokens[...] int64, probs[..., V] float32: the filtered
  // distribution of softmax(logits / temperature) (common/head_filter.h; generation/sampling.py filtered_probs)
  // that token was drawn from by inverse CDF (common/sampling.h), logits = linear(rms_norm(h), lm_head) bitwise
  // the native ops'. With vocab_subset[V'] the distribution is over those rows of lm_head (probs[..., V'] in
  // vocab_subset's order) and tokens are their ids. Deterministic given the uniforms.
  m.def("exit_head_sample(Tensor h, Tensor norm_weight, float eps, Tensor lm_head, Tensor uniforms, "
        "float temperature, int top_k, float top_p, Tensor? vocab_subset) -> (Tensor tokens, Tensor probs)");
  // h[..., H] -> [..., V] float32: log_softmax of the exit head's logits (bitwise the native ops'), computed in
  // float64 and rounded once; with vocab_subset[V'], over those rows of lm_head only ([..., V']).
  m.def("exit_head_log_softmax(Tensor h, Tensor norm_weight, float eps, Tensor lm_head, Tensor? vocab_subset) "
        "-> Tensor");
  // The argmax (as exit_head_argmax) and the two largest logits [..., 2] float32 (dynamic drafting's stop model).
  m.def("exit_head_top2(Tensor h, Tensor norm_weight, float eps, Tensor lm_head, Tensor? vocab_subset) "
        "-> (Tensor tokens, Tensor top2)");
  // drafts[B, d] int64, target[B, d+1] int64 (the verifier's argmax), positions[B] int64 (+= accepted + 1 in place)
  //   -> accepted[B] (agreeing prefix length), next_token[B] = target[b, accepted[b]]
  m.def("verify_greedy(Tensor drafts, Tensor target, Tensor(a!) positions) -> (Tensor accepted, Tensor next_token)");
  // q[B, d, V] / p[B, d+1, V] float32 draft / target probabilities, uniforms[B, d+1] float32 in [0, 1):
  //   the lossless rule (accept while u*q(y) < p(y); correction from norm(max(p - q, 0)) or bonus from p[:, d])
  m.def("verify_sampling(Tensor drafts, Tensor q, Tensor p, Tensor uniforms, Tensor(a!) positions) -> "
        "(Tensor accepted, Tensor next_token)");
  // Decoder layers [start, end) for h[B, T, H] at positions[B, T] (or [1, T]) over the static caches (written in
  // place at slots start[b] + t): weights = 9 per layer (input_layernorm, q_proj, k_proj, v_proj, o_proj,
  // post_attention_layernorm, gate_proj, up_proj, down_proj), caches one [B, nKV, S, D] per layer -> h after the
  // last layer. Bitwise the native ops one by one (model/llama.py with the native op set).
  m.def("layer_range_forward(Tensor h, Tensor[] weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor start, "
        "Tensor positions, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, float eps, float scale) -> Tensor");
  // The greedy draft stage of a self-speculative round (csrc/draft.cpp; CPU and CUDA): tokens[B] int64 at positions
  // start[B], embed[V, H]; layer_range_forward's arguments for layers [0, E); exit_head_argmax's; d = num_drafts.
  // d + 1 steps of h = layer_range_forward(embed[token]) at start + i, token = exit_head_argmax(h) (not after the
  // last) -> drafts[B, d] int64, hidden[B, d + 1, H] (layer E's output per step). Bitwise those ops one by one.
  // stop_below > 0: dynamic drafting, fewer drafts where the exit head is not confident (csrc/draft.cpp); with
  // stop_model[6] float64, context[B, C] and context_len[B] int64 (all on the CPU), where a fitted model of the
  // drafts' acceptance says the run is unlikely to be accepted (generation/draft_stop.py).
  m.def("draft_greedy(Tensor tokens, Tensor embed, Tensor[] weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor start, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, float eps, float scale, "
        "Tensor norm_weight, float norm_eps, Tensor lm_head, Tensor? vocab_subset, int num_drafts, "
        "float stop_below=0., Tensor? stop_model=None, Tensor? context=None, Tensor? context_len=None) "
        "-> (Tensor drafts, Tensor hidden)");
  // Bad values the CUDA kernels met since the last call on like's device (bits: csrc/cuda/launchers.h
  // kDeviceError*: a vocab_subset entry outside lm_head, a uniform outside [0, 1), a draft outside [0, V)), which
  // the CPU ops raise on at once; reading them synchronises with the device and clears them. CPU: always 0.
  m.def("take_device_errors(Tensor like) -> int");
}
