// Products of a few rows with a weight matrix, y [R, O] = x [R, I] @ w [O, I]^T, for XLA
// on CPU (an XLA FFI custom call; kernels/small_matmul.py builds, loads and calls it).
//
// Why C++: a decode step of a few sequences multiplies a few rows by every weight matrix
// of the model, so its time should be the time to read the weights once. XLA CPU's dots
// of 2-16 rows take 1.2-3x longer than that (its 1-row dots are fine); this kernel
// streams each weight row once, dotting it with every x row (held in L1), the output rows
// split over XLA's thread pool in blocks.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
constexpr int kOutputs = 4;      // weight rows read side by side
constexpr int kRowsAtOnce = 2;   // x rows per pass over those weight rows (registers)
constexpr int kBlock = 64;       // output rows a thread claims at a time
constexpr int64_t kMinParallelWork = int64_t{1} << 20;  // multiply-adds

typedef float vec __attribute__((vector_size(4 * W)));
typedef float unaligned_vec __attribute__((vector_size(4 * W), aligned(4)));
inline vec load(const float* p) { return *reinterpret_cast<const unaligned_vec*>(p); }

#define UNROLL _Pragma("GCC unroll 16")

inline float reduce_sum(vec x) {
  float s = 0.f;
  UNROLL for (int i = 0; i < W; ++i) s += x[i];
  return s;
}

// y[r, o] for o in [o0, o0 + n) (n <= kOutputs) and r in [r0, r0 + RB).
template <int RB>
void outputs(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t o0,
             int n, int64_t r0) {
  vec acc[kOutputs][RB];
  UNROLL for (int j = 0; j < kOutputs; ++j)
    UNROLL for (int r = 0; r < RB; ++r) acc[j][r] = vec{};
  const int64_t vector_end = I / W * W;
  const float* rows[kOutputs];
  UNROLL for (int j = 0; j < kOutputs; ++j) rows[j] = w + (o0 + std::min(j, n - 1)) * I;
  for (int64_t i = 0; i < vector_end; i += W) {
    vec xs[RB];
    UNROLL for (int r = 0; r < RB; ++r) xs[r] = load(x + (r0 + r) * I + i);
    UNROLL for (int j = 0; j < kOutputs; ++j) {
      const vec wv = load(rows[j] + i);
      UNROLL for (int r = 0; r < RB; ++r) acc[j][r] += wv * xs[r];
    }
  }
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < RB; ++r) {
      float s = reduce_sum(acc[j][r]);
      for (int64_t i = vector_end; i < I; ++i) s += rows[j][i] * x[(r0 + r) * I + i];
      y[(r0 + r) * O + o0 + j] = s;
    }
}

void block(const float* x, const float* w, float* y, int64_t R, int64_t I, int64_t O,
           int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; o += kOutputs) {
    const int n = static_cast<int>(std::min<int64_t>(kOutputs, end - o));
    int64_t r = 0;
    for (; r + kRowsAtOnce <= R; r += kRowsAtOnce)
      outputs<kRowsAtOnce>(x, w, y, I, O, o, n, r);
    for (; r < R; ++r) outputs<1>(x, w, y, I, O, o, n, r);
  }
}

// Blocks claimed one at a time by the calling thread and the pool's; shared so that a
// pool task starting after the work is done reads no freed stack frame.
struct SharedWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
};

}  // namespace

static ffi::Error SmallMatmul(ffi::ThreadPool thread_pool,
                              ffi::Buffer<ffi::F32> x,          // [R, I]
                              ffi::Buffer<ffi::F32> w,          // [O, I]
                              ffi::ResultBuffer<ffi::F32> y) {  // [R, O]
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("small matmul: x must be [R, I] and w [O, I]");
  const int64_t R = xd[0], I = xd[1], O = wd[0];
  const int64_t blocks = (O + kBlock - 1) / kBlock;
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data();
  float* y_data = y->typed_data();
  auto work = std::make_shared<SharedWork>();
  auto run_blocks = [=](SharedWork& shared) {
    for (int64_t b; (b = shared.next.fetch_add(1)) < blocks;) {
      block(x_data, w_data, y_data, R, I, O, b * kBlock, std::min(O, (b + 1) * kBlock));
      shared.finished.fetch_add(1);
    }
  };
  // Small products run on the calling thread alone: handing blocks to the pool costs
  // more than they take, and waiting on a helper the OS has descheduled (cores shared
  // with other processes) costs a time slice.
  const int64_t helpers = R * I * O < kMinParallelWork
                              ? 0
                              : std::min<int64_t>(thread_pool.num_threads(), blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i)
    thread_pool.Schedule([work, run_blocks]() { run_blocks(*work); });
  run_blocks(*work);
  while (work->finished.load() < blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
