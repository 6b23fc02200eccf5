// gemm.h kernels for AVX-512 (x86-64-v4). Compiled with -march=x86-64-v4 (CMakeLists.txt); includes nothing with
// out-of-line inline functions, so no AVX-512 code can leak into the baseline translation units (ODR).
// bfloat16 pair lanes emulated with two fused multiply-adds (CPUs without AVX512_BF16: gemm_avx512bf16.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives inside its AVX-512 intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu::gemm {
namespace avx512_impl {
namespace {

#include "cpu/gemm/avx512_common.inc"

// 32 bfloat16 -> the odd elements (2i+1) and the even ones (2i) of each 32-bit lane, as float32 (exact).
struct Pair {
  __m512 odd, even;
};
inline __attribute__((always_inline)) Pair pload(const uint16_t* p) {
  const __m512i v = _mm512_loadu_si512(p);
  return {_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))),
          _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))};
}
struct BF16Ops {
  using XT = uint16_t;
  using WT = uint16_t;
  using XV = Pair;
  using WV = Pair;
  static constexpr int kStep = 32;
  static inline __attribute__((always_inline)) XV loadx(const uint16_t* p) { return pload(p); }
  static inline __attribute__((always_inline)) WV loadw(const uint16_t* p) { return pload(p); }
  static inline __attribute__((always_inline)) V step(V acc, XV x, WV w) {
    return {_mm512_fmadd_ps(x.even, w.even, _mm512_fmadd_ps(x.odd, w.odd, acc.v))};
  }
  // two registers per loaded vector: MR * NR + 2 NR + 2 <= 30
  static constexpr int nr(int mr) { return mr <= 2 ? 6 : mr <= 4 ? 4 : mr <= 7 ? 3 : 2; }
  static constexpr int stream_nr(int mr) { return mr == 1 ? 1 : mr <= 4 ? 4 : mr <= 7 ? 3 : 2; }
};

#define LS_GEMM_F32 1
#define LS_GEMM_BF16 1
#include "cpu/gemm/kernels.inc"

#undef LS_GEMM_PREFETCH

}  // namespace
}  // namespace avx512_impl

extern const Kernels kAvx512Kernels = {"avx512", &avx512_impl::gemm_f32, &avx512_impl::gemm_bf16,
                                       &avx512_impl::pv_f32, &avx512_impl::pv_bf16};

}  // namespace layerskip::cpu::gemm
