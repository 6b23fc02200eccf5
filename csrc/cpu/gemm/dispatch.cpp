// Load-time choice of the gemm.h kernel table (baseline flags; see gemm_*.cpp for the ISA-specific code).
#include <atomic>
#include <cstring>

#include "cpu/gemm/gemm.h"

namespace layerskip::cpu::gemm {

extern const Kernels kGenericKernels;
#ifdef LAYERSKIP_GEMM_X86
extern const Kernels kAvx512Kernels;
extern const Kernels kAvx2Kernels;
#endif

namespace {

bool supported(const Kernels& k) {
#ifdef LAYERSKIP_GEMM_X86
  __builtin_cpu_init();
  if (&k == &kAvx512Kernels) return __builtin_cpu_supports("x86-64-v4");
  if (&k == &kAvx2Kernels) return __builtin_cpu_supports("x86-64-v3");
#endif
  return &k == &kGenericKernels;
}

const Kernels* best() {
#ifdef LAYERSKIP_GEMM_X86
  if (supported(kAvx512Kernels)) return &kAvx512Kernels;
  if (supported(kAvx2Kernels)) return &kAvx2Kernels;
#endif
  return &kGenericKernels;
}

std::atomic<const Kernels*>& slot() {
  static std::atomic<const Kernels*> s{best()};
  return s;
}

}  // namespace

const Kernels& active() { return *slot().load(std::memory_order_acquire); }

bool set_active(const char* name) {
  const Kernels* all[] = {
#ifdef LAYERSKIP_GEMM_X86
      &kAvx512Kernels, &kAvx2Kernels,
#endif
      &kGenericKernels};
  for (const Kernels* k : all) {
    if (std::strcmp(k->name, name) == 0 && supported(*k)) {
      slot().store(k, std::memory_order_release);
      return true;
    }
  }
  return false;
}

const char* available() {
  static const char* names = [] {
    static char buf[64] = {0};
    const Kernels* all[] = {
#ifdef LAYERSKIP_GEMM_X86
        &kAvx512Kernels, &kAvx2Kernels,
#endif
        &kGenericKernels};
    for (const Kernels* k : all) {
      if (!supported(*k)) continue;
      if (buf[0] != 0) std::strcat(buf, ",");
      std::strcat(buf, k->name);
    }
    return buf;
  }();
  return names;
}

}  // namespace layerskip::cpu::gemm
