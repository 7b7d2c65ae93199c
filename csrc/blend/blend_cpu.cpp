// CPU blend (algorithm: blend.h): OpenMP over fixed chunks of each tensor; the mask choice is
// hoisted out of the element loop so that it vectorises.
#include <algorithm>
#include <utility>
#include <vector>

#include "meldkit/blend.h"
#include "meldkit/macros.h"
#include "meldkit/random.h"
#include "meldkit/status.h"

namespace meldkit {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per work item; never crosses a multiple of 2^32

template <typename T, bool kDraw1, bool kDraw2>
MELDKIT_CPU_CLONES void blend_range(const BlendParams& p, int i, int64_t begin, int64_t end) {
  T* out = static_cast<T*>(p.outs[i]);
  const T* base = static_cast<const T*>(p.bases[i]);
  const T* tau = static_cast<const T*>(p.taus[i]);
  if (p.dense[i]) {
    const float g = p.g_dense;
    for (int64_t e = begin; e < end; ++e) {
      const float prod = widen(tau[e]) * g;
      out[e] = Store<T>::from(widen(base[e]) + prod);
    }
    return;
  }
  const uint32_t k1 = p.keys1[i], k2 = p.keys2[i];
  const uint32_t high = uniform01_high(uint64_t(begin));
  const float keep1 = p.keep1, keep2 = p.keep2;
  const float t0 = p.g_table[0], t1 = p.g_table[1], t2 = p.g_table[2], t3 = p.g_table[3];
  for (int64_t e = begin; e < end; ++e) {  // selects, not an indexed table: vectorises
    const bool m1 = kDraw1 && uniform01_from_high(k1, high, uint64_t(e)) < keep1;
    const bool m2 = kDraw2 && uniform01_from_high(k2, high, uint64_t(e)) < keep2;
    const float g = m1 ? (m2 ? t3 : t1) : (m2 ? t2 : t0);
    const float prod = widen(tau[e]) * g;
    out[e] = Store<T>::from(widen(base[e]) + prod);
  }
}

template <typename T>
void blend_typed(const BlendParams& p) {
  // Work items: (tensor, chunk) pairs, so that many small tensors and one large one both spread.
  std::vector<std::pair<int, int64_t>> items;
  for (int i = 0; i < p.num_tensors; ++i) {
    for (int64_t c = 0; c < p.numels[i]; c += kChunk) items.emplace_back(i, c);
  }
  const int64_t n_items = int64_t(items.size());
#pragma omp parallel for schedule(static) if (n_items > 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const int i = items[size_t(w)].first;
    const int64_t begin = items[size_t(w)].second;
    const int64_t end = std::min(p.numels[i], begin + kChunk);
    if (p.draw1 && p.draw2) {
      blend_range<T, true, true>(p, i, begin, end);
    } else if (p.draw1) {
      blend_range<T, true, false>(p, i, begin, end);
    } else if (p.draw2) {
      blend_range<T, false, true>(p, i, begin, end);
    } else {
      blend_range<T, false, false>(p, i, begin, end);
    }
  }
}

}  // namespace

void blend_cpu(const BlendParams& p) {
  MELDKIT_DISPATCH_FLOAT(p.dtype, "blend", "bases", T, { blend_typed<T>(p); });
}

}  // namespace meldkit
