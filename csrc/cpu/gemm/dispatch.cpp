// Load-time choice of the gemm.h kernel table (baseline flags; see gemm_*.cpp for the ISA-specific code).
#include <atomic>
#include <cstring>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu::gemm {

extern const Kernels kGenericKernels;
#ifdef LAYERSKIP_GEMM_X86
extern const Kernels kAvx512Kernels;
extern const Kernels kAvx512Bf16Kernels;  // bf16 only: its float32 kernel is kAvx512Kernels'
extern const Kernels kAvx2Kernels;
#endif

namespace {

struct Table {
  Kernels k;
  bool supported;
};

// Best first.
struct Tables {
  Table t[4];
  int n = 0;
  Tables() {
#ifdef LAYERSKIP_GEMM_X86
    __builtin_cpu_init();
    const bool v4 = __builtin_cpu_supports("x86-64-v4") != 0;
    t[n++] = {{"avx512bf16", kAvx512Kernels.f32, kAvx512Bf16Kernels.bf16, kAvx512Kernels.pv_f32,
               kAvx512Kernels.pv_bf16},
              v4 && __builtin_cpu_supports("avx512bf16") != 0};
    t[n++] = {kAvx512Kernels, v4};
    t[n++] = {kAvx2Kernels, __builtin_cpu_supports("x86-64-v3") != 0};
#endif
    t[n++] = {kGenericKernels, true};
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

const Kernels* best() {
  for (int i = 0; i < tables().n; ++i)
    if (tables().t[i].supported) return &tables().t[i].k;
  return &kGenericKernels;
}

std::atomic<const Kernels*>& slot() {
  static std::atomic<const Kernels*> s{best()};
  return s;
}

}  // namespace

const Kernels& active() { return *slot().load(std::memory_order_acquire); }

bool set_active(const char* name) {
  for (int i = 0; i < tables().n; ++i) {
    const Table& t = tables().t[i];
    if (t.supported && std::strcmp(t.k.name, name) == 0) {
      slot().store(&t.k, std::memory_order_release);
      return true;
    }
  }
  return false;
}

const char* available() {
  static const char* names = [] {
    static char buf[64] = {0};
    for (int i = 0; i < tables().n; ++i) {
      if (!tables().t[i].supported) continue;
      if (buf[0] != 0) std::strcat(buf, ",");
      std::strcat(buf, tables().t[i].k.name);
    }
    return buf;
  }();
  return names;
}

}  // namespace layerskip::cpu::gemm
