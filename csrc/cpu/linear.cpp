// CPU kernels: linear (y = x W^T) and exit_head_argmax (argmax of rms_norm + linear, logits never materialised).
//
// Both run every output element through the one dot routine of csrc/cpu/gemm (16 lanes, fused multiply-add,
// fixed tree; see gemm.h), so a row's result never depends on M, on the blocking or on the thread count. Threads
// split the output columns (W rows) only, never K. Small M (decode, verification) streams each W row once for
// all rows of x: the register tile holds up to 8 rows of x against a few W rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_math.h"
#include "common/validate.h"
#include "cpu/gemm/gemm.h"
#include "cpu/linear_cpu.h"
#include "cpu/pool.h"
#include "cpu/rows.h"

namespace layerskip::cpu {

// ---- shared pieces (linear_cpu.h) ---------------------------------------------------------------------------------

int64_t gemm_block_cols(int64_t N, int64_t K, int64_t elt, int64_t M, int64_t threads, int64_t max_cols) {
  threads = std::max<int64_t>(1, threads);
  int64_t nb;
  if (M <= kGemmStreamRows) {
    // Weights streamed from memory: one long range per thread (the kernel reads it as a few far-apart
    // sequential streams), unless that is more than max_cols.
    nb = (N + threads - 1) / threads;
  } else {
    // Compute bound: ~96 KB of W per block stays in L2 while the row tiles pass over it; enough blocks to balance.
    const int64_t by_cache = std::max<int64_t>(24, (98304 / std::max<int64_t>(1, K * elt)) / 24 * 24);
    const int64_t by_balance = (N + 4 * threads - 1) / (4 * threads);
    nb = std::min(by_cache, by_balance);
  }
  nb = (nb + 7) / 8 * 8;
  return std::max<int64_t>(8, std::min(nb, max_cols));
}

void XPanel::build_f32(const float* x, int64_t rows, int64_t K) {
  M = rows;
  ld = gemm::padded_k(K, gemm::kBlockF32);
  b = nullptr;
  if (ld == K) {  // already the kernel's layout
    p = x;
    return;
  }
  buf.assign(static_cast<size_t>(M * ld), 0.0f);
  for (int64_t m = 0; m < M; ++m) std::memcpy(buf.data() + m * ld, x + m * K, sizeof(float) * K);
  p = buf.data();
}

void XPanel::build_bf16(const c10::BFloat16* x, int64_t rows, int64_t K) {
  M = rows;
  ld = gemm::padded_k(K, gemm::kBlockBF16);
  p = nullptr;
  if (ld == K) {
    b = reinterpret_cast<const uint16_t*>(x);
    return;
  }
  bbuf.assign(static_cast<size_t>(M * ld), 0);
  for (int64_t m = 0; m < M; ++m) std::memcpy(bbuf.data() + m * ld, x + m * K, sizeof(uint16_t) * K);
  b = bbuf.data();
}

void gemm_block(const XPanel& x, const at::Tensor& weight, int64_t j0, int64_t nw, const int64_t* idx,
                gemm::Out out) {
  const auto& kern = gemm::active();
  const int64_t K = weight.size(1);
  if (weight.scalar_type() == at::kFloat) {
    const float* w = weight.const_data_ptr<float>();
    kern.f32(x.p, x.M, x.ld, idx != nullptr ? w : w + j0 * K, K, idx, nw, K, out);
  } else {
    const auto* w = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<c10::BFloat16>());
    kern.bf16(x.b, x.M, x.ld, idx != nullptr ? w : w + j0 * K, K, idx, nw, K, out);
  }
}

