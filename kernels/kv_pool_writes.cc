// Writes into a bfloat16 KV pool in place, for XLA on CPU (XLA FFI custom calls;
// kernels/kv_write.py and pagedjax/kv_copy.py call them, their outputs aliased to the
// pools they take).
//
// Why C++: XLA CPU has no 16-bit float scatter. A step's KV write into a bfloat16 pool
// became a conversion of the whole pool to float32 and back (seconds a step), and
// scattering the pool's bits as uint16 made XLA copy the pool for the bitcasts. These
// handlers move 2-byte elements where they lie: a step's K/V into their slots, and whole
// pages for copy-on-write.
//
// Pool layouts are the engine's: keys [L, P, K, D, S] (transposed within a page), values
// [L, P, S, K, D]. The element type is opaque here (bfloat16 bits are copied, never
// rounded: the step's K/V arrive in the pool's dtype).

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef uint16_t Element;  // a bfloat16's bits

struct PoolShape {
  int64_t layers, pages, heads, dim, page_size;
  int64_t page_elements() const { return heads * dim * page_size; }
};

// The pools' shape, or an error message when keys and values do not describe one pool.
const char* pool_shape(ffi::Buffer<ffi::BF16>& keys, ffi::Buffer<ffi::BF16>& values,
                       PoolShape* shape) {
  const auto kd = keys.dimensions();
  const auto vd = values.dimensions();
  if (kd.size() != 5 || vd.size() != 5)
    return "the pools must be keys [L, P, K, D, S] and values [L, P, S, K, D]";
  *shape = PoolShape{kd[0], kd[1], kd[2], kd[3], kd[4]};
  if (vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[4] || vd[3] != kd[2] ||
      vd[4] != kd[3])
    return "the keys and values pools do not have the same [L, P, K, D, S]";
  return nullptr;
}

}  // namespace

// Token t's keys [K, D] and values [K, D] into slot slots[t] (page * S + offset) of
// layer `layer`. The outputs are the pools (aliased), written in place.
static ffi::Error KvWrite(ffi::Buffer<ffi::BF16> keys,            // [L, P, K, D, S]
                          ffi::Buffer<ffi::BF16> values,          // [L, P, S, K, D]
                          ffi::Buffer<ffi::S32> layer,            // []
                          ffi::Buffer<ffi::BF16> k,               // [T, K, D]
                          ffi::Buffer<ffi::BF16> v,               // [T, K, D]
                          ffi::Buffer<ffi::S32> slots,            // [T]
                          ffi::ResultBuffer<ffi::BF16> keys_out,
                          ffi::ResultBuffer<ffi::BF16> values_out) {
  PoolShape p;
  if (const char* error = pool_shape(keys, values, &p))
    return ffi::Error::InvalidArgument(std::string("kv write: ") + error);
  const auto td = k.dimensions();
  const int64_t T = slots.element_count();
  if (td.size() != 3 || td[0] != T || td[1] != p.heads || td[2] != p.dim ||
      v.dimensions().size() != 3 || v.element_count() != k.element_count())
    return ffi::Error::InvalidArgument("kv write: k and v must be [T, K, D], slots [T]");
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= p.layers)
    return ffi::Error::InvalidArgument("kv write: layer index out of range");
  const int32_t* slot = slots.typed_data();
  for (int64_t t = 0; t < T; ++t)
    if (slot[t] < 0 || slot[t] >= p.pages * p.page_size)
      return ffi::Error::InvalidArgument("kv write: a slot is outside the KV pool");
  Element* key_pool = static_cast<Element*>(keys_out->untyped_data());
  Element* value_pool = static_cast<Element*>(values_out->untyped_data());
  const Element* k_data = static_cast<const Element*>(k.untyped_data());
  const Element* v_data = static_cast<const Element*>(v.untyped_data());
  const int64_t row = p.heads * p.dim;  // one token's [K, D]
  for (int64_t t = 0; t < T; ++t) {
    const int64_t page = slot[t] / p.page_size, offset = slot[t] % p.page_size;
    const int64_t first = (l * p.pages + page) * p.page_elements();
    // Keys are stored transposed within a page: a token's [K, D] is strided by S.
    Element* key_page = key_pool + first + offset;
    for (int64_t i = 0; i < row; ++i) key_page[i * p.page_size] = k_data[t * row + i];
    std::memcpy(value_pool + first + offset * row, v_data + t * row, row * sizeof(Element));
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxKvWrite, KvWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

// Page dst[i] := page src[i] in every layer, keys and values; every source is read before
// any page is written (a page may be a source and a destination at once).
static ffi::Error KvCopyPages(ffi::Buffer<ffi::BF16> keys,    // [L, P, K, D, S]
                              ffi::Buffer<ffi::BF16> values,  // [L, P, S, K, D]
                              ffi::Buffer<ffi::S32> src,      // [N]
                              ffi::Buffer<ffi::S32> dst,      // [N]
                              ffi::ResultBuffer<ffi::BF16> keys_out,
                              ffi::ResultBuffer<ffi::BF16> values_out) {
  PoolShape p;
  if (const char* error = pool_shape(keys, values, &p))
    return ffi::Error::InvalidArgument(std::string("kv page copy: ") + error);
  const int64_t n = src.element_count();
  if (dst.element_count() != n)
    return ffi::Error::InvalidArgument("kv page copy: src and dst differ in length");
  const int32_t* from = src.typed_data();
  const int32_t* to = dst.typed_data();
  for (int64_t i = 0; i < n; ++i)
    if (from[i] < 0 || from[i] >= p.pages || to[i] < 0 || to[i] >= p.pages)
      return ffi::Error::InvalidArgument("kv page copy: a page is outside the KV pool");
  const int64_t size = p.page_elements();
  std::vector<Element> staged(n * size);
  for (Element* pool : {static_cast<Element*>(keys_out->untyped_data()),
                        static_cast<Element*>(values_out->untyped_data())})
    for (int64_t l = 0; l < p.layers; ++l) {
      Element* layer_pool = pool + l * p.pages * size;
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(staged.data() + i * size, layer_pool + from[i] * size,
                    size * sizeof(Element));
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(layer_pool + to[i] * size, staged.data() + i * size,
                    size * sizeof(Element));
    }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxKvCopyPages, KvCopyPages,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
