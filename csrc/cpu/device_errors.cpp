// take_device_errors on the CPU: the CPU kernels read every value they use and raise at once, so there is never
// anything to report later (the CUDA twin, in csrc/cuda/ops_cuda.cpp, reads the device's error word).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace layerskip::cpu {
namespace {

int64_t take_device_errors_cpu(const at::Tensor&) { return 0; }

}  // namespace

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("take_device_errors", &take_device_errors_cpu); }

}  // namespace layerskip::cpu