void gemm_jobs(const XPanel& x, const GemmJob* jobs, int n_jobs) {
  if (x.M == 0 || n_jobs == 0) return;
  int64_t threads = std::max<int64_t>(1, pool_threads());
  int64_t work = 0;
  for (int j = 0; j < n_jobs; ++j) work += jobs[j].weight->numel() * (jobs[j].weight->element_size() + 4 * x.M);
  if (work < (int64_t(1) << 16)) threads = 1;  // tiny: a hand-off costs more than the work
  struct Block {
    int job;
    int64_t j0, nw;
  };
  std::vector<Block> blocks;
  if (x.M <= kGemmStreamRows) {
    // Streaming: a few slices per thread of every job, slice-major, so whichever threads run take them in order
    // (each slice is read as a few long sequential streams).
    const int64_t parts = threads == 1 ? 1 : 4 * threads;
    for (int64_t p = 0; p < parts; ++p) {
      for (int j = 0; j < n_jobs; ++j) {
        const int64_t N = jobs[j].weight->size(0);
        const int64_t per = ((N + parts - 1) / parts + 7) / 8 * 8;
        const int64_t j0 = p * per, j1 = std::min(N, (p + 1) * per);
        if (j1 > j0) blocks.push_back({j, j0, j1 - j0});
      }
    }
  } else {
    for (int j = 0; j < n_jobs; ++j) {
      const at::Tensor& w = *jobs[j].weight;
      const int64_t N = w.size(0);
      const int64_t nb = gemm_block_cols(N, w.size(1), w.element_size(), x.M, threads);
      for (int64_t j0 = 0; j0 < N; j0 += nb) blocks.push_back({j, j0, std::min(nb, N - j0)});
    }
  }
  parallel_items(
      static_cast<int64_t>(blocks.size()),
      [&](int64_t b) {
        const Block& blk = blocks[b];
        gemm::Out o = jobs[blk.job].out;
        if (o.f32 != nullptr)
          o.f32 += blk.j0;
        else
          o.bf16 += blk.j0;
        gemm_block(x, *jobs[blk.job].weight, blk.j0, blk.nw, nullptr, o);
      },
      threads);
}

void build_head_panel(XPanel& panel, const at::Tensor& h, const at::Tensor& norm_weight, float eps, int64_t M,
                      int64_t H) {
  // Normed rows, exactly as the rms_norm op computes them (rounded to h's dtype), as the gemm panel.
  panel.M = M;
  if (h.scalar_type() == at::kFloat) {
    panel.ld = gemm::padded_k(H, gemm::kBlockF32);
    panel.buf.assign(static_cast<size_t>(M * panel.ld), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      rms_norm_rows(h.const_data_ptr<float>() + m * H, norm_weight.const_data_ptr<float>(),
                    panel.buf.data() + m * panel.ld, 0, 1, H, eps);
    panel.p = panel.buf.data();
  } else {
    panel.ld = gemm::padded_k(H, gemm::kBlockBF16);
    panel.bbuf.assign(static_cast<size_t>(M * panel.ld), 0);
    for (int64_t m = 0; m < M; ++m) {
      const c10::BFloat16* xr = h.const_data_ptr<c10::BFloat16>() + m * H;
      auto* dst = reinterpret_cast<c10::BFloat16*>(panel.bbuf.data() + m * panel.ld);
      if (norm_weight.scalar_type() == at::kFloat)
        rms_norm_rows(xr, norm_weight.const_data_ptr<float>(), dst, 0, 1, H, eps);
      else
        rms_norm_rows(xr, norm_weight.const_data_ptr<c10::BFloat16>(), dst, 0, 1, H, eps);
    }
    panel.b = panel.bbuf.data();
  }
}

namespace {

// ---- linear -------------------------------------------------------------------------------------------------------

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  const auto d = validate_linear(x, weight);
  check_device_type(x, c10::DeviceType::CPU, "linear", "x");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d.N;
  at::Tensor out = at::empty(shape, x.options());
  if (d.M == 0 || d.N == 0) return out;
  if (d.K == 0) return out.zero_();
  XPanel panel;
  if (x.scalar_type() == at::kFloat)
    panel.build_f32(x.const_data_ptr<float>(), d.M, d.K);
  else
    panel.build_bf16(x.const_data_ptr<c10::BFloat16>(), d.M, d.K);
  GemmJob job{&weight, {}};
  job.out.ld = d.N;
  if (x.scalar_type() == at::kFloat)
    job.out.f32 = out.mutable_data_ptr<float>();
  else
    job.out.bf16 = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<c10::BFloat16>());
  gemm_jobs(panel, &job, 1);
  return out;
}

