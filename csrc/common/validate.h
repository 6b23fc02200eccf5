// Shape / dtype / device / layout validation of each op, shared by the CPU and CUDA twins so both accept exactly
// the same arguments. Value checks that need to read tensor contents (start, positions) are separate: the CPU
// kernels run them; the CUDA kernels never synchronise with the host (the Python caller validates, and the
// kernels guard their memory accesses: see csrc/cuda/kernels.cu).
#pragma once

#include <optional>
#include <string>

#include "common/checks.h"

namespace layerskip {

struct RmsNormDims {
  int64_t rows;  // product of the leading dims
  int64_t H;
};

inline RmsNormDims validate_rms_norm(const at::Tensor& x, const at::Tensor& weight) {
  constexpr const char* op = "rms_norm";
  check_defined(x, op, "x");
  check_defined(weight, op, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim [..., H], got 0-D");
  check_rank(weight, 1, op, "weight", "[H]");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op,
              ": weight must have the dtype of x (", dtype_name(x.scalar_type()), ") or be float32, got ",
              dtype_name(weight.scalar_type()));
  check_same_device(weight, x, op, "weight", "x");
  const int64_t H = x.size(-1);
  check_size(weight, 0, H, op, "weight", "H = x.size(-1)");
  check_contiguous(x, op, "x");
  check_contiguous(weight, op, "weight");
  return {H == 0 ? 0 : x.numel() / H, H};
}

struct RopeDims {
  int64_t B, T, nH, D, P;
  int64_t pos_stride_b;  // T, or 0 when positions is [1, T] (shared by every sequence)
};

inline RopeDims validate_rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                              const at::Tensor& sin) {
  constexpr const char* op = "rope";
  check_rank(x, 4, op, "x", "[B, T, nH, D]");
  check_rank(positions, 2, op, "positions", "[B, T]");
  check_rank(cos, 2, op, "cos", "[P, D/2]");
  check_rank(sin, 2, op, "sin", "[P, D/2]");
  check_float_dtype(x, op, "x");
  check_dtype(positions, at::kLong, op, "positions");
  check_dtype(cos, at::kFloat, op, "cos");
  check_dtype(sin, at::kFloat, op, "sin");
  check_same_device(positions, x, op, "positions", "x");
  check_same_device(cos, x, op, "cos", "x");
  check_same_device(sin, x, op, "sin", "x");
  const int64_t B = x.size(0), T = x.size(1), nH = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": x.size(3) (head dim D) must be even, got ", D);
  TORCH_CHECK(D <= LAYERSKIP_MAX_HEAD_DIM, op, ": x.size(3) (head dim D) must be <= ", LAYERSKIP_MAX_HEAD_DIM,
              ", got ", D);
  TORCH_CHECK(positions.size(0) == B || positions.size(0) == 1, op, ": positions.size(0) must be B = x.size(0) = ",
              B, " (or 1: the same positions for every sequence), got ", positions.size(0));
  check_size(positions, 1, T, op, "positions", "T = x.size(1)");
  check_size(cos, 1, D / 2, op, "cos", "D/2 = x.size(3)/2");
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have the shape of cos ", cos.sizes(), ", got ",
              sin.sizes());
  check_contiguous(x, op, "x");
  check_contiguous(positions, op, "positions");
  check_contiguous(cos, op, "cos");
  check_contiguous(sin, op, "sin");
  return {B, T, nH, D, cos.size(0), positions.size(0) == B ? T : 0};
}

struct CacheDims {
  int64_t B, T, nKV, S, D;
};

// k_cache/v_cache [B, nKV, S, D] and start [B]; T comes from the caller.
inline void validate_cache(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& start) {
  check_rank(k_cache, 4, op, "k_cache", "[B, nKV, S, D]");
  check_rank(v_cache, 4, op, "v_cache", "[B, nKV, S, D]");
  check_rank(start, 1, op, "start", "[B]");
  check_same_dtype(k_cache, ref, op, "k_cache", ref_name);
  check_same_dtype(v_cache, ref, op, "v_cache", ref_name);
  check_dtype(start, at::kLong, op, "start");
  check_same_device(k_cache, ref, op, "k_cache", ref_name);
  check_same_device(v_cache, ref, op, "v_cache", ref_name);
  check_same_device(start, ref, op, "start", ref_name);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  check_size(k_cache, 0, ref.size(0), op, "k_cache", "B");
  check_size(start, 0, ref.size(0), op, "start", "B");
  check_size(k_cache, 3, ref.size(3), op, "k_cache", "head dim D");
  check_contiguous(k_cache, op, "k_cache");
  check_contiguous(v_cache, op, "v_cache");
  check_contiguous(start, op, "start");
}

