// The CUDA emulator's scheduler (see emulator.h for the model): fibers, block barriers, warp collectives,
// thread orders, launch checks, and the error the test harness reads after each launch.
#include "cuda/emulator/emulator.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define LS_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LS_EMU_ASAN 1
#endif
#endif
#if defined(LS_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace ls_emu {

const Indices* g_indices = nullptr;

namespace {

// ---- fibers ------------------------------------------------------------------------------------------------------
// A fiber is a stack and a saved stack pointer. x86-64: a six-register switch in assembly (ucontext's
// swapcontext makes a system call per switch, and a block of 256 threads switches ~10^5 times). Elsewhere:
// ucontext.
constexpr size_t kStackBytes = 256 * 1024;  // sanitizer builds have large frames
constexpr size_t kGuardBytes = 4096;        // PROT_NONE below each stack: an overflow faults, never corrupts

struct Thread;
extern "C" __attribute__((visibility("hidden"))) void ls_emu_fiber_main(Thread* t);

}  // namespace
}  // namespace ls_emu

#if defined(__x86_64__)
extern "C" void ls_emu_switch(void** save_sp, void* new_sp);  // saves callee-saved registers, swaps stacks
extern "C" void ls_emu_trampoline();                          // first "return" of a new fiber: fiber_main(rbx)
asm(R"(
  .text
  .p2align 4
  .globl ls_emu_switch
  .hidden ls_emu_switch
  .type ls_emu_switch, @function
ls_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ls_emu_switch, .-ls_emu_switch
  .globl ls_emu_trampoline
  .hidden ls_emu_trampoline
  .type ls_emu_trampoline, @function
ls_emu_trampoline:
  movq %rbx, %rdi
  call ls_emu_fiber_main
  ud2
  .size ls_emu_trampoline, .-ls_emu_trampoline
)");
#else
#include <ucontext.h>
#endif

namespace ls_emu {
namespace {

struct Fiber {
  char* stack = nullptr;  // lowest usable address
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  void* fake_stack = nullptr;  // AddressSanitizer's per-fiber state
};

char* new_stack() {
  void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "ls_emu: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(m, kGuardBytes, PROT_NONE);
  return static_cast<char*>(m) + kGuardBytes;
}

enum class State : uint8_t { kReady, kBlockWait, kWarpWait, kDone };

struct Thread {
  Fiber fiber;
  State state = State::kDone;
  Indices idx{};
  int id = 0;  // linear thread index in the block
  Site site{};
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int param = 0, width = 32;
  uint64_t in = 0, out = 0;
};

// ---- the scheduler's state (one launch at a time; the emulator is not reentrant) ------------------------------
struct Scheduler {
  int order = 0;  // 0 forward, 1 reverse, 2 random
  std::mt19937_64 rng{0};
  std::string error;
  std::string report_dir;  // sanitizer logs (asan.<pid>, ubsan.<pid>), read after every launch
  long report_seen[2] = {0, 0};
  uint64_t switches = 0, launches = 0;
  bool dry_run = false;
  struct Record {
    uint64_t kernel_offset;  // the kernel's address minus its object's load address (an `nm` address)
    dim3 grid, block;
    uint64_t smem;
  };
  std::vector<Record> records;  // dry-run launches, in order

