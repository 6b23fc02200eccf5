// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu; the decoder's layer sequence: decoder_host.cpp). Plain pointers and sizes only, so the .cu
// translation unit needs no torch headers (nvcc compiles it fast); csrc/cuda/ops_cuda.cpp does the argument
// checks, device guard, stream and launch check around them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace layerskip::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Bits of the device error word: an int on the device that kernels OR into when they meet a value the CPU op would
// reject but the host cannot read without synchronising (ops_cuda.cpp's take_device_errors reads and clears it).
// The kernels stay memory-safe whatever the values.
constexpr int kDeviceErrorVocabSubset = 1;  // a vocab_subset entry outside [0, lm_head rows): its column is NaN
constexpr int kDeviceErrorUniform = 2;      // a sampling uniform outside [0, 1) (or NaN)
constexpr int kDeviceErrorDraft = 4;        // a draft token outside [0, V): rejected

// x, y [rows, H] of dt; w [H] of dt, or float32 when w_f32.
void launch_rms_norm(DType dt, bool w_f32, const void* x, const void* w, void* y, int64_t rows, int64_t H,
                     float eps, cudaStream_t stream);

// x, out [B, T, nH, D]; positions [B, T] (pos_stride_b = T) or [1, T] (pos_stride_b = 0); cos, sin [P, D/2]
// float32. Rows with a position outside [0, P) are NaN.
void launch_rope(DType dt, const void* x, const int64_t* positions, const float* cos, const float* sin, void* out,
                 int64_t B, int64_t T, int64_t pos_stride_b, int64_t nH, int64_t D, int64_t P, cudaStream_t stream);

// k_cache, v_cache [B, nKV, S, D]; k, v [B, T, nKV, D]; start [B]. Tokens whose slot falls outside [0, S) are
// not written.
void launch_kv_cache_write(DType dt, void* k_cache, void* v_cache, const void* k, const void* v,
                           const int64_t* start, int64_t B, int64_t T, int64_t nKV, int64_t S, int64_t D,
                           cudaStream_t stream);

// float32 scratch elements launch_cache_attention / launch_decoder_attention need (the chunks' partial softmax).
int64_t attention_scratch(int64_t B, int64_t T, int64_t nH, int64_t S, int64_t D);

// q, out [B, T, nH, D]; k_cache, v_cache [B, nKV, S, D]; start [B]. Rows whose position start[b] + t falls
// outside [0, S) are NaN. D <= 256. Two launches (flash-decoding split over position-aligned chunks, combine).
void launch_cache_attention(DType dt, const void* q, const void* k_cache, const void* v_cache,
                            const int64_t* start, void* out, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                            int64_t S, int64_t D, float scale, float* scratch, cudaStream_t stream);

// The decoder's attention step in one split launch + the combine: rope(q), rope(k) at positions (as launch_rope),
// kv_cache_write of the roped k and v (as launch_kv_cache_write), then launch_cache_attention of the roped q: the
// same bits as those three launchers one after another. q [B, T, nH, D], k, v [B, T, nKV, D] raw projections.
void launch_decoder_attention(DType dt, const void* q, const void* k, const void* v, const int64_t* positions,
                              int64_t pos_stride_b, const float* cos, const float* sin, int64_t P, void* k_cache,
                              void* v_cache, const int64_t* start, void* out, int64_t B, int64_t T, int64_t nH,
                              int64_t nKV, int64_t S, int64_t D, float scale, float* scratch, cudaStream_t stream);

// x [M, K], w [N, K], out [M, N], all of dt. Fixed per-column summation order (gemv.cu): a row's result depends
// only on K, never on M, N, the launch or alignment.
void launch_linear(DType dt, const void* x, const void* w, void* out, int64_t M, int64_t K, int64_t N,
                   cudaStream_t stream);

// Several weight matrices over the same x in one launch (q/k/v, gate/up): out_i [M, N_i] = linear(x, w_i), each
// bitwise what launch_linear gives. 1 to 3 targets.
struct LinearTarget {
  const void* w;  // [N, K]
  void* out;      // [M, N]
  int64_t N;
};
void launch_linear_multi(DType dt, const void* x, int64_t M, int64_t K, const LinearTarget* targets, int n,
                         cudaStream_t stream);

// h [M, N] += linear(x, w) in place, rounded as torch's h + linear(x, w); with x2 (not null) the rows are
// T(x * x2) (torch's x * x2) instead of x. float32 / bfloat16 only (the decoder's dtypes).
void launch_linear_residual(DType dt, const void* x, const void* x2, const void* w, void* h, int64_t M, int64_t K,
                            int64_t N, cudaStream_t stream);

// Partials per row of launch_head_argmax (the size of part_val / part_idx is M * head_argmax_blocks(V)).
int64_t head_argmax_blocks(int64_t V);

// The first of launch_head_argmax's two launches: the partial argmax per (row, block of columns).
void launch_head_argmax_partial(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset,
                                int64_t M, int64_t H, int64_t V, float* part_val, int64_t* part_idx, int* errors,
                                cudaStream_t stream);

