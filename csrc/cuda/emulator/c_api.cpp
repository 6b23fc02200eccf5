// C entry points of every launcher in csrc/cuda/launchers.h, for the emulated-CUDA tests (ctypes). Each forwards
// its arguments unchanged (stream: none; the emulator runs launches synchronously), so a launcher whose signature
// changes fails to compile here instead of being called wrongly. dt: 0 float32, 1 bfloat16, 2 float16.
#include <vector>

#include "cuda/launchers.h"

#define LS_EMU_API extern "C" __attribute__((visibility("default")))

using layerskip::cuda::DType;
namespace lc = layerskip::cuda;

LS_EMU_API void ls_emu_rms_norm(int dt, int w_f32, const void* x, const void* w, void* y, int64_t rows, int64_t H,
                                float eps) {
  lc::launch_rms_norm(DType(dt), w_f32 != 0, x, w, y, rows, H, eps, nullptr);
}

LS_EMU_API void ls_emu_rope(int dt, const void* x, const int64_t* positions, const float* cos, const float* sin,
                            void* out, int64_t B, int64_t T, int64_t pos_stride_b, int64_t nH, int64_t D, int64_t P) {
  lc::launch_rope(DType(dt), x, positions, cos, sin, out, B, T, pos_stride_b, nH, D, P, nullptr);
}

LS_EMU_API void ls_emu_kv_cache_write(int dt, void* k_cache, void* v_cache, const void* k, const void* v,
                                      const int64_t* start, int64_t B, int64_t T, int64_t nKV, int64_t S, int64_t D) {
  lc::launch_kv_cache_write(DType(dt), k_cache, v_cache, k, v, start, B, T, nKV, S, D, nullptr);
}

LS_EMU_API int64_t ls_emu_attention_scratch(int64_t B, int64_t T, int64_t nH, int64_t S, int64_t D) {
  return lc::attention_scratch(B, T, nH, S, D);
}

LS_EMU_API void ls_emu_cache_attention(int dt, const void* q, const void* k_cache, const void* v_cache,
                                       const int64_t* start, void* out, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                                       int64_t S, int64_t D, float scale, float* scratch) {
  lc::launch_cache_attention(DType(dt), q, k_cache, v_cache, start, out, B, T, nH, nKV, S, D, scale, scratch, nullptr);
}

LS_EMU_API void ls_emu_decoder_attention(int dt, const void* q, const void* k, const void* v, const int64_t* positions,
                                         int64_t pos_stride_b, const float* cos, const float* sin, int64_t P,
                                         void* k_cache, void* v_cache, const int64_t* start, void* out, int64_t B,
                                         int64_t T, int64_t nH, int64_t nKV, int64_t S, int64_t D, float scale,
                                         float* scratch) {
  lc::launch_decoder_attention(DType(dt), q, k, v, positions, pos_stride_b, cos, sin, P, k_cache, v_cache, start, out,
                               B, T, nH, nKV, S, D, scale, scratch, nullptr);
}

LS_EMU_API void ls_emu_linear(int dt, const void* x, const void* w, void* out, int64_t M, int64_t K, int64_t N) {
  lc::launch_linear(DType(dt), x, w, out, M, K, N, nullptr);
}

// ws, outs, Ns: n targets side by side.
LS_EMU_API void ls_emu_linear_multi(int dt, const void* x, int64_t M, int64_t K, const void* const* ws,
                                    void* const* outs, const int64_t* Ns, int n) {
  lc::LinearTarget t[3] = {};
  for (int i = 0; i < n && i < 3; ++i) t[i] = {ws[i], outs[i], Ns[i]};
  lc::launch_linear_multi(DType(dt), x, M, K, t, n, nullptr);
}

LS_EMU_API void ls_emu_linear_residual(int dt, const void* x, const void* x2, const void* w, void* h, int64_t M,
                                       int64_t K, int64_t N) {
  lc::launch_linear_residual(DType(dt), x, x2, w, h, M, K, N, nullptr);
}