  std::vector<Thread> threads;
  // Fiber stacks by thread index, kept for the process: `threads` is resized to each block's size, and a stack must
  // not go with a Thread it drops (launches alternate 128- and 256-thread blocks; leaked stacks ran out of mappings).
  std::vector<char*> stacks;
  std::vector<int> warp_arrived;  // per warp: lanes waiting at a collective
  std::vector<int> queue;
  size_t head = 0;
  int n_done = 0;
  const std::function<void()>* body = nullptr;
  const Grid* grid = nullptr;
  Thread* current = nullptr;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  void* fake_stack = nullptr;
  const void* stack_bottom = nullptr;  // the scheduler's own stack, as the sanitizer reports it
  size_t stack_size = 0;
};
Scheduler g;

void fail(std::string msg) {
  if (g.error.empty()) g.error = std::move(msg);
}

std::string where(const Site& s) {
  return std::string(s.file) + ":" + std::to_string(s.line) + " in " + s.function;
}

std::string launch_site() {
  return std::string(g.grid->where.file_name()) + ":" + std::to_string(g.grid->where.line()) + " (" +
         g.grid->where.function_name() + ")";
}

std::string block_name(const Indices& i) {
  return "block (" + std::to_string(i.block.x) + ", " + std::to_string(i.block.y) + ", " + std::to_string(i.block.z) +
         ")";
}

void ordered(std::vector<int>& ids) {
  if (g.order == 1) std::reverse(ids.begin(), ids.end());
  if (g.order == 2) std::shuffle(ids.begin(), ids.end(), g.rng);
}

void enqueue(std::vector<int>& ids) {
  ordered(ids);
  g.queue.insert(g.queue.end(), ids.begin(), ids.end());
}

// ---- switching -----------------------------------------------------------------------------------------------
void start_switch(void** fake_save, const void* bottom, size_t size) {
#if defined(LS_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake_save, bottom, size);
#endif
}
void finish_switch(void* fake, const void** old_bottom, size_t* old_size) {
#if defined(LS_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, old_bottom, old_size);
#endif
}

#if !defined(__x86_64__)
void ucontext_entry(unsigned hi, unsigned lo) {
  ls_emu_fiber_main(reinterpret_cast<Thread*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

void prepare(Thread& t) {
  Fiber& f = t.fiber;
  if (g.stacks.size() <= static_cast<size_t>(t.id)) g.stacks.resize(t.id + 1, nullptr);
  if (g.stacks[t.id] == nullptr) g.stacks[t.id] = new_stack();
  f.stack = g.stacks[t.id];
#if defined(LS_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // an abandoned fiber leaves its frames' redzones behind
#endif
#if defined(__x86_64__)
  // The top of a new stack, as ls_emu_switch pops it: r15 r14 r13 r12 rbx(= the thread) rbp(= 0) and the
  // return address (the trampoline). After that "return" rsp is `top`, 16-byte aligned, so the trampoline's call
  // enters fiber_main with rsp = 8 mod 16, as the ABI wants.
  auto* top = reinterpret_cast<uintptr_t*>(f.stack + kStackBytes - 16);
  uintptr_t* sp = top - 7;
  sp[0] = sp[1] = sp[2] = sp[3] = 0;                         // r15 r14 r13 r12
  sp[4] = reinterpret_cast<uintptr_t>(&t);                   // rbx
  sp[5] = 0;                                                 // rbp: the end of frame-pointer unwinding
  sp[6] = reinterpret_cast<uintptr_t>(&ls_emu_trampoline);  // return address
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(&t);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&ucontext_entry), 2, unsigned(p >> 32), unsigned(p));
#endif
  f.fake_stack = nullptr;
}

// Scheduler -> thread t, until t waits or returns.
void resume(Thread& t) {
  g.current = &t;
  g_indices = &t.idx;
  ++g.switches;
  start_switch(&g.fake_stack, t.fiber.stack, kStackBytes);
#if defined(__x86_64__)
  ls_emu_switch(&g.sp, t.fiber.sp);
#else
  swapcontext(&g.ctx, &t.fiber.ctx);
#endif
  finish_switch(g.fake_stack, nullptr, nullptr);
  g.current = nullptr;
  g_indices = nullptr;
}

// Thread -> scheduler (the thread's state says why).
void yield(Thread& t, bool final) {
  start_switch(final ? nullptr : &t.fiber.fake_stack, g.stack_bottom, g.stack_size);
#if defined(__x86_64__)
  ls_emu_switch(&t.fiber.sp, g.sp);
#else
  swapcontext(&t.fiber.ctx, &g.ctx);
#endif
  finish_switch(t.fiber.fake_stack, &g.stack_bottom, &g.stack_size);
}

}  // namespace

extern "C" void ls_emu_fiber_main(Thread* t) {
  finish_switch(nullptr, &g.stack_bottom, &g.stack_size);
  (*g.body)();
  t->state = State::kDone;
  yield(*t, true);
  std::abort();  // a finished fiber is never resumed
}

namespace {

Thread& running(const Site& site, const char* what) {
  if (g.current == nullptr) {
    std::fprintf(stderr, "ls_emu: %s at %s outside a kernel launch\n", what, where(site).c_str());
    std::abort();
  }
  return *g.current;
}

// ---- warp collectives ------------------------------------------------------------------------------------------
const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

// Called when thread t has just arrived at a collective: completes it if every lane of the mask is there.
// Returns false after reporting an error.
bool try_complete_warp(Thread& t) {
  const int base = t.id & ~31;
  const int lanes = std::min<int>(32, static_cast<int>(g.threads.size()) - base);
  const bool names_missing_lanes = lanes < 32 && (t.mask >> lanes) != 0;
  // Not all of the mask can be here yet (the full check below would only confirm it).
  if (++g.warp_arrived[base / 32] < __builtin_popcount(t.mask) && !names_missing_lanes) return true;
  for (int l = 0; l < 32; ++l) {
    if (!(t.mask >> l & 1u)) continue;
    if (l >= lanes) {
      fail(std::string(op_name(t.op)) + " at " + where(t.site) + ": mask 0x" + [&] {
        char b[16];
        std::snprintf(b, sizeof b, "%08x", t.mask);
        return std::string(b);
      }() + " names lane " + std::to_string(l) + ", which does not exist in warp " + std::to_string(base / 32) +
           " of a block of " + std::to_string(g.threads.size()) + " threads (" + block_name(t.idx) +
           ", launched at " + launch_site() + ")");
      return false;
    }
    if (g.threads[base + l].state != State::kWarpWait) return true;  // not complete yet
  }
  if (!(t.mask >> (t.id - base) & 1u)) {
    fail(std::string(op_name(t.op)) + " at " + where(t.site) + ": lane " + std::to_string(t.id - base) +
         " calls it with a mask that excludes itself");
    return false;
  }
  std::vector<int> ids;
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(t.mask >> l & 1u)) continue;
    const Thread& o = g.threads[base + l];
    if (o.site.line != t.site.line || std::strcmp(o.site.file, t.site.file) != 0 || o.op != t.op ||
        o.mask != t.mask) {
      fail("divergent warp collectives in warp " + std::to_string(base / 32) + " of " + block_name(t.idx) +
           ": lane " + std::to_string(t.id - base) + " at " + op_name(t.op) + " " + where(t.site) + ", lane " +
           std::to_string(l) + " at " + op_name(o.op) + " " + where(o.site) + " (launched at " + launch_site() + ")");
      return false;
    }
    ballot |= uint64_t(o.in != 0) << l;
    ids.push_back(base + l);
  }
  for (int id : ids) {
    Thread& o = g.threads[id];
    const int lane = id - base;
    const int w = o.width;
    if (o.op >= WarpOp::kShflIdx && o.op <= WarpOp::kShflXor && (w < 1 || w > 32 || (w & (w - 1)) != 0)) {
      fail(std::string(op_name(o.op)) + " at " + where(o.site) + ": width " + std::to_string(w) +
           " is not a power of two in [1, 32]");
      return false;
    }
    const int seg = lane & ~(w - 1);
    int src = lane;
    switch (o.op) {
      case WarpOp::kShflIdx: src = seg + (o.param & (w - 1)); break;
      case WarpOp::kShflUp: src = lane - o.param >= seg ? lane - o.param : lane; break;
      case WarpOp::kShflDown: src = lane + o.param < seg + w ? lane + o.param : lane; break;
      case WarpOp::kShflXor: src = (lane ^ o.param) < seg + w ? (lane ^ o.param) : lane; break;
      default: break;
    }
    switch (o.op) {
      case WarpOp::kSync: o.out = 0; break;
      case WarpOp::kBallot: o.out = ballot; break;
      case WarpOp::kAny: o.out = ballot != 0; break;
      case WarpOp::kAll: o.out = ballot == (uint64_t(t.mask) & 0xffffffffu); break;
      default:
        if (src < 0 || src > 31 || !(t.mask >> src & 1u)) {
          fail(std::string(op_name(o.op)) + " at " + where(o.site) + ": lane " + std::to_string(lane) +
               " reads lane " + std::to_string(src) + ", which is not in the mask");
          return false;
        }
        o.out = g.threads[base + src].in;
    }
    o.state = State::kReady;
  }
  g.warp_arrived[base / 32] -= static_cast<int>(ids.size());
  enqueue(ids);
  return true;
}

