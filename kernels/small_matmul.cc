// Products of a few rows with a weight matrix, y [R, O] = x [R, I] @ w [O, I]^T, for XLA
// on CPU (an XLA FFI custom call; kernels/small_matmul.py builds, loads and calls it).
//
// Why C++: a decode step of a few sequences multiplies a few rows by every weight matrix
// of the model, so its time should be the time to read the weights once. XLA CPU's dots
// of 2-16 rows take 1.2-3x longer than that (its 1-row dots are fine); this kernel
// streams each weight row once, dotting it with every x row (held in cache) in one pass,
// the output rows split over XLA's thread pool in blocks. A matrix whose float32 values
// are exactly Q4_1 / Q8_0 blocks or bfloat16 values (kernels/exact_blocks.py) can be
// streamed so instead, each weight rebuilt in registers: a fifth to half the bytes, bitwise
// the same outputs.

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
#if defined(__AVX512F__)
constexpr int kAccumulators = 16;  // 32 vector registers: 16 chains, with room for the rest
#else
constexpr int kAccumulators = 8;  // independent FMA chains: 2 FMA units x 4 cycles latency
#endif
constexpr int kTree = 8;  // accumulators one reduce_lanes call sums
constexpr int kBlock = 64;        // about the output rows a thread claims at a time
constexpr int kLineFloats = 64 / 4;
constexpr int kPrefetchBytes = 4096;  // how far ahead of the weight stream

typedef float vec __attribute__((vector_size(4 * W)));
typedef float unaligned_vec __attribute__((vector_size(4 * W), aligned(4)));
inline vec load(const float* p) { return *reinterpret_cast<const unaligned_vec*>(p); }

#define UNROLL _Pragma("GCC unroll 16")

