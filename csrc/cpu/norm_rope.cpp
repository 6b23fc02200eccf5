// CPU kernels: rms_norm and rope (row-wise, batch invariant; see common/cpu_math.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_math.h"
#include "common/dispatch.h"
#include "common/validate.h"

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

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto d = validate_rms_norm(x, weight);
  check_device_type(x, c10::DeviceType::CPU, "rms_norm", "x");
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (d.rows == 0 || d.H == 0) return y;
  const float feps = static_cast<float>(eps);
  // Rows are independent: any split over threads gives the same bits.
  const int64_t grain = std::max<int64_t>(1, 16384 / d.H);
  LS_DISPATCH_FLOAT(x.scalar_type(), "rms_norm", "x", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (weight.scalar_type() == x.scalar_type()) {
      const scalar_t* wp = weight.const_data_ptr<scalar_t>();
      at::parallel_for(0, d.rows, grain, [&](int64_t b, int64_t e) { rms_norm_rows(xp, wp, yp, b, e, d.H, feps); });
    } else {
      const float* wp = weight.const_data_ptr<float>();
      at::parallel_for(0, d.rows, grain, [&](int64_t b, int64_t e) { rms_norm_rows(xp, wp, yp, b, e, d.H, feps); });
    }
  });
  return y;
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

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  const auto d = validate_rope(x, positions, cos, sin);
  check_device_type(x, c10::DeviceType::CPU, "rope", "x");
  check_position_values(positions, d.P);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = d.B * d.T;
  if (rows == 0 || d.nH == 0 || d.D == 0) return out;
  const int64_t grain = std::max<int64_t>(1, 16384 / (d.nH * d.D));
  LS_DISPATCH_FLOAT(x.scalar_type(), "rope", "x", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t* pp = positions.const_data_ptr<int64_t>();
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      rope_rows(xp, pp, cp, sp, op, b, e, d.T, d.pos_stride_b, d.nH, d.D);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rope", &rope_cpu);
}

}  // namespace layerskip::cpu