// The queue is empty and some thread has not returned: release a block barrier, or report why nothing can run.
bool release_or_report() {
  const int n = static_cast<int>(g.threads.size());
  const Thread* first_block = nullptr;
  for (const Thread& t : g.threads) {
    if (t.state == State::kWarpWait) {
      std::string missing;
      for (int l = 0; l < 32; ++l) {
        if (!(t.mask >> l & 1u)) continue;
        const Thread& o = g.threads[(t.id & ~31) + l];
        if (o.state == State::kWarpWait) continue;
        missing += "\n  lane " + std::to_string(l) + (o.state == State::kDone ? " returned" : " waits at __syncthreads " + where(o.site));
      }
      fail(std::string(op_name(t.op)) + " at " + where(t.site) + " in warp " + std::to_string(t.id / 32) + " of " +
           block_name(t.idx) + " with lanes missing (launched at " + launch_site() + "):" + missing);
      return false;
    }
    if (t.state == State::kBlockWait && first_block == nullptr) first_block = &t;
  }
  if (first_block == nullptr) {
    fail("ls_emu: internal error: no thread to run in " + block_name(g.threads[0].idx));
    return false;
  }
  int at_first = 0;
  for (const Thread& t : g.threads) {
    if (t.state == State::kBlockWait && t.site.line == first_block->site.line &&
        std::strcmp(t.site.file, first_block->site.file) == 0)
      ++at_first;
  }
  if (g.n_done > 0 || at_first != n) {
    std::string detail = "\n  " + std::to_string(at_first) + " threads wait at " + where(first_block->site);
    for (const Thread& t : g.threads) {
      if (t.state == State::kBlockWait && (t.site.line != first_block->site.line ||
                                           std::strcmp(t.site.file, first_block->site.file) != 0)) {
        detail += "\n  thread " + std::to_string(t.id) + " waits at " + where(t.site);
        break;
      }
    }
    if (g.n_done > 0) detail += "\n  " + std::to_string(g.n_done) + " threads returned";
    fail("__syncthreads at " + where(first_block->site) + " reached by only " + std::to_string(at_first) + " of " +
         std::to_string(n) + " threads of " + block_name(first_block->idx) + " (launched at " + launch_site() + "):" +
         detail);
    return false;
  }
  std::vector<int> ids(n);
  for (int i = 0; i < n; ++i) {
    ids[i] = i;
    g.threads[i].state = State::kReady;
  }
  enqueue(ids);
  return true;
}

