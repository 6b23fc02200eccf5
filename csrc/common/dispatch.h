// dtype dispatch for the float types the kernels support (float32, bfloat16, float16). Unlike
// AT_DISPATCH_FLOATING_TYPES_AND2 it does not instantiate double, and the error names the op.
//
//   LS_DISPATCH_FLOAT(x.scalar_type(), "rms_norm", "x", [&] { kernel<scalar_t>(...); });
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define LS_DISPATCH_CASE_(ENUM, TYPE, ...) \
  case ENUM: {                             \
    using scalar_t = TYPE;                 \
    __VA_ARGS__();                         \
    break;                                 \
  }

#define LS_DISPATCH_FLOAT(STYPE, OP, ARG, ...)                                                         \
  do {                                                                                                 \
    const ::c10::ScalarType ls_stype_ = (STYPE);                                                       \
    switch (ls_stype_) {                                                                               \
      LS_DISPATCH_CASE_(::c10::ScalarType::Float, float, __VA_ARGS__)                                  \
      LS_DISPATCH_CASE_(::c10::ScalarType::BFloat16, ::c10::BFloat16, __VA_ARGS__)                     \
      LS_DISPATCH_CASE_(::c10::ScalarType::Half, ::c10::Half, __VA_ARGS__)                             \
      default:                                                                                         \
        TORCH_CHECK(false, OP, ": ", ARG, " must be float32, bfloat16 or float16, got ", ls_stype_); \
    }                                                                                                  \
  } while (0)