// sums[k] = the sum of acc[k]'s lanes, for kTree accumulators at once: a transposing
// add tree where the instruction set has one, lane by lane otherwise. Each sum adds its
// own accumulator's lanes in a fixed order, whichever accumulators share the call.
inline void reduce_lanes(const vec* acc, float* sums) {
#if defined(__AVX__)
  __m256 v[kTree];
  UNROLL for (int k = 0; k < kTree; ++k) {
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
  UNROLL for (int k = 0; k < kTree; ++k) {
    float s = 0.f;
    UNROLL for (int i = 0; i < W; ++i) s += acc[k][i];
    sums[k] = s;
  }
#endif
}

// How a weight matrix is stored (kernels/exact_blocks.py; the codes are its Q4_1, Q8_0).
enum Format { kF32 = 0, kQ4_1 = 1, kQ8_0 = 2, kBF16 = 3 };

template <int F> struct Stored;
template <> struct Stored<kF32> {
  static constexpr int kChunk = kLineFloats;  // weights per prefetch: a cache line
  static constexpr int64_t row_bytes(int64_t I) { return 4 * I; }
};
template <> struct Stored<kQ4_1> {
  static constexpr int kChunk = 32;  // a block: float d, float m, 16 bytes of nibbles
  static constexpr int64_t row_bytes(int64_t I) { return I / 32 * 24; }
};
template <> struct Stored<kQ8_0> {
  static constexpr int kChunk = 32;  // a block: float d, 32 int8
  static constexpr int64_t row_bytes(int64_t I) { return I / 32 * 36; }
};
template <> struct Stored<kBF16> {
  static constexpr int kChunk = 32;  // 32 bfloat16: a cache line
  static constexpr int64_t row_bytes(int64_t I) { return I / 32 * 64; }
};

typedef int32_t int_vec __attribute__((vector_size(4 * W)));

inline float load_float(const uint8_t* p) {
  float f;
  __builtin_memcpy(&f, p, 4);
  return f;
}

// W bytes from p, each widened to an int32 lane (zero- or sign-extended).
template <bool kSigned>
inline int_vec widen(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (int_vec)(kSigned ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (int_vec)(kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  int_vec v;
  for (int i = 0; i < W; ++i)
    v[i] = kSigned ? static_cast<int8_t>(p[i]) : static_cast<int32_t>(p[i]);
  return v;
#endif
}

// W bfloat16 values from p as float32: each the upper half of its float32 (exact).
inline vec widen_bf16(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#elif defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vec)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
  vec v;
  for (int i = 0; i < W; ++i) {
    uint16_t half;
    __builtin_memcpy(&half, p + 2 * i, 2);
    const uint32_t bits = static_cast<uint32_t>(half) << 16;
    __builtin_memcpy(&v[i], &bits, 4);
  }
  return v;
#endif
}

// The W weights from element h (a multiple of W, below kChunk) of the chunk at `chunk`,
// rebuilt as float32: d * q + m rounds once (d * q is exact), as the loader's numpy did.
template <int F>
inline vec weights(const uint8_t* chunk, int h) {
  if constexpr (F == kF32) {
    return load(reinterpret_cast<const float*>(chunk) + h);
  } else if constexpr (F == kQ4_1) {
    const int_vec packed = widen<false>(chunk + 8 + h % 16);
    const int_vec q = h < 16 ? (packed & 0x0F) : (packed >> 4);
    return load_float(chunk) * __builtin_convertvector(q, vec) + load_float(chunk + 4);
  } else if constexpr (F == kBF16) {
    return widen_bf16(chunk + 2 * h);
  } else {
    return __builtin_convertvector(widen<true>(chunk + 4 + h), vec) * load_float(chunk);
  }
}

// y[r, o] for KO weight rows o in [o0, o0 + n) (n <= KO) and RB x rows from r0, in one
// pass over those weight rows: each weight vector is loaded once and multiplied into
// every x row (KO * RB <= kAccumulators chains), so the weights stream from memory once.
// Every format adds the same products in the same order, so a matrix stored as blocks
// gives bitwise the float32 matrix's outputs.
template <int F, int KO, int RB>
void outputs(const float* x, const uint8_t* w, float* y, int64_t I, int64_t O, int64_t o0,
             int n, int64_t r0) {
  static_assert(KO * RB <= kAccumulators, "one register per accumulator");
  constexpr int kChunk = Stored<F>::kChunk;
  constexpr int64_t kChunkBytes = Stored<F>::row_bytes(kChunk);
  constexpr int kUsed = (KO * RB + kTree - 1) / kTree * kTree;  // whole add trees
  vec acc[kUsed];
  UNROLL for (int k = 0; k < kUsed; ++k) acc[k] = vec{};
  const uint8_t* rows[KO];
  UNROLL for (int j = 0; j < KO; ++j)
    rows[j] = w + (o0 + std::min(j, n - 1)) * Stored<F>::row_bytes(I);
  const float* xs = x + r0 * I;
  // A chunk at a time, asking for the bytes a page ahead into L2: the hardware
  // prefetcher alone leaves the weight stream at about half the memory bandwidth here,
  // as the multiply-adds do not overlap its misses (measured on AMD Zen 3).
  const int64_t chunks = I / kChunk;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* chunk[KO];
    UNROLL for (int j = 0; j < KO; ++j) {
      chunk[j] = rows[j] + c * kChunkBytes;
      __builtin_prefetch(chunk[j] + kPrefetchBytes, 0, 1);
    }
    UNROLL for (int h = 0; h < kChunk; h += W) {
      const int64_t i = c * kChunk + h;
      UNROLL for (int j = 0; j < KO; ++j) {
        const vec wv = weights<F>(chunk[j], h);
        UNROLL for (int r = 0; r < RB; ++r) acc[j * RB + r] += wv * load(xs + r * I + i);
      }
    }
  }
  int64_t i = chunks * kChunk;
  const int64_t vector_end = I / W * W;  // float32 rows only: blocks divide I exactly
  for (; i < vector_end; i += W)
    UNROLL for (int j = 0; j < KO; ++j) {
      const vec wv = load(reinterpret_cast<const float*>(rows[j]) + i);
      UNROLL for (int r = 0; r < RB; ++r) acc[j * RB + r] += wv * load(xs + r * I + i);
    }
  float sums[kUsed];
  UNROLL for (int k = 0; k < kUsed; k += kTree) reduce_lanes(acc + k, sums + k);
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < RB; ++r) {
      float s = sums[j * RB + r];
      for (int64_t i = vector_end; i < I; ++i)
        s += reinterpret_cast<const float*>(rows[j])[i] * xs[r * I + i];
      y[(r0 + r) * O + o0 + j] = s;
    }
}

// Output rows [begin, end) for R = RB <= 8 x rows: KO weight rows at a time, KO * RB
// filling the accumulators.
template <int F, int KO, int RB>
void block_of(const float* x, const uint8_t* w, float* y, int64_t R, int64_t I, int64_t O,
              int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; o += KO)
    outputs<F, KO, RB>(x, w, y, I, O, o, static_cast<int>(std::min<int64_t>(KO, end - o)),
                       0);
}

