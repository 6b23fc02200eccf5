// CPU kernels: rms_norm and rope (row-wise, batch invariant; see common/cpu_math.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_math.h"
#include "common/dispatch.h"
#include "common/validate.h"
#include "cpu/pool.h"
#include "cpu/rows.h"

namespace layerskip::cpu {
namespace {

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
      parallel_chunks(d.rows, grain, [&](int64_t b, int64_t e) { rms_norm_rows(xp, wp, yp, b, e, d.H, feps); });
    } else {
      const float* wp = weight.const_data_ptr<float>();
      parallel_chunks(d.rows, grain, [&](int64_t b, int64_t e) { rms_norm_rows(xp, wp, yp, b, e, d.H, feps); });
    }
  });
  return y;
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
    parallel_chunks(rows, grain, [&](int64_t b, int64_t e) {
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
