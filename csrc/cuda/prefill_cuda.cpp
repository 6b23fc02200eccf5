// layer_range_forward for a prompt on a GPU (see prefill_cuda.h for when): per layer
//   x = rms_norm(h)                                    our kernel (the op's arithmetic)
//   q, k, v = x Wq^T, x Wk^T, x Wv^T                   at::linear: cuBLAS, tensor cores for bfloat16
//   q, k = rope(q), rope(k); kv_cache_write(k, v)      our kernels: the cache in its layout, as decode reads it
//   a = softmax(q k^T * scale, causal) v               at::scaled_dot_product_attention over the prompt's own keys
//                                                      (every start is 0: slots 0 .. T-1), GQA by enable_gqa:
//                                                      flash / memory-efficient attention, no T x T matrix
//   h = h + a Wo^T;  x = rms_norm(h);  h = h + (silu(x Wg^T) * x Wu^T) Wd^T       at::linear, ATen elementwise
// Close to the ops one by one (cuBLAS sums in its own order), not bitwise: see prefill_cuda.h for why that keeps
// decoding lossless. Unverified here: no GPU runs it in this project's CI (benchmarks/gpu_check.sh does).
#include "cuda/prefill_cuda.h"

#include <ATen/ops/add.h>
#include <ATen/ops/any.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"

namespace layerskip::cuda {

bool takes_prefill_path(const LayerRangeDims& d, const at::Tensor& start) {
  if (d.T <= kDecodeMaxTokens) return false;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return false;
  return !at::any(at::ne(start, 0)).item<bool>();  // one host sync (never in a graph)
}

void prefill_layers(const LayerRangeDims& d, at::Tensor& out, at::TensorList weights, at::TensorList k_caches,
                    at::TensorList v_caches, const at::Tensor& start, const at::Tensor& positions,
                    const at::Tensor& cos, const at::Tensor& sin, double eps, double scale) {
  const DType dt = out.scalar_type() == at::kFloat ? DType::kFloat32 : DType::kBFloat16;  // validate_layer_range
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
  const int64_t M = d.B * d.T;
  const float feps = static_cast<float>(eps);
  at::Tensor xn = at::empty({d.B, d.T, d.H}, out.options());
  at::Tensor qr = at::empty({d.B, d.T, d.nH, d.D}, out.options());
  at::Tensor kr = at::empty({d.B, d.T, d.nKV, d.D}, out.options());
  for (int64_t l = 0; l < d.L; ++l) {
    const at::Tensor* W = weights.data() + l * kLayerWeights;
    launch_rms_norm(dt, W[0].scalar_type() != out.scalar_type(), out.const_data_ptr(), W[0].const_data_ptr(),
                    xn.mutable_data_ptr(), M, d.H, feps, stream);
    const at::Tensor q = at::linear(xn, W[1]);
    const at::Tensor k = at::linear(xn, W[2]);
    const at::Tensor v = at::linear(xn, W[3]).view({d.B, d.T, d.nKV, d.D});
    launch_rope(dt, q.const_data_ptr(), positions.const_data_ptr<int64_t>(), cos.const_data_ptr<float>(),
                sin.const_data_ptr<float>(), qr.mutable_data_ptr(), d.B, d.T, d.pos_stride_b, d.nH, d.D, d.P, stream);
    launch_rope(dt, k.const_data_ptr(), positions.const_data_ptr<int64_t>(), cos.const_data_ptr<float>(),
                sin.const_data_ptr<float>(), kr.mutable_data_ptr(), d.B, d.T, d.pos_stride_b, d.nKV, d.D, d.P, stream);
    launch_kv_cache_write(dt, k_caches[l].mutable_data_ptr(), v_caches[l].mutable_data_ptr(), kr.const_data_ptr(),
                          v.const_data_ptr(), start.const_data_ptr<int64_t>(), d.B, d.T, d.nKV, d.S, d.D, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // [B, heads, T, D] views of the prompt's q, k, v: its keys are exactly the slots just written
    const at::Tensor a = at::scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                                                          std::nullopt, 0.0, /*is_causal=*/true, scale,
                                                          /*enable_gqa=*/d.nH != d.nKV);
    at::add_out(out, out, at::linear(a.transpose(1, 2).reshape({d.B, d.T, d.nH * d.D}), W[4]));
    launch_rms_norm(dt, W[5].scalar_type() != out.scalar_type(), out.const_data_ptr(), W[5].const_data_ptr(),
                    xn.mutable_data_ptr(), M, d.H, feps, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor act = at::mul(at::silu(at::linear(xn, W[6])), at::linear(xn, W[7]));
    at::add_out(out, out, at::linear(act, W[8]));
  }
}

}  // namespace layerskip::cuda
