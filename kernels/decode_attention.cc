// Paged attention of query rows over their cached context (decode tokens, and every
// token of a continuing chunk), for XLA on CPU (an XLA FFI custom call;
// kernels/native_attention.py builds, loads and calls it).
//
// Why C++: XLA CPU cannot feed a gather into a dot, so the jnp backend copies every
// page it reads into a fresh buffer and reads it again in small GEMMs (about three
// passes over the KV bytes). This kernel multiplies each page where it lies in the pool:
// one pass, the next page prefetched while the current one is used.
//
// One row is one query token: q [R, K, G, D] (already scaled) attends to the keys at
// positions < lens[r] (and > positions[r] - window when a window is set) of the pages
// listed in tables[r]. Pool layouts are the engine's: keys [L, P, K, D, S] (transposed
// within a page), values [L, P, S, K, D], of float32 or bfloat16 (widened as read). The
// result is the unnormalised softmax (running max [R, K, G], total [R, K, G], weighted
// values [R, K, G, D]) that the Python side merges with the step's own tokens; a row that
// sees no key gets max -1e30, total 0.
// Adjacent rows that see the same keys (a chunk's tokens) are walked together, page by
// page, so a page is read from memory once for the group, not once per row.
//
// GROUP (G), HEAD_DIM (D) and PAGE_SIZE (S) are compile-time constants (-D flags, one
// build per model shape) so that the loops over a page tile exactly into registers.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "parallel_items.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifndef GROUP
#error "build with -DGROUP=<query heads per KV head>"
#endif
#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<head dim>"
#endif
#ifndef PAGE_SIZE
#error "build with -DPAGE_SIZE=<tokens per page>"
#endif

