// Per-row CPU kernels shared by the standalone ops and the fused ones (exit_head_argmax, layer_range_forward), so
// that a fused result is bitwise the result of the ops one by one. Row-wise and batch invariant: see
// common/cpu_math.h. Internal linkage: each translation unit compiles its own (identical) copy.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/cpu_math.h"

namespace layerskip::cpu {
namespace {

// ---- rms_norm ------------------------------------------------------------------------------------------------
// y = (x * rsqrt(mean(x^2) + eps)) * w, in float32, rounded once to x's dtype (as rms_norm_reference).
template <typename T, typename W>
LS_CPU_CLONES void rms_norm_rows(const T* x, const W* w, T* y, int64_t row_begin, int64_t row_end, int64_t H,
                                 float eps) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * H;
    T* yr = y + r * H;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= H; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float v = to_f32(xr[i + j]);
        acc[j] += v * v;
      }
    for (int j = 0; i + j < H; ++j) {
      const float v = to_f32(xr[i + j]);
      acc[j] += v * v;
    }
    const float mean = lane_sum(acc) / static_cast<float>(H);
    const float inv = 1.0f / std::sqrt(mean + eps);
    for (int64_t k = 0; k < H; ++k) yr[k] = from_f32<T>((to_f32(xr[k]) * inv) * to_f32(w[k]));
  }
}

// ---- rope ------------------------------------------------------------------------------------------------------
// Rotate-half: out[i] = x[i] c[i] - x[i+D/2] s[i], out[i+D/2] = x[i+D/2] c[i] + x[i] s[i] (rope_reference).
// positions[b * pos_stride_b + t] (pos_stride_b = 0: [1, T] positions shared by the batch).
template <typename T>
LS_CPU_CLONES void rope_rows(const T* x, const int64_t* positions, const float* cos, const float* sin, T* out,
                             int64_t bt_begin, int64_t bt_end, int64_t T_, int64_t pos_stride_b, int64_t nH,
                             int64_t D) {
  const int64_t half = D / 2;
  for (int64_t bt = bt_begin; bt < bt_end; ++bt) {
    const int64_t pos = positions[(bt / T_) * pos_stride_b + bt % T_];
    const float* c = cos + pos * half;
    const float* s = sin + pos * half;
    for (int64_t h = 0; h < nH; ++h) {
      const T* xr = x + (bt * nH + h) * D;
      T* yr = out + (bt * nH + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
        yr[i] = from_f32<T>(x1 * c[i] - x2 * s[i]);
        yr[i + half] = from_f32<T>(x2 * c[i] + x1 * s[i]);
      }
    }
  }
}

}  // namespace
}  // namespace layerskip::cpu
