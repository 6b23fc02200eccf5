// Small numeric building blocks of the CPU kernels.
//
// Batch invariance rules (see docs and tests/test_ops.py): every row (token x head) is computed by one call of a
// per-row function with a reduction order that depends only on the row's own sizes (D, H, number of keys),
// never on how many rows or threads there are. Reductions use kLanes independent float accumulators (lane j
// takes elements j, j + kLanes, ...) combined by a fixed tree, which the compiler vectorises without changing
// the arithmetic; the build disables floating-point contraction. So a row's result is bitwise identical alone,
// in a batch, at any batch position and under any thread count -- and even across the ISA clones below, which
// compute the same IEEE operations.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

// Run-time ISA dispatch of the hot per-row functions: GCC builds an AVX-512 (x86-64-v4), an AVX2+FMA
// (x86-64-v3) and a baseline clone and picks one at load time (ifunc). Same arithmetic in every clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(LAYERSKIP_NO_TARGET_CLONES)
#define LS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LS_CPU_CLONES
#endif

#define LS_INLINE inline __attribute__((always_inline))

namespace layerskip::cpu {

constexpr int kLanes = 16;

template <typename T>
LS_INLINE float to_f32(T v) {
  return static_cast<float>(v);
}
template <>
LS_INLINE float to_f32<c10::BFloat16>(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
LS_INLINE T from_f32(float v) {
  return static_cast<T>(v);
}
// Round to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN. Branch-free so it vectorises.
template <>
LS_INLINE c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  return out;
}

// Fixed-tree sum of the kLanes accumulators: ((a0+a8)+(a4+a12)) + ... written out level by level so it stays in
// registers (a loop over the levels is not unrolled by GCC and goes through memory).
static_assert(kLanes == 16, "lane_sum is written for 16 lanes");
LS_INLINE float lane_sum(const float* a) {
  float b[8], c[4];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) b[j] = a[j] + a[j + 8];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) c[j] = b[j] + b[j + 4];
  const float d0 = c[0] + c[2], d1 = c[1] + c[3];
  return d0 + d1;
}

// sum_i a[i] * b[i] in float32, lanes + fixed tree.
template <typename TA, typename TB>
LS_INLINE float dot(const TA* a, const TB* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += to_f32(a[i + j]) * to_f32(b[i + j]);
  for (int j = 0; i + j < n; ++j) acc[j] += to_f32(a[i + j]) * to_f32(b[i + j]);
  return lane_sum(acc);
}

// exp(x) for float32, Cephes-style (range reduction by ln2 + degree-6 polynomial), ~1-2 ulp, branch-free so
// loops over it vectorise. exp(x) = 0 below -87.3 (float32 would be denormal there); NaN propagates.
LS_INLINE float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: (v + kRound) - kRound rounds v to an integer
  const bool underflow = x < -87.3f;
  float xc = x > 88.3f ? 88.3f : x;
  xc = xc < -87.3f ? -87.3f : xc;
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  const float ni = n == n ? n : 0.0f;  // NaN stays in y; keep the int conversion defined
  const int32_t e = (static_cast<int32_t>(ni) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const float out = y * scale;
  return underflow ? 0.0f : out;
}

}  // namespace layerskip::cpu
