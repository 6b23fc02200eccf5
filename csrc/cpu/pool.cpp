// The work-claiming pool of pool.h.
//
// One job at a time (the kernels call it from one thread; a second caller thread would just wait its turn on the
// job lock). `state` packs: helpers inside the current job (bits 0-15), "closed" (bit 16: no helper may join while
// the caller prepares the next job) and the job generation (bits 17-63). A helper joins a job with a CAS on state;
// the caller closes the previous job only once its helpers have left, so job fields never change under a helper.
#include "cpu/pool.h"

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <thread>

namespace layerskip::cpu {
namespace {

constexpr uint64_t kBusyMask = 0xFFFF;
constexpr uint64_t kClosed = uint64_t(1) << 16;
constexpr int kGenShift = 17;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

using Clock = std::chrono::steady_clock;
constexpr auto kHelperSpin = std::chrono::microseconds(200);  // then sleep until the next job
constexpr auto kCallerSpin = std::chrono::microseconds(50);   // then yield the core while items finish

thread_local bool t_in_item = false;

struct Pool {
  std::atomic<uint64_t> state{0};
  std::atomic<int64_t> max_helpers{0};
  ItemFn fn = nullptr;
  void* ctx = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;

  std::mutex* sleep_m = new std::mutex;
  std::condition_variable* sleep_cv = new std::condition_variable;
  std::atomic<int> sleepers{0};
  std::atomic<int64_t> helpers{0};
  std::atomic<uint64_t> epoch{0};
  std::mutex* job_m = new std::mutex;  // one caller at a time

  void work() {
    const ItemFn f = fn;
    void* c = ctx;
    const int64_t total = n;
    t_in_item = true;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= total) break;
      if (!failed.load(std::memory_order_relaxed)) {
        try {
          f(c, i);
        } catch (...) {
          bool expected = false;
          if (failed.compare_exchange_strong(expected, true)) error = std::current_exception();
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
    t_in_item = false;
  }

  void helper_loop(uint64_t my_epoch) {
    uint64_t seen = 0;
    auto idle_since = Clock::now();
    for (;;) {
      if (epoch.load(std::memory_order_relaxed) != my_epoch) return;
      uint64_t s = state.load(std::memory_order_acquire);
      const uint64_t g = s >> kGenShift;
      if (g != seen && !(s & kClosed)) {
        if (static_cast<int64_t>(s & kBusyMask) >= max_helpers.load(std::memory_order_relaxed)) {
          seen = g;  // enough helpers on this one
          continue;
        }
        if (state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
          seen = g;
          work();
          state.fetch_sub(1, std::memory_order_release);
          idle_since = Clock::now();
        }
        continue;
      }
      if (Clock::now() - idle_since < kHelperSpin) {
        for (int k = 0; k < 32; ++k) cpu_relax();
        continue;
      }
      std::unique_lock<std::mutex> lk(*sleep_m);
      sleepers.fetch_add(1, std::memory_order_seq_cst);
      sleep_cv->wait(lk, [&] {
        return (state.load(std::memory_order_seq_cst) >> kGenShift) != seen ||
               epoch.load(std::memory_order_relaxed) != my_epoch;
      });
      sleepers.fetch_sub(1, std::memory_order_seq_cst);
      idle_since = Clock::now();
    }
  }

  void ensure_helpers(int64_t wanted) {
    if (helpers.load(std::memory_order_acquire) >= wanted) return;
    const uint64_t e = epoch.load();
    while (helpers.load() < wanted) {
      std::thread([this, e] { helper_loop(e); }).detach();
      helpers.fetch_add(1);
    }
  }

  void run(int64_t total, int64_t threads, ItemFn f, void* c) {
    std::lock_guard<std::mutex> job_lock(*job_m);
    const int64_t want = threads - 1;
    ensure_helpers(want);
    // Close the previous job (once its helpers have left) so nobody joins while the fields change.
    uint64_t s = state.load(std::memory_order_acquire);
    for (;;) {
      if ((s & kBusyMask) == 0) {
        if (state.compare_exchange_weak(s, s | kClosed, std::memory_order_acq_rel)) break;
      } else {
        cpu_relax();
        s = state.load(std::memory_order_acquire);
      }
    }
    fn = f;
    ctx = c;
    n = total;
    next.store(0, std::memory_order_relaxed);
    done.store(0, std::memory_order_relaxed);
    failed.store(false, std::memory_order_relaxed);
    error = nullptr;
    max_helpers.store(want, std::memory_order_relaxed);
    state.store(((s >> kGenShift) + 1) << kGenShift, std::memory_order_seq_cst);
    if (sleepers.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(*sleep_m);
      sleep_cv->notify_all();
    }
    work();
    const auto t0 = Clock::now();
    while (done.load(std::memory_order_acquire) < total) {
      if (Clock::now() - t0 < kCallerSpin)
        cpu_relax();
      else
        sched_yield();  // a helper holding an item may be waiting for this core
    }
    if (failed.load()) std::rethrow_exception(error);
  }

  // fork(): the child has none of the helper threads; locks may be held by threads that do not exist there.
  void reset_after_fork() {
    epoch.fetch_add(1);
    helpers.store(0);
    sleepers.store(0);
    state.store(0);
    sleep_m = new std::mutex;  // the parent's may be locked forever in the child: leak it
    sleep_cv = new std::condition_variable;
    job_m = new std::mutex;
  }
};

Pool& pool() {
  static Pool* p = [] {
    auto* pp = new Pool;  // never destroyed: helpers sleep until the process exits
    pthread_atfork(nullptr, nullptr, [] { pool().reset_after_fork(); });
    return pp;
  }();
  return *p;
}

}  // namespace

int64_t pool_threads() { return at::get_num_threads(); }

void parallel_items_raw(int64_t n, int64_t threads, ItemFn fn, void* ctx) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1 || t_in_item) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
  pool().run(n, threads > 1 + int64_t(kBusyMask) ? 1 + int64_t(kBusyMask) : threads, fn, ctx);
}

}  // namespace layerskip::cpu
