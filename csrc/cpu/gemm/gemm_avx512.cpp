// gemm.h kernels for AVX-512 (x86-64-v4). Compiled with -march=x86-64-v4 (CMakeLists.txt); includes nothing with
// out-of-line inline functions, so no AVX-512 code can leak into the baseline translation units (ODR).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives inside its AVX-512 intrinsics
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu::gemm {
namespace avx512_impl {
namespace {

struct V {
  __m512 v;
};
inline __attribute__((always_inline)) V vzero() { return {_mm512_setzero_ps()}; }
inline __attribute__((always_inline)) V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline __attribute__((always_inline)) V vload(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline __attribute__((always_inline)) V vfma(V x, V w, V acc) { return {_mm512_fmadd_ps(x.v, w.v, acc.v)}; }
// lane_sum's tree: b[j] = a[j] + a[j+8]; c[j] = b[j] + b[j+4]; (c0 + c2) + (c1 + c3)
inline __attribute__((always_inline)) float vsum(V a) {
  const __m256 b = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm512_extractf32x8_ps(a.v, 1));
  const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
  const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}
// 32 zmm registers: MR * NR accumulators + NR weights + 1 input.
constexpr int nr_for(int mr) {
  return mr <= 2 ? 8 : mr == 3 ? 6 : mr == 4 ? 5 : mr <= 6 ? 4 : 3;
}
constexpr int stream_nr_for(int mr) { return mr == 1 ? 1 : mr <= 7 ? 4 : 3; }
#define LS_GEMM_PREFETCH(p) ((void)0)

#include "cpu/gemm/kernels.inc"

#undef LS_GEMM_PREFETCH

}  // namespace
}  // namespace avx512_impl

extern const Kernels kAvx512Kernels = {"avx512", &avx512_impl::gemm_f32, &avx512_impl::gemm_bf16};

}  // namespace layerskip::cpu::gemm