inline CacheDims validate_kv_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& start) {
  constexpr const char* op = "kv_cache_write";
  check_rank(k, 4, op, "k", "[B, T, nKV, D]");
  check_rank(v, 4, op, "v", "[B, T, nKV, D]");
  check_float_dtype(k, op, "k");
  check_same_dtype(v, k, op, "v", "k");
  check_same_device(v, k, op, "v", "k");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  check_contiguous(k, op, "k");
  check_contiguous(v, op, "v");
  validate_cache(op, k, "k", k_cache, v_cache, start);
  check_size(k_cache, 1, k.size(2), op, "k_cache", "nKV = k.size(2)");
  TORCH_CHECK(k_cache.data_ptr() != v_cache.data_ptr() || k_cache.numel() == 0, op,
              ": k_cache and v_cache must be different tensors");
  return {k.size(0), k.size(1), k.size(2), k_cache.size(2), k.size(3)};
}

struct AttnDims {
  int64_t B, T, nH, nKV, S, D;
};

inline AttnDims validate_cache_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& start) {
  constexpr const char* op = "cache_attention";
  check_rank(q, 4, op, "q", "[B, T, nH, D]");
  check_float_dtype(q, op, "q");
  check_contiguous(q, op, "q");
  validate_cache(op, q, "q", k_cache, v_cache, start);
  const int64_t nH = q.size(2), nKV = k_cache.size(1), D = q.size(3);
  TORCH_CHECK(nKV > 0 && nH % nKV == 0, op, ": q heads nH = q.size(2) = ", nH,
              " must be a multiple of the key/value heads nKV = k_cache.size(1) = ", nKV);
  TORCH_CHECK(D >= 1 && D <= LAYERSKIP_MAX_HEAD_DIM, op, ": q.size(3) (head dim D) must be in [1, ",
              LAYERSKIP_MAX_HEAD_DIM, "], got ", D);
  return {q.size(0), q.size(1), nH, nKV, k_cache.size(2), D};
}

// CPU only (reads the values): 0 <= start[b] and start[b] + T <= S for every b.
inline void check_start_values(const char* op, const at::Tensor& start, int64_t T, int64_t S) {
  const int64_t* s = start.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < start.numel(); ++b) {
    TORCH_CHECK(s[b] >= 0 && s[b] <= S - T, op, ": start[", b, "] = ", s[b],
                " is out of range: need 0 <= start[b] and start[b] + T <= S (T = ", T, ", S = ", S, ")");
  }
}

// CPU only: 0 <= positions < P.
inline void check_position_values(const at::Tensor& positions, int64_t P) {
  const int64_t* p = positions.const_data_ptr<int64_t>();
  const int64_t n = positions.numel(), T = positions.dim() == 2 ? positions.size(1) : 1;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < P, "rope: positions[", i / T, ", ", i % T, "] = ", p[i],
                " is out of range [0, P) with P = cos.size(0) = ", P);
  }
}

// ---- linear / exit_head_argmax -----------------------------------------------------------------------------------

inline void check_linear_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", dtype_name(t.scalar_type()));
}

struct LinearDims {
  int64_t M;  // product of x's leading dims
  int64_t K, N;
};

