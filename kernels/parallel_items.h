// Items [0, n) of a kernel call shared between the calling thread and XLA's CPU thread
// pool, for the XLA FFI kernels beside this header (decode_attention.cc,
// small_matmul.cc). Kernels #include it; native_build hashes it into their build key.

#ifndef PAGEDJAX_KERNELS_PARALLEL_ITEMS_H_
#define PAGEDJAX_KERNELS_PARALLEL_ITEMS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace pagedjax {

// Multiply-adds below which a call stays on the calling thread: handing items to the
// pool costs more than they take, and waiting on a helper the OS has descheduled (cores
// shared with other processes) costs a time slice. At 2^18 a decode step's 1-row
// products of the default model's smaller matrices (576 x 576 and up) go parallel: their
// time 12-17% less than at 2^20 on Zen 5.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

// Runs run_item(i) once for every i in [0, n), items claimed one at a time by the calling
// thread and, when the call has at least kMinParallelWork multiply-adds, by up to
// pool.num_threads() - 1 pool threads; returns when every item has finished. run_item is
// copied into each pool task, and the claim counters live in shared state, so a task the
// pool starts after the call has returned claims nothing and touches no freed memory.
template <typename RunItem>
void run_items(xla::ffi::ThreadPool& pool, int64_t n, int64_t multiply_adds,
               RunItem run_item) {
  struct Claims {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto claims = std::make_shared<Claims>();
  auto work = [claims, n, run_item]() {
    for (int64_t i; (i = claims->next.fetch_add(1)) < n;) {
      run_item(i);
      claims->finished.fetch_add(1);
    }
  };
  const int64_t helpers = multiply_adds < kMinParallelWork
                              ? 0
                              : std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  while (claims->finished.load() < n) std::this_thread::yield();
}

}  // namespace pagedjax

#endif  // PAGEDJAX_KERNELS_PARALLEL_ITEMS_H_
