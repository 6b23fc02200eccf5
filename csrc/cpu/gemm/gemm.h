// Batch-invariant small-M / large-M matrix kernel behind `linear` and `exit_head_argmax` (CPU).
//
// Plain C++ interface (no torch headers): the ISA-specific translation units gemm_avx512.cpp, gemm_avx2.cpp and
// gemm_generic.cpp each compile csrc/cpu/gemm/kernels.inc with their own target flags and export one `Kernels`
// table; csrc/cpu/gemm/dispatch.cpp picks one at load time from what the CPU supports.
//
// The contract every table implements, for m < M and j < nw, with row j of W at w + (idx ? idx[j] : j) * ldw:
//
//   out[m, j] = dot(x[m, 0:K], W_j[0:K])
//
// computed as 16 float32 lanes (lane l accumulates k = l, l + 16, l + 32, ... with one fused multiply-add per
// element, in increasing k; the last partial block of K is zero-padded) reduced by the fixed tree of
// common/cpu_math.h `lane_sum`: ((a0+a8)+(a4+a12)) + ((a2+a10)+(a6+a14)) + ... . Every output element goes through
// exactly this sequence whatever M, nw, the tiling or the thread that computes it: bitwise batch invariance by
// construction. The three ISA tables do the same IEEE operations, so they agree bitwise too (tested).
//
// x is float32 with row stride ldx >= round_up(K, 16), zero-padded from K to round_up(K, 16) (bfloat16 inputs are
// converted once by the caller). W is float32 or bfloat16 (converted to float32 in registers, exactly).
#pragma once

#include <cstdint>

namespace layerskip::cpu::gemm {

constexpr int64_t kBlockK = 16;  // lanes; x rows are padded to a multiple of this

inline int64_t padded_k(int64_t K) { return (K + kBlockK - 1) / kBlockK * kBlockK; }

// Where results go: float32 (f32 != nullptr) or bfloat16 bits rounded to nearest even (bf16 != nullptr).
struct Out {
  float* f32 = nullptr;
  uint16_t* bf16 = nullptr;
  int64_t ld = 0;  // row stride (elements)
};

using GemmF32 = void (*)(const float* x, int64_t M, int64_t ldx, const float* w, int64_t ldw, const int64_t* idx,
                         int64_t nw, int64_t K, Out out);
using GemmBF16 = void (*)(const float* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t ldw,
                          const int64_t* idx, int64_t nw, int64_t K, Out out);

struct Kernels {
  const char* name;  // "avx512", "avx2", "generic"
  GemmF32 f32;
  GemmBF16 bf16;
};

// The table chosen at load time (best the CPU supports). Thread-safe to read.
const Kernels& active();
// Test hook: switch to "avx512" / "avx2" / "generic" (returns false when not built or not supported here).
bool set_active(const char* name);
// Names of the tables usable on this CPU, best first, comma separated.
const char* available();

}  // namespace layerskip::cpu::gemm
