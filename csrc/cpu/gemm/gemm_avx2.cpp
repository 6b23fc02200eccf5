// gemm.h kernels for AVX2 + FMA (x86-64-v3): 16 lanes as two ymm halves, the same arithmetic as AVX-512.
// Compiled with -march=x86-64-v3 (CMakeLists.txt); see gemm_avx512.cpp about includes.
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu::gemm {
namespace avx2_impl {
namespace {

struct V {
  __m256 lo, hi;
};
inline __attribute__((always_inline)) V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline __attribute__((always_inline)) V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __attribute__((always_inline)) V vfma(V x, V w, V acc) {
  return {_mm256_fmadd_ps(x.lo, w.lo, acc.lo), _mm256_fmadd_ps(x.hi, w.hi, acc.hi)};
}
inline __attribute__((always_inline)) float vsum(V a) {
  const __m256 b = _mm256_add_ps(a.lo, a.hi);
  const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
  const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}
inline __attribute__((always_inline)) void vsum16(const V* a, float* out) {
  for (int i = 0; i < 16; ++i) out[i] = vsum(a[i]);
}
inline __attribute__((always_inline)) V vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline __attribute__((always_inline)) void vstore(float* p, V a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline __attribute__((always_inline)) __m256 bf16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __attribute__((always_inline)) V vloadh(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
inline __attribute__((always_inline)) float sfma(float x, float w, float acc) { return __builtin_fmaf(x, w, acc); }
constexpr int kPvRows32 = 2;  // 4 ymm of accumulators a row, 4 for the value row
constexpr int kPvRows64 = 2;
constexpr int kPvRows128 = 1;
// 16 ymm registers, two per V: MR * NR + NR + 1 <= 8.
constexpr int nr_for(int mr) { return mr == 1 ? 3 : mr == 2 ? 2 : 1; }
constexpr int stream_nr_for(int mr) { return mr == 1 ? 3 : mr <= 3 ? 2 : 1; }
// No software prefetch: AVX-512's (4 KB ahead, avx512_common.inc) measured no gain here for 7 rows of x on an
// AVX2 machine (18 verification layers of nano-layerskip, alternating builds, 2026-12-01).
#define LS_GEMM_PREFETCH(p) ((void)0)

// 32 bfloat16 -> per 32-bit lane i (elements 2i, 2i+1) the odd and the even element as float32 (exact).
struct Pair {
  V odd, even;
};
inline __attribute__((always_inline)) void split(__m256i v, __m256& odd, __m256& even) {
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __attribute__((always_inline)) Pair pload(const uint16_t* p) {
  Pair r;
  split(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), r.odd.lo, r.even.lo);
  split(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)), r.odd.hi, r.even.hi);
  return r;
}
struct BF16Ops {
  using XT = uint16_t;
  using WT = uint16_t;
  using XV = Pair;
  using WV = Pair;
  static constexpr int kStep = 32;
  static inline __attribute__((always_inline)) XV loadx(const uint16_t* p) { return pload(p); }
  static inline __attribute__((always_inline)) WV loadw(const uint16_t* p) { return pload(p); }
  static inline __attribute__((always_inline)) V step(V acc, XV x, WV w) { return vfma(x.even, w.even, vfma(x.odd, w.odd, acc)); }
  static constexpr int nr(int mr) { return mr == 1 ? 2 : 1; }
  static constexpr int stream_nr(int mr) { return mr == 1 ? 2 : 1; }
};

#define LS_GEMM_F32 1
#define LS_GEMM_BF16 1
#include "cpu/gemm/kernels.inc"

#undef LS_GEMM_PREFETCH

}  // namespace
}  // namespace avx2_impl

extern const Kernels kAvx2Kernels = {"avx2", &avx2_impl::gemm_f32, &avx2_impl::gemm_bf16, &avx2_impl::pv_f32,
                                     &avx2_impl::pv_bf16};

}  // namespace layerskip::cpu::gemm
