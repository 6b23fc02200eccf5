// Argument checks shared by the CPU and CUDA implementations. Every message starts with the op name and names
// the offending argument, e.g. "cache_attention: q must be 4-D [B, T, nH, D], got 3-D".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/limits.h"

#define LS_CHECK(cond, op, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

namespace layerskip {

// torch-style dtype names ("float32", "int64") for messages.
inline const char* dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(s);
  }
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name, const char* shape) {
  check_defined(t, op, name);
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be ", rank, "-D ", shape, ", got ", t.dim(), "-D");
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") (", what, ") must be ", expected, ", got ",
              t.size(dim), " (", name, " shape ", t.sizes(), ")");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); call .contiguous() first");
}

inline bool is_supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype_name(t.scalar_type()));
}

inline void check_dtype(const at::Tensor& t, at::ScalarType s, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == s, op, ": ", name, " must be ", dtype_name(s), ", got ", dtype_name(t.scalar_type()));
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == type, op, ": ", name, " must be a ", c10::DeviceTypeName(type, true),
              " tensor, got one on ", t.device());
}

}  // namespace layerskip
