// gemm.h kernels in portable C++ (any CPU): 16 lanes in an array, std::fma per lane -- the same IEEE operations
// as the AVX-512 / AVX2 tables, so the results agree bitwise (fast where fma is a hardware instruction, e.g.
// aarch64; a library call on pre-FMA x86, which only ever runs this table when nothing better is available).
#include <cmath>
#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu::gemm {
namespace generic_impl {
namespace {

struct V {
  float a[16];
};
inline __attribute__((always_inline)) V vzero() {
  V r;
  for (int i = 0; i < 16; ++i) r.a[i] = 0.0f;
  return r;
}
inline __attribute__((always_inline)) V vload(const float* p) {
  V r;
  for (int i = 0; i < 16; ++i) r.a[i] = p[i];
  return r;
}
inline __attribute__((always_inline)) V vfma(V x, V w, V acc) {
  V r;
  for (int i = 0; i < 16; ++i) r.a[i] = std::fma(x.a[i], w.a[i], acc.a[i]);
  return r;
}
inline __attribute__((always_inline)) float vsum(V a) {
  float b[8], c[4];
  for (int j = 0; j < 8; ++j) b[j] = a.a[j] + a.a[j + 8];
  for (int j = 0; j < 4; ++j) c[j] = b[j] + b[j + 4];
  return (c[0] + c[2]) + (c[1] + c[3]);
}
inline __attribute__((always_inline)) void vsum16(const V* a, float* out) {
  for (int i = 0; i < 16; ++i) out[i] = vsum(a[i]);
}
inline __attribute__((always_inline)) V vset1(float x) {
  V r;
  for (int i = 0; i < 16; ++i) r.a[i] = x;
  return r;
}
inline __attribute__((always_inline)) void vstore(float* p, V a) {
  for (int i = 0; i < 16; ++i) p[i] = a.a[i];
}
inline __attribute__((always_inline)) V vloadh(const uint16_t* p) {
  V r;
  for (int i = 0; i < 16; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    __builtin_memcpy(&r.a[i], &bits, sizeof(float));
  }
  return r;
}
inline __attribute__((always_inline)) float sfma(float x, float w, float acc) { return std::fma(x, w, acc); }
constexpr int kPvRows32 = 1;
constexpr int kPvRows64 = 1;
constexpr int kPvRows128 = 1;
constexpr int nr_for(int mr) { return mr == 1 ? 4 : mr == 2 ? 2 : 1; }
constexpr int stream_nr_for(int mr) { return mr == 1 ? 4 : mr == 2 ? 2 : 1; }
#define LS_GEMM_PREFETCH(p) ((void)0)

inline __attribute__((always_inline)) float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}
// 32 bfloat16 -> per lane i the odd (2i+1) and the even (2i) element as float32 (exact).
struct Pair {
  V odd, even;
};
inline __attribute__((always_inline)) Pair pload(const uint16_t* p) {
  Pair r;
  for (int i = 0; i < 16; ++i) {
    r.odd.a[i] = bf16_to_f32(p[2 * i + 1]);
    r.even.a[i] = bf16_to_f32(p[2 * i]);
  }
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
}  // namespace generic_impl

extern const Kernels kGenericKernels = {"generic", &generic_impl::gemm_f32, &generic_impl::gemm_bf16,
                                        &generic_impl::pv_f32, &generic_impl::pv_bf16};

}  // namespace layerskip::cpu::gemm
