// The decoder layers of layer_range_forward on decode / verification shapes (T <= 16): the launch sequence of one
// layer, host code only (no kernels, no torch: ops_cuda.cpp calls it on the GPU, tests/emulated_cuda.py under the
// emulator). Per layer, with M = B T rows:
//   x = rms_norm(h)                                   launch_rms_norm
//   q, k, v = linear(x, q_proj / k_proj / v_proj)     launch_linear_multi: one launch for the three
//   a = attention(rope(q), cache + rope(k), v)        launch_decoder_attention: rope, kv_cache_write, split; combine
//   h = h + linear(a, o_proj)                         launch_linear_residual: the add in the GEMV's epilogue
//   x = rms_norm(h)                                   launch_rms_norm
//   gate, up = linear(x, gate_proj / up_proj)         launch_linear_multi
//   gate = silu(gate)                                 the caller's silu (torch's, in place)
//   h = h + linear(gate * up, down_proj)              launch_linear_residual with x2: the * in the GEMV's x loads
// = 9 launches per layer (the ops one by one: 17), each step bitwise the op it replaces.
#include "cuda/launchers.h"

namespace layerskip::cuda {

void launch_decoder_layers(DType dt, void* h, const DecoderLayer* layers, int64_t L, const DecoderDims& d,
                           const int64_t* start, const int64_t* positions, const float* cos, const float* sin,
                           float eps, float scale, const DecoderScratch& s, SiluInPlace silu, void* silu_ctx,
                           cudaStream_t stream) {
  const int64_t M = d.B * d.T, qd = d.nH * d.D, kvd = d.nKV * d.D;
  if (M == 0) return;
  for (int64_t l = 0; l < L; ++l) {
    const DecoderLayer& w = layers[l];
    launch_rms_norm(dt, w.norm_f32[0], h, w.w[0], s.x, M, d.H, eps, stream);
    const LinearTarget qkv[3] = {{w.w[1], s.q, qd}, {w.w[2], s.k, kvd}, {w.w[3], s.v, kvd}};
    launch_linear_multi(dt, s.x, M, d.H, qkv, 3, stream);
    launch_decoder_attention(dt, s.q, s.k, s.v, positions, d.pos_stride_b, cos, sin, d.P, w.k_cache, w.v_cache, start,
                             s.attn, d.B, d.T, d.nH, d.nKV, d.S, d.D, scale, s.attention, stream);
    launch_linear_residual(dt, s.attn, nullptr, w.w[4], h, M, qd, d.H, stream);
    launch_rms_norm(dt, w.norm_f32[1], h, w.w[5], s.x, M, d.H, eps, stream);
    const LinearTarget gate_up[2] = {{w.w[6], s.gate, d.I}, {w.w[7], s.up, d.I}};
    launch_linear_multi(dt, s.x, M, d.H, gate_up, 2, stream);
    silu(silu_ctx, s.gate, M * d.I);
    launch_linear_residual(dt, s.gate, s.up, w.w[8], h, M, d.I, d.H, stream);
  }
}

}  // namespace layerskip::cuda
