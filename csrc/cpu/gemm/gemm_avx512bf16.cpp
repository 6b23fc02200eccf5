// gemm.h bfloat16 kernel for AVX-512 with AVX512_BF16 (Zen 4, Sapphire Rapids, ...): one VDPBF16PS per 32
// elements does the pair-lane step of gemm.h (odd element first, then even; products of bfloat16 are exact in
// float32), with the instruction's denormal flushing (DAZ/FTZ). Compiled with -march=x86-64-v4 -mavx512bf16.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives inside its AVX-512 intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu::gemm {
namespace avx512bf16_impl {
namespace {

#include "cpu/gemm/avx512_common.inc"

struct BF16Ops {
  using XT = uint16_t;
  using WT = uint16_t;
  using XV = __m512bh;
  using WV = __m512bh;
  static constexpr int kStep = 32;
  static inline __attribute__((always_inline)) XV loadx(const uint16_t* p) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
  }
  static inline __attribute__((always_inline)) WV loadw(const uint16_t* p) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
  }
  static inline __attribute__((always_inline)) V step(V acc, XV x, WV w) { return {_mm512_dpbf16_ps(acc.v, x, w)}; }
  static constexpr int nr(int mr) { return nr_for(mr); }
  static constexpr int stream_nr(int mr) { return stream_nr_for(mr); }
};

#define LS_GEMM_F32 0
#define LS_GEMM_BF16 1
#include "cpu/gemm/kernels.inc"

#undef LS_GEMM_PREFETCH

}  // namespace
}  // namespace avx512bf16_impl

extern const Kernels kAvx512Bf16Kernels = {"avx512bf16", nullptr, &avx512bf16_impl::gemm_bf16, nullptr, nullptr};

}  // namespace layerskip::cpu::gemm
