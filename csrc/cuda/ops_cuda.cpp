// CUDA twins of the CPU ops: same checks (common/validate.h), device guard, current stream, launch check.
// The values of start / positions are NOT read here (that would synchronise with the host): the Python caller
// validates them; the kernels only guard their memory accesses (see launchers.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "common/poison.h"
#include "common/validate.h"
#include "cuda/launchers.h"
#include "cuda/prefill_cuda.h"

namespace layerskip::cuda {
namespace {

DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_grid(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many rows for one launch (", blocks, ")");
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// The device error word of t's device (launchers.h kDeviceError*): one int per device, made on first use and kept
// for the process (CUDA graphs capture its address).
at::Tensor& error_word(const at::Tensor& t) {
  static std::mutex mu;
  static std::vector<at::Tensor> words;
  const std::lock_guard<std::mutex> lock(mu);
  const auto i = static_cast<size_t>(t.get_device());
  if (words.size() <= i) words.resize(i + 1);
  if (!words[i].defined()) words[i] = at::zeros({1}, t.options().dtype(at::kInt));
  return words[i];
}
int* errors_of(const at::Tensor& t) { return error_word(t).mutable_data_ptr<int>(); }

int64_t take_device_errors_cuda(const at::Tensor& like) {
  check_device_type(like, c10::DeviceType::CUDA, "take_device_errors", "like");
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor& w = error_word(like);
  const int64_t bits = w.item<int>();  // synchronises with the stream
  if (bits != 0) w.zero_();
  return bits;
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto d = validate_rms_norm(x, weight);
  check_device_type(x, c10::DeviceType::CUDA, "rms_norm", "x");
  check_grid(d.rows, "rms_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  launch_rms_norm(to_dtype(x, "rms_norm", "x"), weight.scalar_type() != x.scalar_type(), x.const_data_ptr(),
                  weight.const_data_ptr(), y.mutable_data_ptr(), d.rows, d.H, static_cast<float>(eps),
                  stream_of(x));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  const auto d = validate_rope(x, positions, cos, sin);
  check_device_type(x, c10::DeviceType::CUDA, "rope", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  launch_rope(to_dtype(x, "rope", "x"), x.const_data_ptr(), positions.const_data_ptr<int64_t>(),
              cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), out.mutable_data_ptr(), d.B, d.T,
              d.pos_stride_b, d.nH, d.D, d.P, stream_of(x));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void kv_cache_write_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& start) {
  const auto d = validate_kv_cache_write(k_cache, v_cache, k, v, start);
  check_device_type(k, c10::DeviceType::CUDA, "kv_cache_write", "k");
  const c10::cuda::CUDAGuard guard(k.device());
  launch_kv_cache_write(to_dtype(k, "kv_cache_write", "k"), k_cache.mutable_data_ptr(), v_cache.mutable_data_ptr(),
                        k.const_data_ptr(), v.const_data_ptr(), start.const_data_ptr<int64_t>(), d.B, d.T, d.nKV,
                        d.S, d.D, stream_of(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The attention kernels' grid: chunks x (KV heads x row groups) x B (grid.y, grid.z <= 65535).
void check_attention_grid(int64_t B, int64_t T, int64_t nH, int64_t nKV, const char* op) {
  check_grid(B * T * nH, op);
  TORCH_CHECK(B <= 65535 && nKV * ((nH / nKV) * T + 7) <= 65535 * 8, op, ": too many sequences or heads for one launch");
}

// float32 scratch of the attention kernels (the chunks' partial softmax), from the caching allocator: stream-ordered,
// and captured with a CUDA graph like any other allocation.
at::Tensor attention_scratch_for(const at::Tensor& like, int64_t B, int64_t T, int64_t nH, int64_t S, int64_t D) {
  return at::empty({std::max<int64_t>(1, attention_scratch(B, T, nH, S, D))}, like.options().dtype(at::kFloat));
}

at::Tensor cache_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& start, double scale) {
  const auto d = validate_cache_attention(q, k_cache, v_cache, start);
  check_device_type(q, c10::DeviceType::CUDA, "cache_attention", "q");
  check_attention_grid(d.B, d.T, d.nH, d.nKV, "cache_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor scratch = attention_scratch_for(q, d.B, d.T, d.nH, d.S, d.D);
  launch_cache_attention(to_dtype(q, "cache_attention", "q"), q.const_data_ptr(), k_cache.const_data_ptr(),
                         v_cache.const_data_ptr(), start.const_data_ptr<int64_t>(), out.mutable_data_ptr(), d.B,
                         d.T, d.nH, d.nKV, d.S, d.D, static_cast<float>(scale), scratch.mutable_data_ptr<float>(),
                         stream_of(q));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight) {
  const auto d = validate_linear(x, weight);
  check_device_type(x, c10::DeviceType::CUDA, "linear", "x");
  TORCH_CHECK((d.M + 15) / 16 <= 65535, "linear: too many rows for one launch (", d.M, ")");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d.N;
  at::Tensor out = at::empty(shape, x.options());
  if (d.M == 0 || d.N == 0) return out;
  if (d.K == 0) return out.zero_();
  launch_linear(to_dtype(x, "linear", "x"), x.const_data_ptr(), weight.const_data_ptr(), out.mutable_data_ptr(), d.M,
                d.K, d.N, stream_of(x));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor exit_head_argmax_cuda(const at::Tensor& h, const at::Tensor& norm_weight, double eps,
                                 const at::Tensor& lm_head, const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_argmax";
  const auto d = validate_exit_head_argmax(h, norm_weight, lm_head, vocab_subset);
  check_device_type(h, c10::DeviceType::CUDA, op, "h");
  TORCH_CHECK((d.M + 15) / 16 <= 65535 && d.M <= std::numeric_limits<int32_t>::max(), op,
              ": too many rows for one launch (", d.M, ")");
  const c10::cuda::CUDAGuard guard(h.device());
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end() - 1);
  at::Tensor out = at::empty(shape, h.options().dtype(at::kLong));
  if (d.M == 0) return out;
  const DType dt = to_dtype(h, op, "h");
  const cudaStream_t stream = stream_of(h);
  // The normed rows exactly as the rms_norm op computes them, then the linear kernel's dot per column.
  at::Tensor normed = at::empty({d.M, d.H}, h.options());
  launch_rms_norm(dt, norm_weight.scalar_type() != h.scalar_type(), h.const_data_ptr(), norm_weight.const_data_ptr(),
                  normed.mutable_data_ptr(), d.M, d.H, static_cast<float>(eps), stream);
  const int64_t nblk = head_argmax_blocks(d.V);
  at::Tensor part_val = at::empty({d.M * nblk}, h.options().dtype(at::kFloat));
  at::Tensor part_idx = at::empty({d.M * nblk}, h.options().dtype(at::kLong));
  launch_head_argmax(dt, normed.const_data_ptr(), lm_head.const_data_ptr(), lm_head.size(0),
                     d.subset ? vocab_subset->const_data_ptr<int64_t>() : nullptr, d.M, d.H, d.V,
                     part_val.mutable_data_ptr<float>(), part_idx.mutable_data_ptr<int64_t>(),
                     out.mutable_data_ptr<int64_t>(), errors_of(h), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// exit_head_sample / exit_head_log_softmax: the rms_norm kernel, the linear kernel's columns written as float32
// logits into the output, then one block per row over them in place. All on the current stream, no host sync (the
// values of uniforms and vocab_subset are not checked here: see launchers.h for what bad ones do).
void head_logits_cuda(const char* op, const HeadDims& d, const at::Tensor& h, const at::Tensor& norm_weight,
                            double eps, const at::Tensor& lm_head, const std::optional<at::Tensor>& vocab_subset,
                            at::Tensor out /* [M, V] float32 */) {
  const DType dt = to_dtype(h, op, "h");
  const cudaStream_t stream = stream_of(h);
  at::Tensor normed = at::empty({d.M, d.H}, h.options());
  launch_rms_norm(dt, norm_weight.scalar_type() != h.scalar_type(), h.const_data_ptr(), norm_weight.const_data_ptr(),
                  normed.mutable_data_ptr(), d.M, d.H, static_cast<float>(eps), stream);
  launch_head_logits(dt, normed.const_data_ptr(), lm_head.const_data_ptr(), lm_head.size(0),
                     d.subset ? vocab_subset->const_data_ptr<int64_t>() : nullptr, d.M, d.H, d.V,
                     out.mutable_data_ptr<float>(), errors_of(h), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}  // normed may be freed now: the caching allocator reuses it only in stream order, after these kernels

void check_head_rows(const char* op, const HeadDims& d) {
  TORCH_CHECK((d.M + 15) / 16 <= 65535 && d.M <= std::numeric_limits<int32_t>::max(), op,
              ": too many rows for one launch (", d.M, ")");
}

std::tuple<at::Tensor, at::Tensor> exit_head_sample_cuda(const at::Tensor& h, const at::Tensor& norm_weight,
                                                         double eps, const at::Tensor& lm_head,
                                                         const at::Tensor& uniforms, double temperature,
                                                         int64_t top_k, double top_p,
                                                         const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_sample";
  const auto d = validate_exit_head_sample(h, norm_weight, lm_head, uniforms, temperature, top_k, top_p,
                                           vocab_subset);
  check_device_type(h, c10::DeviceType::CUDA, op, "h");
  check_head_rows(op, d);
  const c10::cuda::CUDAGuard guard(h.device());
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end() - 1);
  at::Tensor tokens = at::empty(shape, h.options().dtype(at::kLong));
  shape.push_back(d.V);
  at::Tensor probs = at::empty(shape, h.options().dtype(at::kFloat));
  if (poison_outputs().load()) {
    tokens.fill_(-1);
    probs.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (d.M == 0) return {tokens, probs};
  head_logits_cuda(op, d, h, norm_weight, eps, lm_head, vocab_subset, probs);
  at::Tensor scratch = at::empty({std::max<int64_t>(1, head_sample_scratch(d.M, d.V))}, h.options().dtype(at::kDouble));
  launch_head_sample_rows(probs.mutable_data_ptr<float>(), uniforms.const_data_ptr<float>(),
                          d.subset ? vocab_subset->const_data_ptr<int64_t>() : nullptr, d.M, d.V,
                          static_cast<float>(temperature), top_k, top_p, scratch.mutable_data_ptr<double>(),
                          tokens.mutable_data_ptr<int64_t>(), errors_of(h), stream_of(h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, probs};
}

at::Tensor exit_head_log_softmax_cuda(const at::Tensor& h, const at::Tensor& norm_weight, double eps,
                                      const at::Tensor& lm_head, const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_log_softmax";
  const auto d = validate_exit_head_log_softmax(h, norm_weight, lm_head, vocab_subset);
  check_device_type(h, c10::DeviceType::CUDA, op, "h");
  check_head_rows(op, d);
  const c10::cuda::CUDAGuard guard(h.device());
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end() - 1);
  shape.push_back(d.V);
  at::Tensor out = at::empty(shape, h.options().dtype(at::kFloat));
  if (poison_outputs().load()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (d.M == 0) return out;
  head_logits_cuda(op, d, h, norm_weight, eps, lm_head, vocab_subset, out);
  at::Tensor scratch = at::empty({std::max<int64_t>(1, head_rows_scratch(d.M, d.V))}, h.options().dtype(at::kDouble));
  launch_head_log_softmax_rows(out.mutable_data_ptr<float>(), d.M, d.V, scratch.mutable_data_ptr<double>(),
                               stream_of(h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// exit_head_top2: the head's float32 logits as exit_head_log_softmax computes them, then ATen's reductions over
// them on the device (no host sync): argmax for the token (its first maximum: exit_head_argmax's tie rule) and
// topk for the two largest values. Only the draft stop model reads these, once per draft step; not a hot kernel.
std::tuple<at::Tensor, at::Tensor> exit_head_top2_cuda(const at::Tensor& h, const at::Tensor& norm_weight, double eps,
                                                       const at::Tensor& lm_head,
                                                       const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_top2";
  const auto d = validate_exit_head(op, h, norm_weight, lm_head, vocab_subset);
  check_device_type(h, c10::DeviceType::CUDA, op, "h");
  check_head_rows(op, d);
  TORCH_CHECK(d.V >= 2, op, ": needs at least 2 vocabulary columns, got V = ", d.V);
  const c10::cuda::CUDAGuard guard(h.device());
  const std::vector<int64_t> rows(h.sizes().begin(), h.sizes().end() - 1);
  std::vector<int64_t> pairs = rows;
  pairs.push_back(2);
  if (d.M == 0) return {at::empty(rows, h.options().dtype(at::kLong)), at::empty(pairs, h.options().dtype(at::kFloat))};
  at::Tensor logits = at::empty({d.M, d.V}, h.options().dtype(at::kFloat));
  if (poison_outputs().load()) logits.fill_(std::numeric_limits<double>::quiet_NaN());
  head_logits_cuda(op, d, h, norm_weight, eps, lm_head, vocab_subset, logits);
  const at::Tensor col = at::argmax(logits, 1);  // [M]
  const at::Tensor tokens = d.subset ? vocab_subset->index_select(0, col) : col;
  const at::Tensor top2 = std::get<0>(at::topk(logits, 2, 1));  // [M, 2], largest first
  return {tokens.view(rows), top2.view(pairs)};
}

std::tuple<at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& drafts, const at::Tensor& target,
                                                      const at::Tensor& positions) {
  const auto d = validate_verify_greedy(drafts, target, positions);
  check_device_type(drafts, c10::DeviceType::CUDA, "verify_greedy", "drafts");
  const c10::cuda::CUDAGuard guard(drafts.device());
  at::Tensor accepted = at::empty({d.B}, drafts.options());
  at::Tensor next = at::empty({d.B}, drafts.options());
  launch_verify_greedy(drafts.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(),
                       positions.mutable_data_ptr<int64_t>(), accepted.mutable_data_ptr<int64_t>(),
                       next.mutable_data_ptr<int64_t>(), d.B, d.d, stream_of(drafts));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, next};
}

std::tuple<at::Tensor, at::Tensor> verify_sampling_cuda(const at::Tensor& drafts, const at::Tensor& q,
                                                        const at::Tensor& p, const at::Tensor& uniforms,
                                                        const at::Tensor& positions) {
  const auto d = validate_verify_sampling(drafts, q, p, uniforms, positions);
  check_device_type(drafts, c10::DeviceType::CUDA, "verify_sampling", "drafts");
  check_grid(d.B, "verify_sampling");
  const c10::cuda::CUDAGuard guard(drafts.device());
  at::Tensor accepted = at::empty({d.B}, drafts.options());
  at::Tensor next = at::empty({d.B}, drafts.options());
  at::Tensor scratch = at::empty({std::max<int64_t>(1, verify_sampling_scratch(d.B, d.V))},
                                 q.options().dtype(at::kDouble));
  launch_verify_sampling(drafts.const_data_ptr<int64_t>(), q.const_data_ptr<float>(), p.const_data_ptr<float>(),
                         uniforms.const_data_ptr<float>(), positions.mutable_data_ptr<int64_t>(),
                         accepted.mutable_data_ptr<int64_t>(), next.mutable_data_ptr<int64_t>(), d.B, d.d, d.V,
                         scratch.mutable_data_ptr<double>(), errors_of(drafts), stream_of(drafts));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, next};
}

// The decoder layers. A prompt (prefill_cuda.h: T > 16, every start 0) goes through cuBLAS and SDPA; everything else
// (decode, draft and verification steps) through launch_decoder_layers: 9 launches per layer, each step bitwise
// the native op it replaces (layer_range_forward_native_composed), every row's arithmetic independent of T.
at::Tensor layer_range_forward_cuda(const at::Tensor& h, at::TensorList weights, at::TensorList k_caches,
                                    at::TensorList v_caches, const at::Tensor& start, const at::Tensor& positions,
                                    const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                                    int64_t num_kv_heads, double eps, double scale) {
  constexpr const char* op = "layer_range_forward";
  const auto d = validate_layer_range(h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads,
                                      num_kv_heads);
  check_device_type(h, c10::DeviceType::CUDA, op, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = h.clone(at::MemoryFormat::Contiguous);
  if (d.L == 0 || d.B == 0 || d.T == 0) return out;
  const int64_t M = d.B * d.T;
  check_attention_grid(d.B, d.T, d.nH, d.nKV, op);
  TORCH_CHECK((M + 15) / 16 <= 65535, op, ": too many rows for one launch (", M, ")");
  if (takes_prefill_path(d, start)) {
    prefill_layers(d, out, weights, k_caches, v_caches, start, positions, cos, sin, eps, scale);
    return out;
  }
  const auto opts = h.options();
  at::Tensor x = at::empty({M, d.H}, opts), q = at::empty({M, d.nH * d.D}, opts), attn = at::empty_like(q);
  at::Tensor k = at::empty({M, d.nKV * d.D}, opts), v = at::empty_like(k);
  at::Tensor gate = at::empty({M, d.I}, opts), up = at::empty_like(gate);
  at::Tensor att = attention_scratch_for(h, d.B, d.T, d.nH, d.S, d.D);
  std::vector<DecoderLayer> layers(static_cast<size_t>(d.L));
  for (int64_t l = 0; l < d.L; ++l) {
    DecoderLayer& w = layers[l];
    for (int i = 0; i < kLayerWeights; ++i) w.w[i] = weights[l * kLayerWeights + i].const_data_ptr();
    w.norm_f32[0] = weights[l * kLayerWeights].scalar_type() != h.scalar_type();
    w.norm_f32[1] = weights[l * kLayerWeights + 5].scalar_type() != h.scalar_type();
    w.k_cache = k_caches[l].mutable_data_ptr();
    w.v_cache = v_caches[l].mutable_data_ptr();
  }
  const DecoderDims dims{d.B, d.T, d.H, d.nH, d.nKV, d.D, d.I, d.S, d.P, d.pos_stride_b};
  const DecoderScratch s{x.mutable_data_ptr(),    q.mutable_data_ptr(),  k.mutable_data_ptr(),
                         v.mutable_data_ptr(),    attn.mutable_data_ptr(), gate.mutable_data_ptr(),
                         up.mutable_data_ptr(),   att.mutable_data_ptr<float>()};
  // torch's silu, in place on the gate (its own CUDA kernel: bitwise the model's F.silu)
  const SiluInPlace silu = [](void* ctx, void*, int64_t) { at::silu_(*static_cast<at::Tensor*>(ctx)); };
  launch_decoder_layers(to_dtype(h, op, "h"), out.mutable_data_ptr(), layers.data(), d.L, dims,
                        start.const_data_ptr<int64_t>(), positions.const_data_ptr<int64_t>(), cos.const_data_ptr<float>(),
                        sin.const_data_ptr<float>(), static_cast<float>(eps), static_cast<float>(scale), s, silu, &gate,
                        stream_of(h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("kv_cache_write", &kv_cache_write_cuda);
  m.impl("cache_attention", &cache_attention_cuda);
  m.impl("linear", &linear_cuda);
  m.impl("exit_head_argmax", &exit_head_argmax_cuda);
  m.impl("exit_head_sample", &exit_head_sample_cuda);
  m.impl("exit_head_log_softmax", &exit_head_log_softmax_cuda);
  m.impl("exit_head_top2", &exit_head_top2_cuda);
  m.impl("verify_greedy", &verify_greedy_cuda);
  m.impl("verify_sampling", &verify_sampling_cuda);
  m.impl("layer_range_forward", &layer_range_forward_cuda);
  m.impl("take_device_errors", &take_device_errors_cuda);
}

}  // namespace layerskip::cuda
