// Products of a few rows with a weight matrix, y [R, O] = x [R, I] @ w [O, I]^T, for XLA
// on CPU (an XLA FFI custom call; kernels/small_matmul.py builds, loads and calls it).
//
// Why C++: a decode step of a few sequences multiplies a few rows by every weight matrix
// of the model, so its time should be the time to read the weights once. XLA CPU's dots
// of 2-16 rows take 1.2-3x longer than that (its 1-row dots are fine); this kernel
// streams each weight row once, dotting it with every x row (held in cache) in one pass,
// the output rows split over XLA's thread pool in blocks.

#include <algorithm>
#include <cstdint>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "parallel_items.h"
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
constexpr int kAccumulators = 8;  // independent FMA chains: 2 FMA units x 4 cycles latency
constexpr int kBlock = 64;        // output rows a thread claims at a time
constexpr int kLineFloats = 64 / 4;
constexpr int kPrefetchFloats = 4096 / 4;  // how far ahead of the weight stream

typedef float vec __attribute__((vector_size(4 * W)));
typedef float unaligned_vec __attribute__((vector_size(4 * W), aligned(4)));
inline vec load(const float* p) { return *reinterpret_cast<const unaligned_vec*>(p); }

#define UNROLL _Pragma("GCC unroll 16")

// sums[k] = the sum of acc[k]'s lanes, for kAccumulators accumulators at once: a
// transposing add tree where the instruction set has one, lane by lane otherwise.
inline void reduce_lanes(const vec* acc, float* sums) {
  static_assert(kAccumulators == 8, "the add tree below sums 8 accumulators");
#if defined(__AVX__)
  __m256 v[kAccumulators];
  UNROLL for (int k = 0; k < kAccumulators; ++k) {
#if defined(__AVX512F__)
    const __m512 a = (__m512)acc[k];
    v[k] = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(
        _mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
#else
    v[k] = (__m256)acc[k];
#endif
  }
  const __m256 pairs01 = _mm256_hadd_ps(v[0], v[1]), pairs23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 pairs45 = _mm256_hadd_ps(v[4], v[5]), pairs67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 quads0123 = _mm256_hadd_ps(pairs01, pairs23);
  const __m256 quads4567 = _mm256_hadd_ps(pairs45, pairs67);
  _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(quads0123, quads4567, 0x20),
                                       _mm256_permute2f128_ps(quads0123, quads4567, 0x31)));
#else
  UNROLL for (int k = 0; k < kAccumulators; ++k) {
    float s = 0.f;
    UNROLL for (int i = 0; i < W; ++i) s += acc[k][i];
    sums[k] = s;
  }
#endif
}

// y[r, o] for KO weight rows o in [o0, o0 + n) (n <= KO) and RB x rows from r0, in one
// pass over those weight rows: each weight vector is loaded once and multiplied into
// every x row (KO * RB <= kAccumulators chains), so the weights stream from memory once.
template <int KO, int RB>
void outputs(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t o0,
             int n, int64_t r0) {
  static_assert(KO * RB <= kAccumulators, "one register per accumulator");
  vec acc[kAccumulators];
  UNROLL for (int k = 0; k < kAccumulators; ++k) acc[k] = vec{};
  const int64_t vector_end = I / W * W;
  const float* rows[KO];
  UNROLL for (int j = 0; j < KO; ++j) rows[j] = w + (o0 + std::min(j, n - 1)) * I;
  const float* xs = x + r0 * I;
  auto multiply_add = [&](int64_t i) {
    UNROLL for (int j = 0; j < KO; ++j) {
      const vec wv = load(rows[j] + i);
      UNROLL for (int r = 0; r < RB; ++r) acc[j * RB + r] += wv * load(xs + r * I + i);
    }
  };
  // A cache line at a time, asking for the line a page ahead into L2: the hardware
  // prefetcher alone leaves the weight stream at about half the memory bandwidth here,
  // as the multiply-adds do not overlap its misses (measured on AMD Zen 3).
  const int64_t line_end = I / kLineFloats * kLineFloats;
  int64_t i = 0;
  for (; i < line_end; i += kLineFloats) {
    UNROLL for (int j = 0; j < KO; ++j) __builtin_prefetch(rows[j] + i + kPrefetchFloats, 0, 1);
    UNROLL for (int h = 0; h < kLineFloats; h += W) multiply_add(i + h);
  }
  for (; i < vector_end; i += W) multiply_add(i);
  float sums[kAccumulators];
  reduce_lanes(acc, sums);
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < RB; ++r) {
      float s = sums[j * RB + r];
      for (int64_t i = vector_end; i < I; ++i) s += rows[j][i] * xs[r * I + i];
      y[(r0 + r) * O + o0 + j] = s;
    }
}

// Output rows [begin, end) for R = RB <= 8 x rows: KO weight rows at a time, KO * RB
// filling the accumulators.
template <int KO, int RB>
void block_of(const float* x, const float* w, float* y, int64_t R, int64_t I, int64_t O,
              int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; o += KO)
    outputs<KO, RB>(x, w, y, I, O, o, static_cast<int>(std::min<int64_t>(KO, end - o)), 0);
}

// Output rows [begin, end) for R > 8 x rows: each weight row against 8 x rows at a time,
// the passes after the first reading it from L1.
void block_of_many(const float* x, const float* w, float* y, int64_t R, int64_t I,
                   int64_t O, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    int64_t r = 0;
    for (; r + 8 <= R; r += 8) outputs<1, 8>(x, w, y, I, O, o, 1, r);
    switch (R - r) {
      case 1: outputs<1, 1>(x, w, y, I, O, o, 1, r); break;
      case 2: outputs<1, 2>(x, w, y, I, O, o, 1, r); break;
      case 3: outputs<1, 3>(x, w, y, I, O, o, 1, r); break;
      case 4: outputs<1, 4>(x, w, y, I, O, o, 1, r); break;
      case 5: outputs<1, 5>(x, w, y, I, O, o, 1, r); break;
      case 6: outputs<1, 6>(x, w, y, I, O, o, 1, r); break;
      case 7: outputs<1, 7>(x, w, y, I, O, o, 1, r); break;
    }
  }
}

typedef void (*BlockFn)(const float*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, int64_t);

BlockFn block_for_rows(int64_t R) {
  switch (R) {
    case 1: return block_of<8, 1>;
    case 2: return block_of<4, 2>;
    case 3: return block_of<2, 3>;
    case 4: return block_of<2, 4>;
    case 5: return block_of<1, 5>;
    case 6: return block_of<1, 6>;
    case 7: return block_of<1, 7>;
    case 8: return block_of<1, 8>;
    default: return block_of_many;
  }
}

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
  const BlockFn block = block_for_rows(R);
  pagedjax::run_items(thread_pool, blocks, R * I * O, [=](int64_t b) {
    block(x_data, w_data, y_data, R, I, O, b * kBlock, std::min(O, (b + 1) * kBlock));
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
