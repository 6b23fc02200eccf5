// Pieces of the CPU linear kernel shared by linear.cpp and the fused ops (so fused results are bitwise the ops').
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu {

// Rows of x up to which the gemm kernels stream W from memory (kernels.inc kStreamRows).
constexpr int64_t kGemmStreamRows = 16;

// Columns per work block of an M x N gemm with K-long W rows of elt bytes (speed only, never results).
int64_t gemm_block_cols(int64_t N, int64_t K, int64_t elt, int64_t M, int64_t threads,
                        int64_t max_cols = int64_t(1) << 40);

// x rows as the gemm kernels read them (gemm.h): float32 rows padded to a multiple of 16, or bfloat16 rows padded
// to a multiple of 32, zeros in the padding. No copy when K is already such a multiple.
struct XPanel {
  const float* p = nullptr;       // float32 rows (for float32 W)
  const uint16_t* b = nullptr;    // bfloat16 rows (for bfloat16 W)
  int64_t M = 0, ld = 0;
  std::vector<float> buf;
  std::vector<uint16_t> bbuf;
  void build_f32(const float* x, int64_t rows, int64_t K);
  void build_bf16(const c10::BFloat16* x, int64_t rows, int64_t K);
};

// The exit head's gemm panel: rms_norm(h[M, H], norm_weight[H], eps) row by row exactly as the rms_norm op computes
// it (rounded to h's dtype: float32 or bfloat16), so linear over it gives the native ops' logits bit for bit.
void build_head_panel(XPanel& panel, const at::Tensor& h, const at::Tensor& norm_weight, float eps, int64_t M,
                      int64_t H);

// Columns [j0, j0 + nw) of x W^T (weight [N, K] float32 or bfloat16; with idx, column j is row idx[j] of W and
// idx points at the block's first entry) into out.
void gemm_block(const XPanel& x, const at::Tensor& weight, int64_t j0, int64_t nw, const int64_t* idx,
                gemm::Out out);

// Several gemms over the same x (e.g. q/k/v, gate/up) in one parallel region: out_j = x W_j^T.
struct GemmJob {
  const at::Tensor* weight;  // [N, K] float32 / bfloat16
  gemm::Out out;
};
void gemm_jobs(const XPanel& x, const GemmJob* jobs, int n_jobs);

}  // namespace layerskip::cpu
