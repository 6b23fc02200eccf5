// The prompt path of layer_range_forward on a GPU (prefill_cuda.cpp): matmuls through cuBLAS, attention through
// scaled_dot_product_attention; decode / verification shapes stay on the batch-invariant kernels (ops_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/validate.h"

namespace layerskip::cuda {

// A call takes the prompt path when it is a prompt: more than kDecodeMaxTokens tokens, every sequence starting at
// slot 0, on a stream that is not being captured (the check reads `start`: one small host sync, never in a graph).
// Why this switch keeps greedy self-speculation lossless:
//   - autoregressive and self-speculative decoding prefill the same prompt with the same call, so they share its
//     results whatever computes them; no later step recomputes a prompt position;
//   - every decode step (T = 1), draft step (T = 1) and verification (T = d + 1, start > 0: it follows the prompt)
//     runs on the kernels, whose per-row arithmetic does not depend on T: a verification with d >= 16 (T > 16) has
//     start > 0 and so never takes this path;
//   - a later prompt (start > 0: a second turn) also stays on the kernels (correct, streams W once per 16 rows).
constexpr int64_t kDecodeMaxTokens = 16;

bool takes_prefill_path(const LayerRangeDims& d, const at::Tensor& start);

// out [B, T, H] (a copy of h) through the layers, writing the caches in their [B, nKV, S, D] layout.
void prefill_layers(const LayerRangeDims& d, at::Tensor& out, at::TensorList weights, at::TensorList k_caches,
                    at::TensorList v_caches, const at::Tensor& start, const at::Tensor& positions,
                    const at::Tensor& cos, const at::Tensor& sin, double eps, double scale);

}  // namespace layerskip::cuda
