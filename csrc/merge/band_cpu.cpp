// Model Breadcrumbs' band selection on the CPU (algorithm: merge.h, "band selection"). Two passes
// over fixed blocks, OpenMP over blocks in both: the first writes every element (elements equal
// to a boundary value provisionally as base) and counts, per block, the elements below and at
// each boundary value; prefix sums of the per-block tie counts give every tie element its rank
// in index order; the second pass revisits only the blocks holding tie elements whose ranks are
// kept, and writes theta there. bf16 task vectors have tie groups of millions at a boundary.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "meldkit/macros.h"
#include "meldkit/merge.h"
#include "meldkit/status.h"

namespace meldkit {
namespace {

constexpr int64_t kBandBlock = int64_t(1) << 15;  // fits the per-block uint32 counters

// a ? x : y on the storage bits: GCC vectorises a select of integers, not of the 16-bit structs.
MELDKIT_ALWAYS_INLINE float pick(bool a, float x, float y) { return a ? x : y; }
MELDKIT_ALWAYS_INLINE bf16_t pick(bool a, bf16_t x, bf16_t y) {
  return bf16_t{uint16_t(a ? x.bits : y.bits)};
}
MELDKIT_ALWAYS_INLINE f16_t pick(bool a, f16_t x, f16_t y) {
  return f16_t{uint16_t(a ? x.bits : y.bits)};
}

struct BlockCounts {
  uint64_t below_lo = 0, below_hi = 0;  // elements with |tau| < lo, < hi
  uint64_t at_lo = 0, at_hi = 0;        // elements equal to lo, to hi (nonzero, hi != lo)
};

template <typename T>
MELDKIT_CPU_CLONES BlockCounts band_block(const BandSelectParams& p, bool same, int64_t e0,
                                          int64_t e1) {
  const T* theta = static_cast<const T*>(p.theta);
  const T* base = static_cast<const T*>(p.base);
  T* out = static_cast<T*>(p.out);
  // Without a lower cut every magnitude (>= 0) is above -1; without an upper cut none is tested.
  const float lo = p.has_lo ? p.lo : -1.f;
  const float hi = p.hi;
  const bool cut_hi = p.has_hi;
  // Ties at a zero boundary need no ranking (theta equals base there); at hi == lo they are
  // counted once, as lo's.
  const float tie_lo = p.has_lo && p.lo != 0.f ? p.lo : -1.f;
  const float tie_hi = cut_hi && !same && p.hi != 0.f ? p.hi : -1.f;
  // Without an upper cut, hi = +inf keeps everything below it; infinite magnitudes (an inf in
  // theta or base) are kept by `a == lim_hi` then, as the flag says.
  const float lim_hi = cut_hi ? hi : INFINITY;
  uint32_t below_lo = 0, below_hi = 0, at_lo = 0, at_hi = 0;
  for (int64_t e = e0; e < e1; ++e) {
    const float a = std::fabs(widen(theta[e]) - widen(base[e]));
    const bool keep = (a > lo && (a < lim_hi || (!cut_hi && a == lim_hi))) || a == 0.f;
    out[e] = pick(keep, theta[e], base[e]);
    below_lo += a < lo ? 1u : 0u;
    below_hi += a < lim_hi ? 1u : 0u;
    at_lo += a == tie_lo ? 1u : 0u;
    at_hi += a == tie_hi ? 1u : 0u;
  }
  return {below_lo, cut_hi ? below_hi : 0u, at_lo, at_hi};
}

// Writes theta at the elements equal to `value` whose rank (first_rank, first_rank + 1, ... in
// index order within [e0, e1)) lies in [from, to).
template <typename T>
void keep_tie_ranks(const BandSelectParams& p, int64_t e0, int64_t e1, float value,
                    int64_t first_rank, int64_t from, int64_t to) {
  const T* theta = static_cast<const T*>(p.theta);
  const T* base = static_cast<const T*>(p.base);
  T* out = static_cast<T*>(p.out);
  int64_t rank = first_rank;
  for (int64_t e = e0; e < e1 && rank < to; ++e) {
    if (std::fabs(widen(theta[e]) - widen(base[e])) != value) continue;
    if (rank >= from) out[e] = theta[e];
    ++rank;
  }
}

// Writes theta at every element equal to `value` in [e0, e1) (a block whose tie ranks all lie in
// the kept window): no rank counting, so it vectorises.
template <typename T>
MELDKIT_CPU_CLONES void keep_all_ties(const BandSelectParams& p, int64_t e0, int64_t e1,
                                      float value) {
  const T* theta = static_cast<const T*>(p.theta);
  const T* base = static_cast<const T*>(p.base);
  T* out = static_cast<T*>(p.out);
  for (int64_t e = e0; e < e1; ++e) {
    const bool tie = std::fabs(widen(theta[e]) - widen(base[e])) == value;
    out[e] = pick(tie, theta[e], out[e]);
  }
}

// The tie elements of one block: all kept, some (counted by rank), or none.
template <typename T>
void keep_ties(const BandSelectParams& p, int64_t e0, int64_t e1, float value, int64_t first_rank,
               int64_t count, int64_t from, int64_t to) {
  if (count == 0 || first_rank + count <= from || first_rank >= to) return;
  if (first_rank >= from && first_rank + count <= to) {
    keep_all_ties<T>(p, e0, e1, value);
  } else {
    keep_tie_ranks<T>(p, e0, e1, value, first_rank, from, to);
  }
}

template <typename T>
void band_select_typed(const BandSelectParams& p) {
  const int64_t num_blocks = (p.numel + kBandBlock - 1) / kBandBlock;
  const bool same = p.has_lo && p.has_hi && p.lo == p.hi;
  std::vector<BlockCounts> counts(size_t(std::max<int64_t>(num_blocks, 0)));
#pragma omp parallel for schedule(static) if (num_blocks > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t e0 = b * kBandBlock, e1 = std::min(p.numel, e0 + kBandBlock);
    counts[size_t(b)] = band_block<T>(p, same, e0, e1);
  }
  // Ranks in index order: each block's first tie rank, and the totals.
  std::vector<int64_t> first_lo(counts.size()), first_hi(counts.size());
  int64_t below_lo = 0, below_hi = 0, at_lo = 0, at_hi = 0;
  for (size_t b = 0; b < counts.size(); ++b) {
    first_lo[b] = at_lo;
    first_hi[b] = at_hi;
    below_lo += int64_t(counts[b].below_lo);
    below_hi += int64_t(counts[b].below_hi);
    at_lo += int64_t(counts[b].at_lo);
    at_hi += int64_t(counts[b].at_hi);
  }
  // The equal elements hold ascending ranks below, below + 1, ...: the kept window of tie
  // ranks. Ties at lo all rank below stop when lo < hi; ties at hi all rank at or after start.
  int64_t lo_from = std::clamp<int64_t>(p.start - below_lo, 0, at_lo);
  int64_t lo_to = same ? std::clamp<int64_t>(p.stop - below_lo, 0, at_lo) : at_lo;
  if (p.lo_ties_first && !p.has_hi) {  // as many ties, the first ones in index order
    lo_to -= lo_from;
    lo_from = 0;
  }
  const int64_t hi_to = std::clamp<int64_t>(p.stop - below_hi, 0, at_hi);
#pragma omp parallel for schedule(dynamic, 4) if (num_blocks > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const BlockCounts& c = counts[size_t(b)];
    const int64_t e0 = b * kBandBlock, e1 = std::min(p.numel, e0 + kBandBlock);
    keep_ties<T>(p, e0, e1, p.lo, first_lo[size_t(b)], int64_t(c.at_lo), lo_from, lo_to);
    keep_ties<T>(p, e0, e1, p.hi, first_hi[size_t(b)], int64_t(c.at_hi), 0, hi_to);
  }
}

}  // namespace

void band_select_cpu(const BandSelectParams& p) {
  MELDKIT_DISPATCH_FLOAT(p.dtype, "band_select", "theta", T, { band_select_typed<T>(p); });
}

}  // namespace meldkit
