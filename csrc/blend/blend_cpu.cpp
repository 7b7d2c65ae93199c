// CPU blend (algorithm: blend.h): OpenMP over the plan's chunks; the mask choice is hoisted out
// of the element loop so that it vectorises.
#include <algorithm>

#include "meldkit/blend.h"
#include "meldkit/macros.h"
#include "meldkit/random.h"
#include "meldkit/status.h"

namespace meldkit {
namespace {

template <typename T, bool kDraw1, bool kDraw2>
MELDKIT_CPU_CLONES_AVX512 void blend_range(const BlendParams& p, const BlendRow& r, int64_t begin,
                                           int64_t end) {
  T* out = reinterpret_cast<T*>(r.out);
  const T* base = reinterpret_cast<const T*>(r.base);
  const T* tau = reinterpret_cast<const T*>(r.tau);
  if (r.dense) {
    const float g = p.g_dense;
    for (int64_t e = begin; e < end; ++e) {
      const float prod = widen(tau[e]) * g;
      out[e] = Store<T>::from(widen(base[e]) + prod);
    }
    return;
  }
  const uint32_t k1 = stream_key(p.seed, uint32_t(r.stream1));
  const uint32_t k2 = stream_key(p.seed, uint32_t(r.stream2));
  const uint32_t high = uniform01_high(uint64_t(begin));
  const int32_t thr1 = uniform01_threshold(p.keep1), thr2 = uniform01_threshold(p.keep2);
  const float t0 = p.g_table[0], t1 = p.g_table[1], t2 = p.g_table[2], t3 = p.g_table[3];
  // A chunk never crosses a multiple of 2^32, so the element index's low word is a 32-bit
  // counter from the chunk's first element (32-bit lanes vectorise; 64-bit ones need shuffles).
  const uint32_t lo = uint32_t(uint64_t(begin));
  const int n = int(end - begin);
  const T* tb = tau + begin;
  const T* bb = base + begin;
  T* ob = out + begin;
  for (int i = 0; i < n; ++i) {  // selects, not an indexed table: vectorises
    const uint32_t inner = uniform01_inner(high, lo + uint32_t(i));  // shared by both masks
    const bool m1 = kDraw1 && uniform01_below(k1, inner, thr1);
    const bool m2 = kDraw2 && uniform01_below(k2, inner, thr2);
    const float g = m1 ? (m2 ? t3 : t1) : (m2 ? t2 : t0);
    const float prod = widen(tb[i]) * g;
    ob[i] = Store<T>::from(widen(bb[i]) + prod);
  }
}

template <typename T>
void blend_typed(const BlendParams& p) {
  // Work items are the plan's chunks, so that many small tensors and one large one both spread.
  const int64_t n_chunks = p.num_chunks;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const BlendRow& r = p.rows[blend_find_row(p.rows, p.num_tensors, c)];
    const int64_t begin = (c - r.first_chunk) * kBlendChunk;
    const int64_t end = std::min(r.numel, begin + kBlendChunk);
    if (p.draw1 && p.draw2) {
      blend_range<T, true, true>(p, r, begin, end);
    } else if (p.draw1) {
      blend_range<T, true, false>(p, r, begin, end);
    } else if (p.draw2) {
      blend_range<T, false, true>(p, r, begin, end);
    } else {
      blend_range<T, false, false>(p, r, begin, end);
    }
  }
}

}  // namespace

void blend_cpu(const BlendParams& p) {
  MELDKIT_DISPATCH_FLOAT(p.dtype, "blend", "bases", T, { blend_typed<T>(p); });
}

}  // namespace meldkit