namespace {

// The machine's SIMD registers (the build is -march=native): their width in floats and
// how many there are. The inner loops keep G x (a few) accumulators in registers; more
// than the machine has spills them to the stack on every multiply-add, which is what
// made 16-float vectors (two registers each) run at a third of the read bandwidth on
// AVX2.
#if defined(__AVX512F__)
constexpr int kVectorFloats = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorFloats = 8, kRegisters = 16;
#elif defined(__aarch64__)
constexpr int kVectorFloats = 4, kRegisters = 32;
#else
constexpr int kVectorFloats = 4, kRegisters = 16;
#endif

constexpr int G = GROUP, D = HEAD_DIM, S = PAGE_SIZE;
// Floats per vector: a register's width unless the head dim or the page size needs
// narrower vectors to tile exactly.
constexpr int W = std::gcd(std::gcd(kVectorFloats, D), S);
constexpr int DT = D / W, ST = S / W;

// The largest divisor of `tiles` whose G x chunk accumulators fit the registers next to
// `others` live ones (at least 1).
constexpr int chunk_tiles(int tiles, int others) {
  int best = 1;
  for (int c = 1; c <= tiles; ++c)
    if (tiles % c == 0 && G * c + others <= kRegisters) best = c;
  return best;
}
// Keys: per head dim, G broadcast queries and one key vector at a time.
constexpr int KC = chunk_tiles(ST, G + 1);
// Values: one value vector at a time, G broadcast weights.
constexpr int VC = chunk_tiles(DT, G + 1);
constexpr float kNegInf = -1e30f;  // the jnp backend's NEG_INF
constexpr int kCacheLineBytes = 64;  // one prefetch per line
// Rows walked together over one sequence's pages: enough to read each page once for a
// chunk's worth of rows, few enough that a long chunk still spreads over the threads.
constexpr int kMaxGroupRows = 16;

// Loops over registers' worth of accumulators are unrolled by force: a rolled loop
// keeps its accumulator array on the stack, one store and reload per multiply-add.
#define UNROLL _Pragma("GCC unroll 64")

// W floats in a GCC / Clang vector, mapped to the machine's SIMD registers, and its
// unaligned twin through which pages are read and written (a plain dereference: the
// memcpy idiom made GCC bounce each AVX2 load through a stack slot, stalling on store
// forwarding).
typedef float vec __attribute__((vector_size(4 * W)));
typedef int32_t ivec __attribute__((vector_size(4 * W)));
typedef float unaligned_vec __attribute__((vector_size(4 * W), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const unaligned_vec*>(p); }

// A pool element: float32, or bfloat16 held as its 16 bits (Bf16Bits). Pool reads go
// through load_kv, which widens bfloat16 exactly (its bits are a float32's upper half), so
// a bfloat16 pool gives bitwise the results of a float32 pool holding the same values.
struct Bf16Bits {
  uint16_t bits;
};
inline vec load_kv(const float* p) { return load(p); }
inline vec load_kv(const Bf16Bits* p) {
  typedef uint16_t half_vec __attribute__((vector_size(2 * W), aligned(2)));
  typedef uint32_t wide_vec __attribute__((vector_size(4 * W)));
  const wide_vec wide =
      __builtin_convertvector(*reinterpret_cast<const half_vec*>(p), wide_vec) << 16;
  vec out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
inline void store(float* p, vec x) { *reinterpret_cast<unaligned_vec*>(p) = x; }
inline vec splat(float x) { return vec{} + x; }
inline ivec lane_index() {
  ivec index;
  for (int i = 0; i < W; ++i) index[i] = i;
  return index;
}
inline float reduce_max(vec x) {
  float m = x[0];
  for (int i = 1; i < W; ++i) m = std::max(m, x[i]);
  return m;
}
inline float reduce_sum(vec x) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += x[i];
  return s;
}

// exp on W lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by the Cephes expf
// polynomial (~1 ulp), 2^n put in the exponent bits. Clamped to the float range, so
// exp(-1e30 - m) is ~1e-38, which only ever multiplies zeros.
inline vec exp_vec(vec x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365447505531f) ? x : splat(-87.3365447505531f);
  const vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vec shifted = x * splat(1.44269504088896341f) + magic;
  vec n = shifted - magic;
  vec r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  ivec bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  ivec magic_bits;
  std::memcpy(&magic_bits, &magic, sizeof(magic_bits));
  ivec scale_bits = ((bits - magic_bits) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

// cap * tanh(x / cap), Gemma 2's soft-cap, as 1 - 2 / (exp(2y) + 1).
inline vec soft_cap_vec(vec x, float cap) {
  vec e = exp_vec(x * splat(2.0f / cap));
  return splat(cap) * (splat(1.0f) - splat(2.0f) / (e + splat(1.0f)));
}

template <typename T>
struct Pools {
  const T* keys;    // this layer's [P, K, D, S]
  const T* values;  // this layer's [P, S, K, D]
  int64_t num_pages;
  int num_kv_heads;
};

struct Row {
  const float* q;        // [K, G, D]
  const int32_t* table;  // [M]
  int32_t len, position;
  float* max;            // [K, G]
  float* total;          // [K, G]
  float* out;            // [K, G, D]
};

// One row's share of one page for KV head k: its scores against the page's visible keys
// [lo, hi), folded into the row's running max, total and weighted values. With `next`
// set, the next page's bytes for this head are requested while this one is multiplied.
template <typename T>
void attend_page_head(const Row& row, int K, int k, const T* page_keys, const T* page_values,
                      int lo, int hi, const T* next_keys, const T* next_values,
                      float soft_cap) {
  constexpr int kLine = kCacheLineBytes / sizeof(T);  // pool elements per cache line
  const int tile_lo = lo / W, tile_hi = (hi + W - 1) / W;
  const bool prefetch = next_keys != nullptr;
  const T* keys = page_keys + int64_t{k} * D * S;  // [D, S]
  const float* q = row.q + k * G * D;                  // [G, D]
  alignas(64) float scores[G][S];
  // Chunks of KC tiles: scores[g][chunk] stay in registers over the head dim.
  for (int c = tile_lo / KC * KC; c < tile_hi; c += KC) {
    vec acc[G][KC];
    UNROLL for (int g = 0; g < G; ++g)
      UNROLL for (int i = 0; i < KC; ++i) acc[g][i] = vec{};
    for (int d = 0; d < D; ++d) {
      const T* key_row = keys + d * S + c * W;
      if (prefetch)
        for (int f = 0; f < KC * W; f += kLine)
          __builtin_prefetch(next_keys + int64_t{k} * D * S + d * S + c * W + f);
      vec query[G];
      UNROLL for (int g = 0; g < G; ++g) query[g] = splat(q[g * D + d]);
      UNROLL for (int i = 0; i < KC; ++i) {
        const vec key = load_kv(key_row + i * W);
        UNROLL for (int g = 0; g < G; ++g) acc[g][i] += query[g] * key;
      }
    }
    UNROLL for (int g = 0; g < G; ++g)
      UNROLL for (int i = 0; i < KC; ++i) store(&scores[g][(c + i) * W], acc[g][i]);
  }

  alignas(64) float weights[G][S];
  float rescale[G];
  bool any_visible[G];
  for (int g = 0; g < G; ++g) {
    const int h = k * G + g;
    float page_max = kNegInf;
    for (int i = tile_lo; i < tile_hi; ++i) {
      const ivec key = lane_index() + i * W;
      vec s = load(&scores[g][i * W]);
      s = soft_cap > 0.f ? soft_cap_vec(s, soft_cap) : s;
      s = (key >= lo && key < hi) ? s : splat(kNegInf);
      store(&scores[g][i * W], s);
      page_max = std::max(page_max, reduce_max(s));
    }
    const float old_max = row.max[h];
    const float new_max = std::max(old_max, page_max);
    any_visible[g] = new_max > kNegInf;
    if (!any_visible[g]) continue;
    rescale[g] = exp_vec(splat(old_max - new_max))[0];
    vec sum{};
    for (int i = tile_lo; i < tile_hi; ++i) {
      const ivec key = lane_index() + i * W;
      vec e = exp_vec(load(&scores[g][i * W]) - splat(new_max));
      e = (key >= lo && key < hi) ? e : vec{};
      store(&weights[g][i * W], e);
      sum += e;
    }
    row.total[h] = row.total[h] * rescale[g] + reduce_sum(sum);
    row.max[h] = new_max;
  }

  float* out = row.out + k * G * D;  // [G, D]
  // Chunks of VC tiles of the head dim: out[g][chunk] stays in registers over the
  // page's keys.
  for (int c = 0; c < DT; c += VC) {
    vec acc[G][VC];
    UNROLL for (int g = 0; g < G; ++g)
      UNROLL for (int i = 0; i < VC; ++i)
        acc[g][i] = any_visible[g] ? load(out + g * D + (c + i) * W) * rescale[g]
                                   : vec{};
    for (int t = lo; t < hi; ++t) {
      const T* value = page_values + (int64_t{t} * K + k) * D + c * W;
      if (prefetch)
        for (int f = 0; f < VC * W; f += kLine)
          __builtin_prefetch(next_values + (int64_t{t} * K + k) * D + c * W + f);
      vec weight[G];
      UNROLL for (int g = 0; g < G; ++g)
        weight[g] = splat(any_visible[g] ? weights[g][t] : 0.f);
      UNROLL for (int i = 0; i < VC; ++i) {
        const vec v = load_kv(value + i * W);
        UNROLL for (int g = 0; g < G; ++g) acc[g][i] += weight[g] * v;
      }
    }
    UNROLL for (int g = 0; g < G; ++g)
      UNROLL for (int i = 0; i < VC; ++i) store(out + g * D + (c + i) * W, acc[g][i]);
  }
}

// The first key a row sees: all of them, or the window's.
inline int32_t first_visible_key(int32_t position, int32_t window) {
  return window > 0 ? std::max(0, position - window + 1) : 0;
}

// Rows [0, n) that see the same keys (one sequence's chunk: same pages, length and
// window start), page by page: each page's bytes are read from memory once and reused
// from cache by the other rows, instead of streamed again per row. Each row's arithmetic
// is exactly a lone row's. False when the table names a page outside the pool.
template <typename T>
bool attend_rows(const Pools<T>& pools, const Row* rows, int n, int max_pages,
                 int32_t window, float soft_cap) {
  const int K = pools.num_kv_heads;
  for (int r = 0; r < n; ++r) {
    for (int h = 0; h < K * G; ++h) { rows[r].max[h] = kNegInf; rows[r].total[h] = 0.f; }
    std::memset(rows[r].out, 0, sizeof(float) * K * G * D);
  }
  const Row& lead = rows[0];
  const int32_t first_key = first_visible_key(lead.position, window);
  if (lead.len <= first_key) return true;
  const int first_page = first_key / S;
  const int end_page = std::min((lead.len + S - 1) / S, max_pages);
  for (int j = first_page; j < end_page; ++j) {
    const int32_t page = lead.table[j];
    if (page < 0 || page >= pools.num_pages) return false;
    const int lo = std::max(0, first_key - j * S);  // visible keys of this page: [lo, hi)
    const int hi = std::min(S, lead.len - j * S);
    const T* page_keys = pools.keys + page * int64_t{K} * D * S;
    const T* page_values = pools.values + page * int64_t{S} * K * D;
    const int32_t next = j + 1 < end_page ? lead.table[j + 1] : page;
    const bool prefetch = next != page && next >= 0 && next < pools.num_pages;
    for (int k = 0; k < K; ++k)
      for (int r = 0; r < n; ++r) {
        // Only the first row asks for the next page: the others find it cached.
        const bool ask = prefetch && r == 0;
        attend_page_head(rows[r], K, k, page_keys, page_values, lo, hi,
                         ask ? pools.keys + next * int64_t{K} * D * S : nullptr,
                         ask ? pools.values + next * int64_t{S} * K * D : nullptr,
                         soft_cap);
      }
  }
  return true;
}

}  // namespace

// The handlers' body for pools of T (float32 or bfloat16 bits).
template <typename T, typename PoolBuffer>
static ffi::Error Attend(ffi::ThreadPool& thread_pool,
                         ffi::Buffer<ffi::F32>& q,        // [R, K, G, D]
                         PoolBuffer& key_cache,           // [L, P, K, D, S]
                         PoolBuffer& value_cache,         // [L, P, S, K, D]
                         ffi::Buffer<ffi::S32>& layer,    // []
                         ffi::Buffer<ffi::S32>& tables,   // [R, M]
                         ffi::Buffer<ffi::S32>& lens,     // [R]
                         ffi::Buffer<ffi::S32>& positions,  // [R]
                         int32_t window, float soft_cap,
                         ffi::ResultBuffer<ffi::F32>& max_out,    // [R, K, G]
                         ffi::ResultBuffer<ffi::F32>& total_out,  // [R, K, G]
                         ffi::ResultBuffer<ffi::F32>& out) {      // [R, K, G, D]
  const auto qd = q.dimensions();
  const auto kd = key_cache.dimensions();
  const auto vd = value_cache.dimensions();
  const auto td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || td.size() != 2)
    return ffi::Error::InvalidArgument("decode attention: wrong operand ranks");
  const int64_t R = qd[0], K = qd[1];
  if (qd[2] != G || qd[3] != D || kd[2] != K || kd[3] != D || kd[4] != S ||
      vd[2] != S || vd[3] != K || vd[4] != D || kd[0] != vd[0] || kd[1] != vd[1] ||
      td[0] != R || static_cast<int64_t>(lens.element_count()) != R ||
      static_cast<int64_t>(positions.element_count()) != R)
    return ffi::Error::InvalidArgument(
        "decode attention: operand shapes do not match the kernel's build "
        "(GROUP=" + std::to_string(G) + ", HEAD_DIM=" + std::to_string(D) +
        ", PAGE_SIZE=" + std::to_string(S) + ")");
  const int64_t num_layers = kd[0], num_pages = kd[1];
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= num_layers)
    return ffi::Error::InvalidArgument("decode attention: layer index out of range");
  const int64_t layer_elements = num_pages * K * D * S;
  const Pools<T> pools{static_cast<const T*>(key_cache.untyped_data()) + l * layer_elements,
                       static_cast<const T*>(value_cache.untyped_data()) + l * layer_elements,
                       num_pages, static_cast<int>(K)};
  const int max_pages = static_cast<int>(td[1]);
  const int32_t* len_data = lens.typed_data();

