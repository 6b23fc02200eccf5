// A small work-claiming thread pool for the CPU kernels.
//
//   parallel_items(n, [&](int64_t i) { ... });   // runs every i in [0, n) exactly once, returns when all are done
//
// The calling thread claims items itself and helper threads (at::get_num_threads() - 1 of them) join in when they
// are running; the caller waits only for items already claimed, never for a helper to show up. On a machine
// shared with other busy processes a descheduled helper therefore costs at most the item it holds, where a
// fork/join region (OpenMP) waits for every thread of the team to be scheduled: measured 10x slower decoding with
// 2 threads under load. Helpers spin briefly after a job (regions of one forward pass come back to back), then
// sleep. Which thread computes an item never changes its result: every kernel here is row / column independent.
// Nested calls (from inside an item) run on the calling thread. After fork() the child starts with no helpers.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace layerskip::cpu {

using ItemFn = void (*)(void* ctx, int64_t i);

// The engine: fn(ctx, i) for i in [0, n). threads <= 1 or n <= 1: on the calling thread.
void parallel_items_raw(int64_t n, int64_t threads, ItemFn fn, void* ctx);

// Threads to use: torch's intra-op setting (torch.set_num_threads).
int64_t pool_threads();

template <typename F>
void parallel_items(int64_t n, F&& f, int64_t threads = -1) {
  if (n <= 0) return;
  if (threads < 0) threads = pool_threads();
  using Fn = std::remove_reference_t<F>;
  parallel_items_raw(
      n, threads, [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// Like at::parallel_for: f(begin, end) over chunks of [0, n) of at least grain items (fewer, larger chunks for
// cheap items). Chunk boundaries depend on n, grain and the thread count: only for row-independent work.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t threads = pool_threads();
  grain = grain < 1 ? 1 : grain;
  int64_t chunks = (n + grain - 1) / grain;
  const int64_t max_chunks = 4 * (threads < 1 ? 1 : threads);
  chunks = chunks > max_chunks ? max_chunks : chunks;
  if (chunks <= 1 || threads <= 1) {
    f(int64_t(0), n);
    return;
  }
  parallel_items(
      chunks, [&](int64_t c) { f(n * c / chunks, n * (c + 1) / chunks); }, threads);
}

}  // namespace layerskip::cpu