// weights [L * 9], norm_f32 [L * 2], caches [L] each; dims = B T H nH nKV D I S P pos_stride_b; scratch = x q k v attn
// gate up (of dt) then the attention floats.
LS_EMU_API void ls_emu_decoder_layers(int dt, void* h, const void* const* weights, const int* norm_f32,
                                      void* const* k_caches, void* const* v_caches, int64_t L, const int64_t* dims,
                                      const int64_t* start, const int64_t* positions, const float* cos,
                                      const float* sin, float eps, float scale, void* const* scratch,
                                      lc::SiluInPlace silu, void* silu_ctx) {
  std::vector<lc::DecoderLayer> layers(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    for (int i = 0; i < 9; ++i) layers[l].w[i] = weights[l * 9 + i];
    layers[l].norm_f32[0] = norm_f32[l * 2] != 0;
    layers[l].norm_f32[1] = norm_f32[l * 2 + 1] != 0;
    layers[l].k_cache = k_caches[l];
    layers[l].v_cache = v_caches[l];
  }
  const lc::DecoderDims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8], dims[9]};
  const lc::DecoderScratch s{scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5], scratch[6],
                             static_cast<float*>(scratch[7])};
  lc::launch_decoder_layers(DType(dt), h, layers.data(), L, d, start, positions, cos, sin, eps, scale, s, silu,
                            silu_ctx, nullptr);
}

LS_EMU_API int64_t ls_emu_head_argmax_blocks(int64_t V) { return lc::head_argmax_blocks(V); }

LS_EMU_API void ls_emu_head_argmax(int dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset,
                                   int64_t M, int64_t H, int64_t V, float* part_val, int64_t* part_idx, int64_t* out,
                                   int* errors) {
  lc::launch_head_argmax(DType(dt), normed, w, rows_w, subset, M, H, V, part_val, part_idx, out, errors, nullptr);
}

LS_EMU_API void ls_emu_head_logits(int dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset,
                                   int64_t M, int64_t H, int64_t V, float* logits, int* errors) {
  lc::launch_head_logits(DType(dt), normed, w, rows_w, subset, M, H, V, logits, errors, nullptr);
}

LS_EMU_API int64_t ls_emu_head_rows_scratch(int64_t M, int64_t V) { return lc::head_rows_scratch(M, V); }

LS_EMU_API int64_t ls_emu_head_sample_scratch(int64_t M, int64_t V, int64_t blocks_per_row) {
  return lc::head_sample_scratch(M, V, blocks_per_row);
}

LS_EMU_API int64_t ls_emu_head_sample_blocks(int64_t V) { return lc::head_sample_blocks(V); }

LS_EMU_API void ls_emu_head_sample_rows(float* probs, const float* uniforms, const int64_t* subset, int64_t M,
                                        int64_t V, float temperature, int64_t top_k, double top_p, double* scratch,
                                        int64_t* tokens, int* errors, int64_t blocks_per_row) {
  lc::launch_head_sample_rows(probs, uniforms, subset, M, V, temperature, top_k, top_p, scratch, tokens, errors,
                              nullptr, blocks_per_row);
}

LS_EMU_API void ls_emu_head_log_softmax_rows(float* rows, int64_t M, int64_t V, double* scratch) {
  lc::launch_head_log_softmax_rows(rows, M, V, scratch, nullptr);
}

LS_EMU_API void ls_emu_verify_greedy(const int64_t* drafts, const int64_t* target, int64_t* positions,
                                     int64_t* accepted, int64_t* next, int64_t B, int64_t D) {
  lc::launch_verify_greedy(drafts, target, positions, accepted, next, B, D, nullptr);
}

LS_EMU_API int64_t ls_emu_verify_sampling_scratch(int64_t B, int64_t V) { return lc::verify_sampling_scratch(B, V); }

LS_EMU_API void ls_emu_verify_sampling(const int64_t* drafts, const float* q, const float* p, const float* uniforms,
                                       int64_t* positions, int64_t* accepted, int64_t* next, int64_t B, int64_t D,
                                       int64_t V, double* scratch, int* errors) {
  lc::launch_verify_sampling(drafts, q, p, uniforms, positions, accepted, next, B, D, V, scratch, errors, nullptr);
}