  // Rows longest first, so that the last ones claimed are the short ones; then runs of
  // rows that see the same keys (a chunk's tokens: the stable sort keeps them adjacent)
  // become one item, at most kMaxGroupRows rows each.
  const int32_t* table_data = tables.typed_data();
  const int32_t* position_data = positions.typed_data();
  auto order = std::make_shared<std::vector<int>>(R);
  std::iota(order->begin(), order->end(), 0);
  std::stable_sort(order->begin(), order->end(),
                   [&](int a, int b) { return len_data[a] > len_data[b]; });
  auto same_keys = [&](int a, int b) {
    if (len_data[a] != len_data[b] ||
        first_visible_key(position_data[a], window) !=
            first_visible_key(position_data[b], window))
      return false;
    const int pages = std::min<int64_t>((len_data[a] + S - 1) / S, max_pages);
    return pages <= 0 || std::memcmp(table_data + int64_t{a} * max_pages,
                                     table_data + int64_t{b} * max_pages,
                                     sizeof(int32_t) * pages) == 0;
  };
  auto group_start = std::make_shared<std::vector<int>>();
  for (int i = 0; i < R; ++i)
    if (group_start->empty() || i - group_start->back() >= kMaxGroupRows ||
        !same_keys((*order)[group_start->back()], (*order)[i]))
      group_start->push_back(i);
  const int num_groups = static_cast<int>(group_start->size());
  group_start->push_back(static_cast<int>(R));
  auto bad_page = std::make_shared<std::atomic<bool>>(false);
  const float* q_data = q.typed_data();
  float* max_data = max_out->typed_data();
  float* total_data = total_out->typed_data();
  float* out_data = out->typed_data();
  const int64_t heads = K * G;
  int64_t context_tokens = 0;
  for (int64_t r = 0; r < R; ++r) context_tokens += len_data[r];
  pagedjax::run_items(thread_pool, num_groups, context_tokens * heads * D, [=](int64_t i) {
    Row rows[kMaxGroupRows];
    const int begin = (*group_start)[i], n = (*group_start)[i + 1] - begin;
    for (int m = 0; m < n; ++m) {
      const int r = (*order)[begin + m];
      rows[m] = Row{q_data + r * heads * D, table_data + r * max_pages, len_data[r],
                    position_data[r], max_data + r * heads, total_data + r * heads,
                    out_data + r * heads * D};
    }
    if (!attend_rows(pools, rows, n, max_pages, window, soft_cap)) *bad_page = true;
  });
  if (*bad_page)
    return ffi::Error::InvalidArgument("decode attention: a block table names a page "
                                       "outside the KV pool");
  return ffi::Error::Success();
}