// One block, to completion or to the first error.
bool run_block(const uint3& block_idx, const dim3& grid_dim, const dim3& block_dim) {
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  g.threads.resize(n);
  g.warp_arrived.assign((n + 31) / 32, 0);
  std::vector<int> ids(n);
  for (int i = 0; i < n; ++i) {
    Thread& t = g.threads[i];
    t.id = i;
    t.state = State::kReady;
    t.idx.thread = uint3{unsigned(i) % block_dim.x, unsigned(i) / block_dim.x % block_dim.y,
                         unsigned(i) / (block_dim.x * block_dim.y)};
    t.idx.block = block_idx;
    t.idx.block_dim = block_dim;
    t.idx.grid_dim = grid_dim;
    prepare(t);
    ids[i] = i;
  }
  g.queue.clear();
  g.head = 0;
  g.n_done = 0;
  enqueue(ids);
  while (true) {
    while (g.head < g.queue.size()) {
      Thread& t = g.threads[g.queue[g.head++]];
      resume(t);
      if (t.state == State::kDone) {
        ++g.n_done;
      } else if (t.state == State::kWarpWait) {
        if (!try_complete_warp(t)) return false;
      }
    }
    g.queue.clear();
    g.head = 0;
    if (g.n_done == n) return true;
    if (!release_or_report()) return false;
  }
}