// out[m] = argmax_j linear(normed, w[subset])[m, j] mapped through subset (subset may be null: all V rows of w);
// normed [M, H] (already rms-normed, of dt), w [rows_w, H]; V = subset's length (or rows_w); ties -> lowest j, NaN
// first. A subset entry outside [0, rows_w) scores NaN (so it wins) and sets kDeviceErrorVocabSubset in *errors.
void launch_head_argmax(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset, int64_t M,
                        int64_t H, int64_t V, float* part_val, int64_t* part_idx, int64_t* out, int* errors,
                        cudaStream_t stream);

// logits[M, V] float32 = linear(normed, w[subset]) as the linear kernel computes each column, rounded to dt (the
// linear op's output) and widened; normed [M, H] (of dt), w [rows_w, H], subset [V] or null. A subset entry outside
// [0, rows_w) gives a NaN column and sets kDeviceErrorVocabSubset.
void launch_head_logits(DType dt, const void* normed, const void* w, int64_t rows_w, const int64_t* subset, int64_t M,
                        int64_t H, int64_t V, float* logits, int* errors, cudaStream_t stream);

// float64 scratch elements launch_head_sample_rows / launch_head_log_softmax_rows need for M rows of V.
int64_t head_rows_scratch(int64_t M, int64_t V);

// In place over probs [M, V] (the logits in, the filtered distribution out: common/head_filter.h), tokens [M] drawn
// with uniforms [M] (common/sampling.h; mapped through subset [V] when not null; V - 1 when there is no mass).
// A uniform outside [0, 1) sets kDeviceErrorUniform.
// blocks_per_row: 0 picks (head_sample_blocks: 1 for a short row, the one-block kernel; about 32 at large V, a launch
// per step over (P, M) blocks: the same bits); > 0 forces it (tests). scratch: head_sample_scratch(M, V, the same
// blocks_per_row) float64 elements.
void launch_head_sample_rows(float* probs, const float* uniforms, const int64_t* subset, int64_t M, int64_t V,
                             float temperature, int64_t top_k, double top_p, double* scratch, int64_t* tokens,
                             int* errors, cudaStream_t stream, int64_t blocks_per_row = 0);
int64_t head_sample_blocks(int64_t V);
int64_t head_sample_scratch(int64_t M, int64_t V, int64_t blocks_per_row = 0);

// In place over rows [M, V]: the logits in, their log_softmax out (float64 arithmetic, rounded once).
void launch_head_log_softmax_rows(float* rows, int64_t M, int64_t V, double* scratch, cudaStream_t stream);

// drafts [B, D], target [B, D+1], positions/accepted/next [B], all int64 (positions updated in place).
void launch_verify_greedy(const int64_t* drafts, const int64_t* target, int64_t* positions, int64_t* accepted,
                          int64_t* next, int64_t B, int64_t D, cudaStream_t stream);

// float64 scratch elements launch_verify_sampling needs.
int64_t verify_sampling_scratch(int64_t B, int64_t V);

// q [B, D, V], p [B, D+1, V], uniforms [B, D+1] float32; a draft outside [0, V) is rejected and sets
// kDeviceErrorDraft.
void launch_verify_sampling(const int64_t* drafts, const float* q, const float* p, const float* uniforms,
                            int64_t* positions, int64_t* accepted, int64_t* next, int64_t B, int64_t D, int64_t V,
                            double* scratch, int* errors, cudaStream_t stream);

// ---- the decoder layers of layer_range_forward for decode / verification shapes (decoder_host.cpp) ------------
struct DecoderLayer {
  const void* w[9];  // input_layernorm, q, k, v, o, post_attention_layernorm, gate, up, down (csrc/common/validate.h)
  bool norm_f32[2];  // the two norms' weights are float32 (else of dt)
  void* k_cache;     // [B, nKV, S, D]
  void* v_cache;
};
struct DecoderDims {
  int64_t B, T, H, nH, nKV, D, I, S, P, pos_stride_b;
};
struct DecoderScratch {  // of dt unless said: x [M, H], q [M, nH D], k, v [M, nKV D], attn [M, nH D], gate, up [M, I]
  void *x, *q, *k, *v, *attn, *gate, *up;
  float* attention;  // attention_scratch(B, T, nH, S, D) floats
};
// The one step taken from the framework: gate = silu(gate) in place over n elements of dt (torch's silu: its GPU
// kernel's exp is contracted with the + 1 under nvcc's default --fmad=true, which --fmad=false code cannot match).
using SiluInPlace = void (*)(void* ctx, void* gate, int64_t n);

// h [B, T, H] (in place) through the layers, exactly as the ops one by one (rms_norm, linear, rope, kv_cache_write,
// cache_attention, +, silu, *): per layer 9 launches (8 kernels and the silu).
void launch_decoder_layers(DType dt, void* h, const DecoderLayer* layers, int64_t L, const DecoderDims& d,
                           const int64_t* start, const int64_t* positions, const float* cos, const float* sin,
                           float eps, float scale, const DecoderScratch& s, SiluInPlace silu, void* silu_ctx,
                           cudaStream_t stream);

}  // namespace layerskip::cuda