inline LinearDims validate_linear(const at::Tensor& x, const at::Tensor& weight) {
  constexpr const char* op = "linear";
  check_defined(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim [..., K], got 0-D");
  check_rank(weight, 2, op, "weight", "[N, K]");
  check_linear_dtype(x, op, "x");
  check_same_dtype(weight, x, op, "weight", "x");
  check_same_device(weight, x, op, "weight", "x");
  const int64_t K = x.size(-1);
  check_size(weight, 1, K, op, "weight", "K = x.size(-1)");
  check_contiguous(x, op, "x");
  check_contiguous(weight, op, "weight");
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  return {M, K, weight.size(0)};
}

struct HeadDims {
  int64_t M, H, V;  // V: columns scored (vocab_subset's length when given)
  bool subset;
};

// The exit head's common arguments (exit_head_argmax, exit_head_sample, exit_head_log_softmax), messages under op.
inline HeadDims validate_exit_head(const char* op, const at::Tensor& h, const at::Tensor& norm_weight,
                                   const at::Tensor& lm_head, const std::optional<at::Tensor>& subset) {
  check_defined(h, op, "h");
  TORCH_CHECK(h.dim() >= 1, op, ": h must have at least 1 dim [..., H], got 0-D");
  check_rank(norm_weight, 1, op, "norm_weight", "[H]");
  check_rank(lm_head, 2, op, "lm_head", "[V, H]");
  check_linear_dtype(h, op, "h");
  TORCH_CHECK(norm_weight.scalar_type() == h.scalar_type() || norm_weight.scalar_type() == at::kFloat, op,
              ": norm_weight must have the dtype of h (", dtype_name(h.scalar_type()), ") or be float32, got ",
              dtype_name(norm_weight.scalar_type()));
  check_same_dtype(lm_head, h, op, "lm_head", "h");
  check_same_device(norm_weight, h, op, "norm_weight", "h");
  check_same_device(lm_head, h, op, "lm_head", "h");
  const int64_t H = h.size(-1);
  check_size(norm_weight, 0, H, op, "norm_weight", "H = h.size(-1)");
  check_size(lm_head, 1, H, op, "lm_head", "H = h.size(-1)");
  check_contiguous(h, op, "h");
  check_contiguous(norm_weight, op, "norm_weight");
  check_contiguous(lm_head, op, "lm_head");
  // Checked before vocab_subset replaces V: an empty head with a subset would otherwise pass, and the kernels
  // would have no row to read.
  TORCH_CHECK(lm_head.size(0) > 0, op, ": lm_head must have at least one row (vocabulary), got shape ",
              lm_head.sizes());
  int64_t V = lm_head.size(0);
  const bool has_subset = subset.has_value() && subset->defined();
  if (has_subset) {
    const at::Tensor& s = *subset;
    check_rank(s, 1, op, "vocab_subset", "[V']");
    check_dtype(s, at::kLong, op, "vocab_subset");
    check_same_device(s, h, op, "vocab_subset", "h");
    check_contiguous(s, op, "vocab_subset");
    V = s.size(0);
    TORCH_CHECK(V > 0, op, ": vocab_subset must not be empty");
  }
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < h.dim(); ++i) M *= h.size(i);
  return {M, H, V, has_subset};
}

inline HeadDims validate_exit_head_argmax(const at::Tensor& h, const at::Tensor& norm_weight,
                                          const at::Tensor& lm_head, const std::optional<at::Tensor>& subset) {
  return validate_exit_head("exit_head_argmax", h, norm_weight, lm_head, subset);
}

// exit_head_sample: the head's arguments, then uniforms (shape h.shape[:-1], float32) and the sampling parameters.
// The values of uniforms are checked by the CPU kernel only (check_uniform_values): reading them on the host would
// synchronise a CUDA stream.
inline HeadDims validate_exit_head_sample(const at::Tensor& h, const at::Tensor& norm_weight,
                                          const at::Tensor& lm_head, const at::Tensor& uniforms, double temperature,
                                          int64_t top_k, double top_p, const std::optional<at::Tensor>& subset) {
  constexpr const char* op = "exit_head_sample";
  const HeadDims d = validate_exit_head(op, h, norm_weight, lm_head, subset);
  check_defined(uniforms, op, "uniforms");
  check_dtype(uniforms, at::kFloat, op, "uniforms");
  check_same_device(uniforms, h, op, "uniforms", "h");
  TORCH_CHECK(uniforms.sizes() == h.sizes().slice(0, h.dim() - 1), op,
              ": uniforms must have the shape of h without its last dim ", h.sizes().slice(0, h.dim() - 1),
              " (one per row), got ", uniforms.sizes());
  check_contiguous(uniforms, op, "uniforms");
  // The negated comparisons reject NaN too.
  TORCH_CHECK(temperature > 0.0 && temperature <= 3.4e38, op, ": temperature must be a finite number > 0, got ",
              temperature, " (greedy decoding is exit_head_argmax)");
  TORCH_CHECK(static_cast<float>(temperature) > 0.0f, op, ": temperature ", temperature,
              " rounds to 0 in float32");
  TORCH_CHECK(top_k >= 0, op, ": top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, op, ": top_p must be in (0, 1] (1 disables it), got ", top_p);
  TORCH_CHECK(d.V <= (int64_t(1) << 30), op, ": at most 2^30 vocabulary columns, got ", d.V);
  return d;
}

inline HeadDims validate_exit_head_log_softmax(const at::Tensor& h, const at::Tensor& norm_weight,
                                               const at::Tensor& lm_head, const std::optional<at::Tensor>& subset) {
  return validate_exit_head("exit_head_log_softmax", h, norm_weight, lm_head, subset);
}

// CPU only: 0 <= vocab_subset[i] < V.
inline void check_subset_values(const at::Tensor& subset, int64_t V, const char* op = "exit_head_argmax") {
  const int64_t* p = subset.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < subset.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < V, op, ": vocab_subset[", i, "] = ", p[i],
                " is out of range [0, V) with V = lm_head.size(0) = ", V);
  }
}