// ---- exit_head_argmax ---------------------------------------------------------------------------------------------

// torch.argmax's order: NaN beats everything (the first NaN wins), then larger values; ties keep the earlier index.
inline bool takes(float v, float best, int64_t best_idx) {
  return best_idx < 0 || (!std::isnan(best) && (std::isnan(v) || v > best));
}

at::Tensor exit_head_argmax_cpu(const at::Tensor& h, const at::Tensor& norm_weight, double eps,
                                const at::Tensor& lm_head, const std::optional<at::Tensor>& vocab_subset) {
  constexpr const char* op = "exit_head_argmax";
  const auto d = validate_exit_head_argmax(h, norm_weight, lm_head, vocab_subset);
  check_device_type(h, c10::DeviceType::CPU, op, "h");
  if (d.subset) check_subset_values(*vocab_subset, lm_head.size(0));
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end() - 1);
  at::Tensor out = at::empty(shape, h.options().dtype(at::kLong));
  if (d.M == 0) return out;
  const float feps = static_cast<float>(eps);
  XPanel panel;
  build_head_panel(panel, h, norm_weight, feps, d.M, d.H);
  const bool f32 = h.scalar_type() == at::kFloat;

  const int64_t* subset = d.subset ? vocab_subset->const_data_ptr<int64_t>() : nullptr;
  const int64_t elt = lm_head.element_size();
  // Blocks of at most 2048 columns bound the per-thread logits tile; a few per thread balance them.
  const int64_t nb = gemm_block_cols(d.V, d.H, elt, d.M, 4 * pool_threads(), 2048);
  const int64_t nblocks = (d.V + nb - 1) / nb;
  // Best (value, column) of every block and row; combined in block order below, so the split over threads
  // cannot change the answer (ties: the lowest column, as torch.argmax).
  std::vector<float> bval(static_cast<size_t>(nblocks * d.M));
  std::vector<int64_t> bidx(static_cast<size_t>(nblocks * d.M));
  const int64_t work = d.V * d.H * (elt + 4 * d.M);
  const int64_t threads = work < (int64_t(1) << 16) ? 1 : pool_threads();
  parallel_items(
      nblocks,
      [&](int64_t b) {
        thread_local std::vector<float> tile;
        if (static_cast<int64_t>(tile.size()) < d.M * nb) tile.resize(static_cast<size_t>(d.M * nb));
        const int64_t j0 = b * nb, nw = std::min(nb, d.V - j0);
        gemm::Out o;
        o.f32 = tile.data();
        o.ld = nb;
        gemm_block(panel, lm_head, j0, nw, subset != nullptr ? subset + j0 : nullptr, o);
        for (int64_t m = 0; m < d.M; ++m) {
          float best = -std::numeric_limits<float>::infinity();
          int64_t best_j = -1;
          const float* row = tile.data() + m * nb;
          for (int64_t j = 0; j < nw; ++j) {
            // The logit linear() would return: rounded to h's dtype.
            const float v = f32 ? row[j] : to_f32(from_f32<c10::BFloat16>(row[j]));
            if (takes(v, best, best_j)) {
              best = v;
              best_j = j0 + j;
            }
          }
          bval[b * d.M + m] = best;
          bidx[b * d.M + m] = best_j;
        }
      },
      threads);
  int64_t* op_ = out.mutable_data_ptr<int64_t>();
  for (int64_t m = 0; m < d.M; ++m) {
    float best = -std::numeric_limits<float>::infinity();
    int64_t best_j = -1;
    for (int64_t b = 0; b < nblocks; ++b) {
      if (takes(bval[b * d.M + m], best, best_j)) {
        best = bval[b * d.M + m];
        best_j = bidx[b * d.M + m];
      }
    }
    op_[m] = subset != nullptr ? subset[best_j] : best_j;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("exit_head_argmax", &exit_head_argmax_cpu);
}

}  // namespace layerskip::cpu