// Output rows [begin, end) for R > 8 x rows: x rows in blocks of 8 (in L1), each block
// against the item's weight rows (in L2 after the first block), kO at a time, then the
// last R % 8 x rows one weight row at a time. Walking weight rows inside x blocks, not x
// blocks inside weight rows, keeps each x block's loads in L1: 1.3x less time at 16 rows
// and 2.5x at 32 on Zen 5, bitwise the same sums.
template <int F>
void block_of_many(const float* x, const uint8_t* w, float* y, int64_t R, int64_t I,
                   int64_t O, int64_t begin, int64_t end) {
  constexpr int kO = kAccumulators >= 16 ? 2 : 1;
  int64_t r = 0;
  for (; r + 8 <= R; r += 8)
    for (int64_t o = begin; o < end; o += kO)
      outputs<F, kO, 8>(x, w, y, I, O, o, static_cast<int>(std::min<int64_t>(kO, end - o)),
                        r);
  for (int64_t o = begin; o < end; ++o) {
    switch (R - r) {
      case 1: outputs<F, 1, 1>(x, w, y, I, O, o, 1, r); break;
      case 2: outputs<F, 1, 2>(x, w, y, I, O, o, 1, r); break;
      case 3: outputs<F, 1, 3>(x, w, y, I, O, o, 1, r); break;
      case 4: outputs<F, 1, 4>(x, w, y, I, O, o, 1, r); break;
      case 5: outputs<F, 1, 5>(x, w, y, I, O, o, 1, r); break;
      case 6: outputs<F, 1, 6>(x, w, y, I, O, o, 1, r); break;
      case 7: outputs<F, 1, 7>(x, w, y, I, O, o, 1, r); break;
    }
  }
}

typedef void (*BlockFn)(const float*, const uint8_t*, float*, int64_t, int64_t, int64_t,
                        int64_t, int64_t);

// How many weight rows go with how many x rows: 8 x rows take 2 weight rows where 16
// accumulators fit (each x vector loaded once for both: 7-13% less time at 8 rows on
// Zen 5; more weight rows at fewer x rows gained nothing there).
template <int F>
BlockFn block_for_rows(int64_t R) {
  if constexpr (kAccumulators >= 16)
    if (R == 8) return block_of<F, 2, 8>;
  switch (R) {
    case 1: return block_of<F, 8, 1>;
    case 2: return block_of<F, 4, 2>;
    case 3: return block_of<F, 2, 3>;
    case 4: return block_of<F, 2, 4>;
    case 5: return block_of<F, 1, 5>;
    case 6: return block_of<F, 1, 6>;
    case 7: return block_of<F, 1, 7>;
    case 8: return block_of<F, 1, 8>;
    default: return block_of_many<F>;
  }
}

// y = x @ w^T with w's rows stored in format F, the output rows split over the pool.
template <int F>
void multiply(ffi::ThreadPool& pool, const float* x, const uint8_t* w, float* y, int64_t R,
              int64_t I, int64_t O) {
  const BlockFn block = block_for_rows<F>(R);
  // Items of about kBlock rows, as many as a multiple of the threads: the default model's
  // 576-row matrices were 9 items of 64 rows, one thread running five of them (its 8-row
  // down projection 51-58 -> 49-51 us on Zen 5 as 8 of 72). Whole passes of the widest
  // KO (8 weight rows), so that no item ends in a pass of repeated rows.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t items = std::max(threads, (O + kBlock - 1) / kBlock / threads * threads);
  const int64_t rows = ((O + items - 1) / items + 7) / 8 * 8;
  pagedjax::run_items(pool, (O + rows - 1) / rows, R * I * O, [=](int64_t b) {
    block(x, w, y, R, I, O, b * rows, std::min(O, (b + 1) * rows));
  });
}

}  // namespace

// Whether x and w are [R, I] and [O, I], the product every handler takes.
template <typename WeightBuffer>
static bool is_product(ffi::Buffer<ffi::F32>& x, WeightBuffer& w) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  return xd.size() == 2 && wd.size() == 2 && xd[1] == wd[1];
}