// Shared memory: every __shared__ variable of the kernels lies in this section (tests/emulated_cuda.py moves
// kernels.cu's zero-initialised data there). Weak: a build without the section has nothing to poison.
extern "C" char __start_ls_emu_shared[] __attribute__((weak));
extern "C" char __stop_ls_emu_shared[] __attribute__((weak));

__attribute__((no_sanitize_address)) void poison_shared() {
  // Byte stores that the sanitizer does not check: the section also holds the redzones between the variables.
  for (volatile char* p = __start_ls_emu_shared; p < __stop_ls_emu_shared; ++p) *p = static_cast<char>(0xff);
}

const char* const kReportNames[2] = {"asan", "ubsan"};

std::string report_file(int i) { return g.report_dir + "/" + kReportNames[i] + "." + std::to_string(getpid()); }

long file_size(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return 0;
  std::fseek(f, 0, SEEK_END);
  const long size = std::ftell(f);
  std::fclose(f);
  return size;
}

// What the sanitizers wrote since the last look becomes the launch's error.
void read_sanitizer_reports(const uint3& block) {
  if (g.report_dir.empty()) return;
  for (int i = 0; i < 2; ++i) {
    const std::string path = report_file(i);
    const long size = file_size(path);
    if (size <= g.report_seen[i]) continue;
    std::string text(size - g.report_seen[i], '\0');
    if (FILE* f = std::fopen(path.c_str(), "rb")) {
      std::fseek(f, g.report_seen[i], SEEK_SET);
      text.resize(std::fread(text.data(), 1, text.size(), f));
      std::fclose(f);
    }
    g.report_seen[i] = size;
    fail(std::string(kReportNames[i]) + " report in block (" + std::to_string(block.x) + ", " + std::to_string(block.y) +
         ", " + std::to_string(block.z) + ") of the launch at " + launch_site() + ":\n" + text);
  }
}

}  // namespace

void run(const Grid& grid, dim3 block, size_t dynamic_smem, const void* kernel, const std::function<void()>& body) {
  if (!g.error.empty()) return;  // an earlier launch failed: the harness reports that one
  g.grid = &grid;
  ++g.launches;
  const dim3 gd = grid.dim;
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  std::string bad;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    bad = "block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " + std::to_string(block.z) +
          ") is not a valid block (1 to 1024 threads, z <= 64)";
  else if (gd.x == 0 || gd.y == 0 || gd.z == 0 || gd.x > 0x7fffffffu || gd.y > 65535 || gd.z > 65535)
    bad = "grid (" + std::to_string(gd.x) + ", " + std::to_string(gd.y) + ", " + std::to_string(gd.z) +
          ") is not a valid grid (x in [1, 2^31 - 1], y and z in [1, 65535])";
  else if (dynamic_smem != 0)
    bad = "dynamic shared memory (" + std::to_string(dynamic_smem) + " bytes) is not emulated";
  if (!bad.empty()) {
    fail("invalid launch configuration at " + launch_site() + ": " + bad);
    return;
  }
  if (g.dry_run) {
    Dl_info info{};
    const auto addr = reinterpret_cast<uintptr_t>(kernel);
    const uintptr_t base = dladdr(kernel, &info) != 0 ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
    g.records.push_back({uint64_t(addr - base), gd, block, uint64_t(dynamic_smem)});
    g.grid = nullptr;
    return;
  }
  g.body = &body;
  std::vector<int> blocks(uint64_t(gd.x) * gd.y * gd.z);
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = static_cast<int>(i);
  ordered(blocks);
  for (int b : blocks) {
    const uint3 bi{unsigned(b) % gd.x, unsigned(b) / gd.x % gd.y, unsigned(b) / (gd.x * gd.y)};
    poison_shared();
    const bool ok = run_block(bi, gd, block);
    read_sanitizer_reports(bi);
    if (!ok || !g.error.empty()) break;
  }
  g.body = nullptr;
  g.grid = nullptr;
}

void sync_block(const Site& site) {
  Thread& t = running(site, "__syncthreads");
  t.state = State::kBlockWait;
  t.site = site;
  yield(t, false);
}