// CPU only: every uniform in [0, 1) (u = 1 would pick past the last token of the inverse CDF).
inline void check_uniform_values(const at::Tensor& uniforms, const char* op) {
  const float* p = uniforms.const_data_ptr<float>();
  for (int64_t i = 0; i < uniforms.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0.0f && p[i] < 1.0f, op, ": uniforms[", i, "] (flat index) = ", p[i],
                " is outside [0, 1)");
  }
}

// ---- verify_greedy / verify_sampling -------------------------------------------------------------------------------

struct VerifyDims {
  int64_t B, d, V;  // V: vocabulary (sampling only)
};

inline void validate_positions(const char* op, const at::Tensor& positions, const at::Tensor& ref, int64_t B) {
  check_rank(positions, 1, op, "positions", "[B]");
  check_dtype(positions, at::kLong, op, "positions");
  check_same_device(positions, ref, op, "positions", "drafts");
  check_size(positions, 0, B, op, "positions", "B = drafts.size(0)");
  check_contiguous(positions, op, "positions");
}

inline VerifyDims validate_verify_greedy(const at::Tensor& drafts, const at::Tensor& target,
                                         const at::Tensor& positions) {
  constexpr const char* op = "verify_greedy";
  check_rank(drafts, 2, op, "drafts", "[B, d]");
  check_rank(target, 2, op, "target", "[B, d+1]");
  check_dtype(drafts, at::kLong, op, "drafts");
  check_dtype(target, at::kLong, op, "target");
  check_same_device(target, drafts, op, "target", "drafts");
  const int64_t B = drafts.size(0), d = drafts.size(1);
  check_size(target, 0, B, op, "target", "B = drafts.size(0)");
  check_size(target, 1, d + 1, op, "target", "d+1 = drafts.size(1) + 1");
  check_contiguous(drafts, op, "drafts");
  check_contiguous(target, op, "target");
  validate_positions(op, positions, drafts, B);
  return {B, d, 0};
}

inline VerifyDims validate_verify_sampling(const at::Tensor& drafts, const at::Tensor& q, const at::Tensor& p,
                                           const at::Tensor& uniforms, const at::Tensor& positions) {
  constexpr const char* op = "verify_sampling";
  check_rank(drafts, 2, op, "drafts", "[B, d]");
  check_rank(q, 3, op, "q", "[B, d, V]");
  check_rank(p, 3, op, "p", "[B, d+1, V]");
  check_rank(uniforms, 2, op, "uniforms", "[B, d+1]");
  check_dtype(drafts, at::kLong, op, "drafts");
  check_dtype(q, at::kFloat, op, "q");
  check_dtype(p, at::kFloat, op, "p");
  check_dtype(uniforms, at::kFloat, op, "uniforms");
  check_same_device(q, drafts, op, "q", "drafts");
  check_same_device(p, drafts, op, "p", "drafts");
  check_same_device(uniforms, drafts, op, "uniforms", "drafts");
  const int64_t B = drafts.size(0), d = drafts.size(1), V = p.size(2);
  check_size(p, 0, B, op, "p", "B = drafts.size(0)");
  check_size(p, 1, d + 1, op, "p", "d+1 = drafts.size(1) + 1");
  TORCH_CHECK(V > 0, op, ": p.size(2) (vocabulary V) must be positive");
  check_size(q, 0, B, op, "q", "B = drafts.size(0)");
  check_size(q, 1, d, op, "q", "d = drafts.size(1)");
  check_size(q, 2, V, op, "q", "V = p.size(2)");
  check_size(uniforms, 0, B, op, "uniforms", "B = drafts.size(0)");
  check_size(uniforms, 1, d + 1, op, "uniforms", "d+1 = drafts.size(1) + 1");
  check_contiguous(drafts, op, "drafts");
  check_contiguous(q, op, "q");
  check_contiguous(p, op, "p");
  check_contiguous(uniforms, op, "uniforms");
  validate_positions(op, positions, drafts, B);
  return {B, d, V};
}

