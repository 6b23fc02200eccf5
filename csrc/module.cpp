// layerskip_ext._C: loading it registers the ops (static initialisers of ops.cpp, cpu/, cuda/). The Python
// module itself only reports how it was built and what the CPU offers (never on the hot path).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common/limits.h"
#include "common/poison.h"
#include "cpu/gemm/gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define LS_X86 1
#endif

namespace py = pybind11;

namespace {

struct CpuFeatures {
  bool avx512f = false, avx512bf16 = false, avx2 = false, fma = false;
};

CpuFeatures cpu_features() {
  CpuFeatures f;
#ifdef LS_X86
  __builtin_cpu_init();
  f.avx512f = __builtin_cpu_supports("avx512f");  // also checks that the OS saves the AVX-512 state
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (f.avx512f && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = (a >> 5) & 1u;  // CPUID.(7,1):EAX[5]
#endif
  return f;
}

// Which clone of the kernels' per-row functions the loader picks (see csrc/common/cpu_math.h).
std::string cpu_isa() {
#if defined(LS_X86) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(LAYERSKIP_NO_TARGET_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "generic";
}

py::list split_archs(const std::string& s) {
  py::list out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t next = s.find(',', pos);
    if (next == std::string::npos) next = s.size();
    if (next > pos) out.append(s.substr(pos, next - pos));
    pos = next + 1;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "layerskip_ext native ops (registered as torch.ops.layerskip.*) and build information";
  m.def("build_info", [] {
    py::dict info;
    info["version"] = LAYERSKIP_VERSION;
    info["torch"] = LAYERSKIP_TORCH_VERSION;
#ifdef LAYERSKIP_WITH_CUDA
    info["cuda_compiled"] = true;
    info["cuda_archs"] = split_archs(LAYERSKIP_CUDA_ARCHS);
#else
    info["cuda_compiled"] = false;
    info["cuda_archs"] = py::list();
#endif
    info["cpu_isa"] = cpu_isa();
    const CpuFeatures f = cpu_features();
    py::dict feats;
    feats["avx512f"] = f.avx512f;
    feats["avx512bf16"] = f.avx512bf16;
    feats["avx2"] = f.avx2;
    feats["fma"] = f.fma;
    info["cpu_features"] = feats;
    info["max_head_dim"] = LAYERSKIP_MAX_HEAD_DIM;
    info["gemm_isa"] = layerskip::cpu::gemm::active().name;
    info["gemm_isas"] = split_archs(layerskip::cpu::gemm::available());
    return info;
  }, "How this extension was built and which CPU kernel variant runs here.");
  // Test hook: run linear / exit_head_argmax with another of the gemm kernel tables this CPU supports
  // ("avx512", "avx2", "generic"); returns the previous table's name. Not thread-safe with running ops.
  m.def("_set_gemm_isa", [](const std::string& name) {
    std::string prev = layerskip::cpu::gemm::active().name;
    if (!layerskip::cpu::gemm::set_active(name.c_str()))
      throw std::invalid_argument("gemm table '" + name + "' is not available here (available: " +
                                  layerskip::cpu::gemm::available() + ")");
    return prev;
  });
  // Test hook: exit_head_sample / exit_head_log_softmax fill their outputs with NaN / -1 before writing them
  // (common/poison.h); returns the previous setting.
  m.def("_set_poison_outputs", [](bool on) { return layerskip::poison_outputs().exchange(on); });
}