uint64_t warp_collective(const Site& site, WarpOp op, unsigned mask, uint64_t value, int param, int width) {
  Thread& t = running(site, op_name(op));
  t.state = State::kWarpWait;
  t.site = site;
  t.op = op;
  t.mask = mask;
  t.in = value;
  t.param = param;
  t.width = width;
  yield(t, false);
  return t.out;
}

}  // namespace ls_emu

// ---- control from the test harness (C ABI, loaded with ctypes) ----------------------------------------------------
extern "C" {

__attribute__((visibility("default"))) void ls_emu_set_order(int order, uint64_t seed) {
  ls_emu::g.order = order;
  ls_emu::g.rng.seed(seed);
}

// Sanitizer reports go to dir/asan.<pid> and dir/ubsan.<pid> (UBSan takes its path from LS_EMU_REPORT_DIR when the
// library loads: __ubsan_default_options); each launch turns what it caused into its error.
__attribute__((visibility("default"))) void ls_emu_set_report_dir(const char* dir) {
  ls_emu::g.report_dir = dir;
#if defined(LS_EMU_ASAN)
  __sanitizer_set_report_path((ls_emu::g.report_dir + "/asan").c_str());
#endif
  for (int i = 0; i < 2; ++i) ls_emu::g.report_seen[i] = ls_emu::file_size(ls_emu::report_file(i));
}

// Copies the first error since the last call into buf (NUL-terminated, truncated to n) and clears it; returns
// its full length (0: no error).
__attribute__((visibility("default"))) size_t ls_emu_take_error(char* buf, size_t n) {
  const size_t len = ls_emu::g.error.size();
  if (n > 0) {
    const size_t k = std::min(len, n - 1);
    std::memcpy(buf, ls_emu::g.error.data(), k);
    buf[k] = '\0';
  }
  ls_emu::g.error.clear();
  return len;
}

__attribute__((visibility("default"))) uint64_t ls_emu_switches() { return ls_emu::g.switches; }

// Dry run: launches are recorded, not run (the records are cleared when it is switched on).
__attribute__((visibility("default"))) void ls_emu_set_dry_run(int on) {
  ls_emu::g.dry_run = on != 0;
  if (on) ls_emu::g.records.clear();
}
__attribute__((visibility("default"))) uint64_t ls_emu_dry_run_count() { return ls_emu::g.records.size(); }
// Record i as 8 integers: kernel offset, grid x y z, block x y z, dynamic shared bytes.
__attribute__((visibility("default"))) void ls_emu_dry_run_record(uint64_t i, uint64_t* out) {
  const auto& r = ls_emu::g.records.at(i);
  const uint64_t v[8] = {r.kernel_offset, r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z, r.smem};
  std::memcpy(out, v, sizeof v);
}
__attribute__((visibility("default"))) uint64_t ls_emu_launches() { return ls_emu::g.launches; }

// Guard zones around the harness's tensors: reads and writes there are reported like any heap overflow.
__attribute__((visibility("default"))) void ls_emu_poison(void* p, size_t n) {
#if defined(LS_EMU_ASAN)
  ASAN_POISON_MEMORY_REGION(p, n);
#endif
}
__attribute__((visibility("default"))) void ls_emu_unpoison(void* p, size_t n) {
#if defined(LS_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(p, n);
#endif
}
__attribute__((visibility("default"))) int ls_emu_sanitized() {
#if defined(LS_EMU_ASAN)
  return 1;
#else
  return 0;
#endif
}

// The runtime options of the sanitizers: a library loaded into Python (not preloaded), reports that do not stop
// the process (the harness turns them into a failed test), no leak check of the interpreter at exit.
__attribute__((visibility("default"))) const char* __asan_default_options() {
  return "verify_asan_link_order=0:halt_on_error=0:detect_leaks=0:suppress_equal_pcs=0";
}
__attribute__((visibility("default"))) const char* __ubsan_default_options() {
  static std::string opts;
  const char* dir = std::getenv("LS_EMU_REPORT_DIR");
  opts = "halt_on_error=0:print_stacktrace=1";
  if (dir != nullptr && *dir) opts += std::string(":log_path=") + dir + "/ubsan";
  return opts.c_str();
}

}  // extern "C"