static ffi::Error SmallMatmul(ffi::ThreadPool thread_pool,
                              ffi::Buffer<ffi::F32> x,          // [R, I]
                              ffi::Buffer<ffi::F32> w,          // [O, I]
                              ffi::ResultBuffer<ffi::F32> y) {  // [R, O]
  if (!is_product(x, w))
    return ffi::Error::InvalidArgument("small matmul: x must be [R, I] and w [O, I]");
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  multiply<kF32>(thread_pool, x.typed_data(), reinterpret_cast<const uint8_t*>(w.typed_data()),
                 y->typed_data(), xd[0], xd[1], wd[0]);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The same product with w also stored as blocks (format `format`), read in its place
// while use_blocks holds; new weights (update_params) clear it without a recompile.
static ffi::Error SmallMatmulBlocks(ffi::ThreadPool thread_pool,
                                    ffi::Buffer<ffi::F32> x,           // [R, I]
                                    ffi::Buffer<ffi::F32> w,           // [O, I]
                                    ffi::Buffer<ffi::U8> blocks,       // [O, row bytes]
                                    ffi::Buffer<ffi::PRED> use_blocks,  // []
                                    ffi::ResultBuffer<ffi::F32> y,     // [R, O]
                                    int32_t format) {
  if (!*use_blocks.typed_data()) return SmallMatmul(thread_pool, x, w, y);
  if (!is_product(x, w))
    return ffi::Error::InvalidArgument("small matmul: x must be [R, I] and w [O, I]");
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto bd = blocks.dimensions();
  const int64_t R = xd[0], I = xd[1], O = wd[0];
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  const int64_t row_bytes = format == kQ4_1   ? Stored<kQ4_1>::row_bytes(I)
                            : format == kQ8_0 ? Stored<kQ8_0>::row_bytes(I)
                            : format == kBF16 ? Stored<kBF16>::row_bytes(I)
                                              : -1;
  if (row_bytes < 0 || I % 32 || bd.size() != 2 || bd[0] != O || bd[1] != row_bytes)
    return ffi::Error::InvalidArgument("small matmul: blocks do not match w's format");
  if (format == kQ4_1)
    multiply<kQ4_1>(thread_pool, x_data, blocks.typed_data(), y_data, R, I, O);
  else if (format == kQ8_0)
    multiply<kQ8_0>(thread_pool, x_data, blocks.typed_data(), y_data, R, I, O);
  else
    multiply<kBF16>(thread_pool, x_data, blocks.typed_data(), y_data, R, I, O);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxSmallMatmulBlocks, SmallMatmulBlocks,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("format"));

// The product with layer `layer` of stacked weights w [L, O, I] (float32, or bfloat16 read
// as the BF16 format: I a multiple of 32), read where it lies: a step's matmul cannot read
// a dynamic slice of a stacked array in place on XLA CPU, so without this every layer's
// slice would be copied first (a trainer's params reach the engine stacked). A single
// bfloat16 matrix (a bfloat16 engine's per-layer params) comes as a stack of one: a
// bfloat16 value's 2 bytes are the BF16 format's, so the same loops widen them in
// registers and sum in float32.
template <ffi::DataType WT>
static ffi::Error SmallMatmulLayer(ffi::ThreadPool thread_pool,
                                   ffi::Buffer<ffi::F32> x,          // [R, I]
                                   ffi::Buffer<WT> w,                // [L, O, I]
                                   ffi::Buffer<ffi::S32> layer,      // []
                                   ffi::ResultBuffer<ffi::F32> y) {  // [R, O]
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  constexpr bool kHalf = WT == ffi::DataType::BF16;
  if (xd.size() != 2 || wd.size() != 3 || xd[1] != wd[2] || (kHalf && xd[1] % 32))
    return ffi::Error::InvalidArgument(
        "small matmul: x must be [R, I] and w [L, O, I] (bfloat16: I a multiple of 32)");
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= wd[0])
    return ffi::Error::InvalidArgument("small matmul: layer index out of range");
  const int64_t R = xd[0], I = xd[1], O = wd[1];
  const int64_t row_bytes = kHalf ? Stored<kBF16>::row_bytes(I) : Stored<kF32>::row_bytes(I);
  const uint8_t* matrix = static_cast<const uint8_t*>(w.untyped_data()) + l * O * row_bytes;
  if constexpr (kHalf)
    multiply<kBF16>(thread_pool, x.typed_data(), matrix, y->typed_data(), R, I, O);
  else
    multiply<kF32>(thread_pool, x.typed_data(), matrix, y->typed_data(), R, I, O);
  return ffi::Error::Success();
}

#define PAGEDJAX_BIND_SMALL_MATMUL_LAYER(WT) \
  ffi::Ffi::Bind()                           \
      .Ctx<ffi::ThreadPool>()                \
      .Arg<ffi::Buffer<ffi::F32>>()          \
      .Arg<ffi::Buffer<WT>>()                \
      .Arg<ffi::Buffer<ffi::S32>>()          \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxSmallMatmulLayer, SmallMatmulLayer<ffi::F32>,
                              PAGEDJAX_BIND_SMALL_MATMUL_LAYER(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxSmallMatmulLayerBF16, SmallMatmulLayer<ffi::BF16>,
                              PAGEDJAX_BIND_SMALL_MATMUL_LAYER(ffi::BF16));