// Pools of float32, and of bfloat16 (a bfloat16 engine's pool, read widened).
template <ffi::DataType P>
static ffi::Error DecodeAttention(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q,
                                  ffi::Buffer<P> key_cache, ffi::Buffer<P> value_cache,
                                  ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> tables,
                                  ffi::Buffer<ffi::S32> lens, ffi::Buffer<ffi::S32> positions,
                                  int32_t window, float soft_cap,
                                  ffi::ResultBuffer<ffi::F32> max_out,
                                  ffi::ResultBuffer<ffi::F32> total_out,
                                  ffi::ResultBuffer<ffi::F32> out) {
  using T = std::conditional_t<P == ffi::DataType::F32, float, Bf16Bits>;
  return Attend<T>(thread_pool, q, key_cache, value_cache, layer, tables, lens, positions,
                   window, soft_cap, max_out, total_out, out);
}

#define PAGEDJAX_BIND_DECODE_ATTENTION(POOL)       \
  ffi::Ffi::Bind()                                 \
      .Ctx<ffi::ThreadPool>()                      \
      .Arg<ffi::Buffer<ffi::F32>>()                \
      .Arg<ffi::Buffer<POOL>>()                    \
      .Arg<ffi::Buffer<POOL>>()                    \
      .Arg<ffi::Buffer<ffi::S32>>()                \
      .Arg<ffi::Buffer<ffi::S32>>()                \
      .Arg<ffi::Buffer<ffi::S32>>()                \
      .Arg<ffi::Buffer<ffi::S32>>()                \
      .Attr<int32_t>("window")                     \
      .Attr<float>("soft_cap")                     \
      .Ret<ffi::Buffer<ffi::F32>>()                \
      .Ret<ffi::Buffer<ffi::F32>>()                \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxDecodeAttention, DecodeAttention<ffi::F32>,
                              PAGEDJAX_BIND_DECODE_ATTENTION(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxDecodeAttentionBF16, DecodeAttention<ffi::BF16>,
                              PAGEDJAX_BIND_DECODE_ATTENTION(ffi::BF16));