// CPU only: 0 <= drafts < V (they index q and p).
inline void check_draft_values(const at::Tensor& drafts, int64_t V) {
  const int64_t* p = drafts.const_data_ptr<int64_t>();
  const int64_t d = drafts.size(1);
  for (int64_t i = 0; i < drafts.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < V, "verify_sampling: drafts[", i / d, ", ", i % d, "] = ", p[i],
                " is out of range [0, V) with V = p.size(2) = ", V);
  }
}

// ---- layer_range_forward ----------------------------------------------------------------------------------------

// Per layer, in this order (Hugging Face Llama names): the weights list holds 9 tensors per layer.
constexpr int kLayerWeights = 9;
inline const char* layer_weight_name(int i) {
  static const char* names[kLayerWeights] = {"input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                                             "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"};
  return names[i];
}

struct LayerRangeDims {
  int64_t L, B, T, H, nH, nKV, D, I, S, P;
  int64_t pos_stride_b;  // T, or 0 for positions [1, T]
};

inline LayerRangeDims validate_layer_range(const at::Tensor& h, at::TensorList weights, at::TensorList k_caches,
                                           at::TensorList v_caches, const at::Tensor& start,
                                           const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                                           int64_t num_heads, int64_t num_kv_heads) {
  constexpr const char* op = "layer_range_forward";
  check_rank(h, 3, op, "h", "[B, T, H]");
  check_linear_dtype(h, op, "h");
  check_contiguous(h, op, "h");
  const int64_t B = h.size(0), T = h.size(1), H = h.size(2);
  TORCH_CHECK(weights.size() % kLayerWeights == 0, op, ": weights must hold ", kLayerWeights,
              " tensors per layer (input_layernorm, q_proj, k_proj, v_proj, o_proj, post_attention_layernorm, "
              "gate_proj, up_proj, down_proj), got ", weights.size());
  const int64_t L = static_cast<int64_t>(weights.size()) / kLayerWeights;
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L, op, ": k_caches must hold one tensor per layer (", L,
              "), got ", k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(v_caches.size()) == L, op, ": v_caches must hold one tensor per layer (", L,
              "), got ", v_caches.size());
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": num_heads (", num_heads,
              ") must be a positive multiple of num_kv_heads (", num_kv_heads, ")");
  check_rank(start, 1, op, "start", "[B]");
  check_dtype(start, at::kLong, op, "start");
  check_same_device(start, h, op, "start", "h");
  check_size(start, 0, B, op, "start", "B = h.size(0)");
  check_contiguous(start, op, "start");
  check_rank(positions, 2, op, "positions", "[B, T]");
  check_dtype(positions, at::kLong, op, "positions");
  check_same_device(positions, h, op, "positions", "h");
  TORCH_CHECK(positions.size(0) == B || positions.size(0) == 1, op, ": positions.size(0) must be B = h.size(0) = ",
              B, " (or 1), got ", positions.size(0));
  check_size(positions, 1, T, op, "positions", "T = h.size(1)");
  check_contiguous(positions, op, "positions");
  check_rank(cos, 2, op, "cos", "[P, D/2]");
  check_dtype(cos, at::kFloat, op, "cos");
  check_dtype(sin, at::kFloat, op, "sin");
  check_same_device(cos, h, op, "cos", "h");
  check_same_device(sin, h, op, "sin", "h");
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have the shape of cos ", cos.sizes(), ", got ", sin.sizes());
  check_contiguous(cos, op, "cos");
  check_contiguous(sin, op, "sin");
  LayerRangeDims d{L, B, T, H, num_heads, num_kv_heads, 0, 0, 0, cos.size(0), positions.size(0) == B ? T : 0};
  if (L == 0) return d;
  const at::Tensor& q0 = weights[1];
  TORCH_CHECK(q0.dim() == 2 && q0.size(0) % num_heads == 0, op, ": weights[1] (layer 0 q_proj) must be 2-D [num_heads * D, H] with num_heads = ",
              num_heads, ", got shape ", q0.sizes());
  d.D = q0.size(0) / num_heads;
  TORCH_CHECK(d.D % 2 == 0 && d.D >= 2 && d.D <= LAYERSKIP_MAX_HEAD_DIM, op, ": head dim D = q_proj rows / num_heads = ",
              d.D, " must be even and in [2, ", LAYERSKIP_MAX_HEAD_DIM, "]");
  check_size(cos, 1, d.D / 2, op, "cos", "D/2");
  TORCH_CHECK(weights[6].dim() == 2, op, ": weights[6] (layer 0 gate_proj) must be 2-D [I, H], got ", weights[6].dim(),
              "-D");
  d.I = weights[6].size(0);
  const at::Tensor& kc0 = k_caches[0];
  check_rank(kc0, 4, op, "k_caches[0]", "[B, nKV, S, D]");
  d.S = kc0.size(2);
  const int64_t shapes[kLayerWeights][2] = {{H, -1}, {num_heads * d.D, H}, {num_kv_heads * d.D, H},
                                            {num_kv_heads * d.D, H}, {H, num_heads * d.D}, {H, -1}, {d.I, H},
                                            {d.I, H}, {H, d.I}};
  for (int64_t l = 0; l < L; ++l) {
    for (int i = 0; i < kLayerWeights; ++i) {
      const at::Tensor& w = weights[l * kLayerWeights + i];
      const std::string name = "weights[" + std::to_string(l * kLayerWeights + i) + "] (layer " + std::to_string(l) +
                               " " + layer_weight_name(i) + ")";
      check_defined(w, op, name.c_str());
      check_same_device(w, h, op, name.c_str(), "h");
      check_contiguous(w, op, name.c_str());
      if (shapes[i][1] < 0) {  // a norm weight
        TORCH_CHECK(w.dim() == 1 && w.size(0) == H, op, ": ", name, " must be [H] = [", H, "], got shape ", w.sizes());
        TORCH_CHECK(w.scalar_type() == h.scalar_type() || w.scalar_type() == at::kFloat, op, ": ", name,
                    " must have the dtype of h (", dtype_name(h.scalar_type()), ") or be float32, got ",
                    dtype_name(w.scalar_type()));
      } else {
        TORCH_CHECK(w.dim() == 2 && w.size(0) == shapes[i][0] && w.size(1) == shapes[i][1], op, ": ", name,
                    " must be [", shapes[i][0], ", ", shapes[i][1], "], got shape ", w.sizes());
        check_same_dtype(w, h, op, name.c_str(), "h");
      }
    }
    for (int kv = 0; kv < 2; ++kv) {
      const at::Tensor& c = kv == 0 ? k_caches[l] : v_caches[l];
      const std::string name = std::string(kv == 0 ? "k_caches[" : "v_caches[") + std::to_string(l) + "]";
      check_rank(c, 4, op, name.c_str(), "[B, nKV, S, D]");
      TORCH_CHECK(c.size(0) == B && c.size(1) == num_kv_heads && c.size(2) == d.S && c.size(3) == d.D, op, ": ", name,
                  " must be [B, nKV, S, D] = [", B, ", ", num_kv_heads, ", ", d.S, ", ", d.D, "], got shape ",
                  c.sizes());
      check_same_dtype(c, h, op, name.c_str(), "h");
      check_same_device(c, h, op, name.c_str(), "h");
      check_contiguous(c, op, name.c_str());
    }
    TORCH_CHECK(k_caches[l].data_ptr() != v_caches[l].data_ptr() || k_caches[l].numel() == 0, op, ": k_caches[", l,
                "] and v_caches[", l, "] must be different tensors");
  }
  return d;
}

}  // namespace layerskip
