// Batch-invariant small-M / large-M matrix kernel behind `linear` and `exit_head_argmax` (CPU).
//
// Plain C++ interface (no torch headers): the ISA-specific translation units gemm_avx512.cpp, gemm_avx2.cpp and
// gemm_generic.cpp each compile csrc/cpu/gemm/kernels.inc with their own target flags and export one `Kernels`
// table; csrc/cpu/gemm/dispatch.cpp picks one at load time from what the CPU supports.
//
// The contract every table implements, for m < M and j < nw, with row j of W at w + (idx ? idx[j] : j) * ldw:
//
//   out[m, j] = dot(x[m, 0:K], W_j[0:K])   in 16 float32 lanes reduced by the fixed tree of common/cpu_math.h
//                                          `lane_sum`: ((a0+a8)+(a4+a12)) + ((a2+a10)+(a6+a14)) + ...
//   float32:  lane l accumulates k = l, l + 16, l + 32, ... in increasing k, one fused multiply-add each.
//   bfloat16: K is taken in blocks of 32; lane l accumulates, block after block, first the product of elements
//             2l+1 and then that of elements 2l of the block, each with one rounding (a fused multiply-add; a
//             product of two bfloat16 is exact in float32) -- what one VDPBF16PS does.
//   The last partial block of K counts as zero-padded.
// Every output element goes through exactly this sequence whatever M, nw, the tiling or the thread that computes it:
// bitwise batch invariance by construction. The tables do the same IEEE operations, so they agree bitwise too
// (tested), except that the "avx512bf16" table's VDPBF16PS flushes denormals (inputs and results below 2^-126
// count as zero), which the others do not.
//
// x: float32 rows for float32 W (row stride ldx >= round_up(K, 16)), bfloat16 rows for bfloat16 W (ldx >=
// round_up(K, 32)), zero-padded up to that length. bfloat16 W rows are converted to float32 in registers (exact).
#pragma once

#include <cstdint>

namespace layerskip::cpu::gemm {

constexpr int64_t kBlockF32 = 16;   // float32 x rows are padded to a multiple of this
constexpr int64_t kBlockBF16 = 32;  // bfloat16 x rows to a multiple of this

inline int64_t padded_k(int64_t K, int64_t block) { return (K + block - 1) / block * block; }

// Where results go: float32 (f32 != nullptr) or bfloat16 bits rounded to nearest even (bf16 != nullptr).
struct Out {
  float* f32 = nullptr;
  uint16_t* bf16 = nullptr;
  int64_t ld = 0;  // row stride (elements)
};

using GemmF32 = void (*)(const float* x, int64_t M, int64_t ldx, const float* w, int64_t ldw, const int64_t* idx,
                         int64_t nw, int64_t K, Out out);
using GemmBF16 = void (*)(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t ldw,
                          const int64_t* idx, int64_t nw, int64_t K, Out out);

// Attention's weighted sum of values: for r < R and i < D, for s = 0 .. n_keys[r]-1 in order,
//   acc[r*D + i] = fma(p[r*lds + s], V[s*D + i], acc[r*D + i])     (one rounding each; V float32 or bfloat16)
using PvF32 = void (*)(const float* p, int64_t R, int64_t lds, const int64_t* n_keys, const float* V, int64_t D,
                       float* acc);
using PvBF16 = void (*)(const float* p, int64_t R, int64_t lds, const int64_t* n_keys, const uint16_t* V, int64_t D,
                        float* acc);

struct Kernels {
  const char* name;  // "avx512bf16", "avx512", "avx2", "generic"
  GemmF32 f32;
  GemmBF16 bf16;
  PvF32 pv_f32;
  PvBF16 pv_bf16;
};

// The table chosen at load time (best the CPU supports). Thread-safe to read.
const Kernels& active();
// Test hook: switch to "avx512bf16" / "avx512" / "avx2" / "generic" (false when not built or not supported here).
bool set_active(const char* name);
// Names of the tables usable on this CPU, best first, comma separated.
const char* available();

}  // namespace layerskip::cpu::gemm
