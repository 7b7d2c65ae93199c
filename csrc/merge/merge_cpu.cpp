// CPU merge kernels: the fused task merge (OpenMP over chunks, each element in one pass over the
// N models) and magnitude selection (a sampled bracket and one or two counting passes, or
// per-thread radix histograms, merged).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "meldkit/merge.h"
#include "meldkit/status.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace meldkit {
namespace {

constexpr int64_t kChunk = 1 << 14;             // elements per OpenMP work item
constexpr int64_t kParallelMinNumel = 1 << 15;  // below this, threading costs more than it saves

constexpr int64_t kTile = 256;  // elements whose running sums stay in L1 while models stream by

// Model t's contribution to a tile, with the sparsify choice hoisted out of the element loop so
// that each variant vectorises (selects instead of branches). Same arithmetic, in the same model
// order, as merge_add: the result is bit-identical to the scalar definition.
// kCached (random masks): the keep decisions are the L1 pass's mask bits (`flag` of bits[j])
// instead of fresh draws.
template <typename TIn, Sparsify S, bool kCached = false>
MELDKIT_ALWAYS_INLINE void accumulate_tile(
    const TIn* __restrict x, const float* __restrict b, const uint32_t* __restrict inner, int64_t n,
    float weight, float scale, float threshold, float density, uint32_t key, float* __restrict pos,
    float* __restrict neg, float* __restrict wpos, float* __restrict wneg, float* __restrict npos,
    float* __restrict nneg, const uint32_t* __restrict bits = nullptr, uint32_t flag = 0) {
  for (int64_t j = 0; j < n; ++j) {
    const float tau = widen(x[j]) - b[j];
    bool keep = true;
    if constexpr (S == Sparsify::kMagnitude) keep = fabsf(tau) >= threshold;
    // inner[j]: the element's stream-independent hash, computed once for all models.
    if constexpr (S == Sparsify::kRandom && !kCached) {
      keep = uniform01_from_inner(key, inner[j]) < density;
    }
    float w;
    if constexpr (S == Sparsify::kRandom && kCached) {
      // The product or +0 by a bit mask: with the decision in memory GCC would branch on it.
      const uint32_t mask = 0u - uint32_t((bits[j] & flag) != 0u);
      w = bits_as_float(float_as_bits(weight * (scale * tau)) & mask);
    } else {
      w = keep ? weight * (scale * tau) : 0.f;
    }
    const bool p = w > 0.f, q = w < 0.f;
    pos[j] += p ? w : 0.f;
    neg[j] += q ? w : 0.f;
    wpos[j] += p ? weight : 0.f;
    wneg[j] += q ? weight : 0.f;
    npos[j] += p ? 1.f : 0.f;
    nneg[j] += q ? 1.f : 0.f;
  }
}

// The tile's results: merge_delta and merge_finish with the consensus and normalize choices
// hoisted out of the loop (selects, no branches), so the loop vectorises. Same arithmetic.
template <Consensus C, bool kNormalize>
MELDKIT_ALWAYS_INLINE void finish_tile_as(const float* __restrict b, const float* __restrict pos,
                                          const float* __restrict neg, const float* __restrict wpos,
                                          const float* __restrict wneg,
                                          const float* __restrict npos,
                                          const float* __restrict nneg, float wall, float lambda,
                                          int64_t n, float* __restrict out) {
  for (int64_t j = 0; j < n; ++j) {
    float delta, divisor;
    if constexpr (C == Consensus::kNone) {
      delta = pos[j] + neg[j];
      divisor = wall;
    } else {
      const bool positive =
          C == Consensus::kSum ? (pos[j] + neg[j]) >= 0.f : (npos[j] - nneg[j]) >= 0.f;
      delta = positive ? pos[j] : neg[j];
      divisor = positive ? wpos[j] : wneg[j];
    }
    if constexpr (kNormalize) delta = delta / (divisor == 0.f ? 1.f : divisor);
    out[j] = merge_finish(b[j], lambda, delta);
  }
}

template <typename TOut>
MELDKIT_ALWAYS_INLINE void finish_tile(const TaskMergeParams& p, const float* b, const float* pos,
                                       const float* neg, const float* wpos, const float* wneg,
                                       const float* npos, const float* nneg, float wall, int64_t n,
                                       TOut* out) {
  // In float first, then rounded to TOut in a loop of its own: fused into one loop, GCC did not
  // vectorise the conversion to bf16/fp16 (measured 5x slower for a bf16 output).
  float res[kTile];
#define MELDKIT_FINISH(C, NORM) \
  finish_tile_as<C, NORM>(b, pos, neg, wpos, wneg, npos, nneg, wall, p.lambda, n, res)
  switch (p.consensus) {
    case Consensus::kSum:
      if (p.normalize)
        MELDKIT_FINISH(Consensus::kSum, true);
      else
        MELDKIT_FINISH(Consensus::kSum, false);
      break;
    case Consensus::kCount:
      if (p.normalize)
        MELDKIT_FINISH(Consensus::kCount, true);
      else
        MELDKIT_FINISH(Consensus::kCount, false);
      break;
    default:
      if (p.normalize)
        MELDKIT_FINISH(Consensus::kNone, true);
      else
        MELDKIT_FINISH(Consensus::kNone, false);
  }
#undef MELDKIT_FINISH
  for (int64_t j = 0; j < n; ++j) out[j] = Store<TOut>::from(res[j]);
}

template <typename TIn, typename TOut>
MELDKIT_CPU_CLONES void task_merge_range(const TaskMergeParams& p, const uint32_t* keys,
                                         int64_t begin, int64_t end) {
  const auto* base = static_cast<const TIn*>(p.base);
  auto* out = static_cast<TOut*>(p.out);
  float b[kTile], pos[kTile], neg[kTile], wpos[kTile], wneg[kTile], npos[kTile], nneg[kTile];
  uint32_t inner[kTile], bits[kTile];
  for (int64_t e0 = begin; e0 < end; e0 += kTile) {
    const int64_t n = std::min(kTile, end - e0);
    float wall = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      b[j] = widen(base[e0 + j]);
      pos[j] = neg[j] = wpos[j] = wneg[j] = npos[j] = nneg[j] = 0.f;
    }
    const bool cached = p.sparsify == Sparsify::kRandom && p.mask_bits != nullptr;
    if (cached) {  // widened once per tile: the model loops then test 32-bit lanes
      const uint8_t* __restrict mb = p.mask_bits + e0;
      for (int64_t j = 0; j < n; ++j) bits[j] = mb[j];
    } else if (p.sparsify == Sparsify::kRandom) {
      // e0 is a multiple of the tile size, so a tile never crosses a multiple of 2^32.
      const uint32_t high = uniform01_high(uint64_t(e0));
      for (int64_t j = 0; j < n; ++j) inner[j] = uniform01_inner(high, uint64_t(e0 + j));
    }
    for (int t = 0; t < p.num_models; ++t) {
      const TIn* x = static_cast<const TIn*>(p.models[t]) + e0;
      const float w = p.weights[t], sc = p.scales[t];
      const float thr = p.thresholds ? p.thresholds[t] : 0.f;
      const float d = p.densities ? p.densities[t] : 1.f;
      wall += w;
      switch (p.sparsify) {
        case Sparsify::kMagnitude:
          accumulate_tile<TIn, Sparsify::kMagnitude>(x, b, inner, n, w, sc, thr, d, keys[t], pos,
                                                     neg, wpos, wneg, npos, nneg);
          break;
        case Sparsify::kRandom:
          if (cached) {
            accumulate_tile<TIn, Sparsify::kRandom, true>(x, b, inner, n, w, sc, thr, d, keys[t],
                                                          pos, neg, wpos, wneg, npos, nneg, bits,
                                                          1u << t);
          } else {
            accumulate_tile<TIn, Sparsify::kRandom>(x, b, inner, n, w, sc, thr, d, keys[t], pos,
                                                    neg, wpos, wneg, npos, nneg);
          }
          break;
        default:
          accumulate_tile<TIn, Sparsify::kNone>(x, b, inner, n, w, sc, thr, d, keys[t], pos, neg,
                                                wpos, wneg, npos, nneg);
      }
    }
    // `out` may be `base`: every read of this tile is done.
    finish_tile<TOut>(p, b, pos, neg, wpos, wneg, npos, nneg, wall, n, out + e0);
  }
}

template <typename TIn, typename TOut>
void task_merge_typed(const TaskMergeParams& p) {
  uint32_t keys[kMergeMaxModels] = {};
  for (int t = 0; t < p.num_models; ++t) {
    keys[t] = p.streams ? stream_key(p.seed, p.streams[t]) : 0u;
  }
  const int64_t num_chunks = (p.numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinNumel)
  for (int64_t c = 0; c < num_chunks; ++c) {
    task_merge_range<TIn, TOut>(p, keys, c * kChunk, std::min(p.numel, (c + 1) * kChunk));
  }
}

// Sums in kLanes interleaved double accumulators (a fixed order, so the result does not depend
// on the thread count), which lets the loop vectorise: one running sum would serialise on it.
constexpr int kLanes = 8;

// One model's |tau| sums over [begin, end), all and kept (magnitude masks, or none); random masks
// go through l1_random_models, which shares the hashing across models.
template <typename T, Sparsify S>
MELDKIT_ALWAYS_INLINE void l1_model(const T* x, const T* base, int64_t begin, int64_t end,
                                    float threshold, double* all_out, double* kept_out) {
  static_assert(S != Sparsify::kRandom, "random masks: l1_random_models");
  double all[kLanes] = {}, kept[kLanes] = {};
  auto visit = [&](int64_t e, int lane) {
    const float tau = widen(x[e]) - widen(base[e]);
    bool keep = true;
    if constexpr (S == Sparsify::kMagnitude) keep = fabsf(tau) >= threshold;
    all[lane] += fabsf(tau);
    kept[lane] += keep ? fabsf(tau) : 0.f;
  };
  int64_t e = begin;
  for (; e + kLanes <= end; e += kLanes) {
    for (int k = 0; k < kLanes; ++k) visit(e + k, k);
  }
  for (int k = 0; e < end; ++e, ++k) visit(e, k);
  for (int k = 0; k < kLanes; ++k) {
    *all_out += all[k];
    *kept_out += kept[k];
  }
}

// l1_model for random masks over all models at once, tile by tile: each element's
// stream-independent hash is computed once for every model. Lane (e - begin) % kLanes and the
// order of the sums are l1_model's, so the norms are bit-identical.
template <typename T>
MELDKIT_ALWAYS_INLINE void l1_random_models(const TaskMergeParams& p, const uint32_t* keys,
                                            const T* base, int64_t begin, int64_t end,
                                            double* sums) {
  double all[kMergeMaxModels][kLanes] = {}, kept[kMergeMaxModels][kLanes] = {};
  uint32_t inner[kTile], bits[kTile], keep32[kTile];
  uint8_t* __restrict mask_bits = p.mask_bits;
  for (int64_t e0 = begin; e0 < end; e0 += kTile) {  // kTile is a multiple of kLanes
    const int64_t n = std::min(kTile, end - e0);
    const uint32_t high = uniform01_high(uint64_t(e0));
    for (int64_t j = 0; j < n; ++j) {
      inner[j] = uniform01_inner(high, uint64_t(e0 + j));
      bits[j] = 0u;
    }
    for (int t = 0; t < p.num_models; ++t) {
      const T* x = static_cast<const T*>(p.models[t]) + e0;
      const T* b = base + e0;
      const float d = p.densities ? p.densities[t] : 1.f;
      const uint32_t key = keys[t];
      double* at = all[t];
      double* kt = kept[t];
      // The draws in a loop of their own (32-bit lanes: it vectorises), kept for the sums below
      // and, as bit t, for the merge pass.
      for (int64_t j = 0; j < n; ++j) {
        keep32[j] = uniform01_from_inner(key, inner[j]) < d ? 1u : 0u;
        bits[j] |= keep32[j] << t;
      }
      auto visit = [&](int64_t j, int lane) {
        const float a = fabsf(widen(x[j]) - widen(b[j]));
        at[lane] += a;
        // a or +0 by a bit mask: with the draw in memory GCC would branch here, on random bits
        kt[lane] += bits_as_float(float_as_bits(a) & (0u - keep32[j]));
      };
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) visit(j + k, k);
      }
      for (int k = 0; j < n; ++j, ++k) visit(j, k);
    }
    if (mask_bits != nullptr) {
      for (int64_t j = 0; j < n; ++j) mask_bits[e0 + j] = uint8_t(bits[j]);
    }
  }
  for (int t = 0; t < p.num_models; ++t) {
    for (int k = 0; k < kLanes; ++k) {
      sums[2 * t] += all[t][k];
      sums[2 * t + 1] += kept[t][k];
    }
  }
}

template <typename T>
MELDKIT_CPU_CLONES void task_l1_range(const TaskMergeParams& p, const uint32_t* keys, int64_t begin,
                                      int64_t end, double* sums) {
  const auto* base = static_cast<const T*>(p.base);
  if (p.sparsify == Sparsify::kRandom) {
    l1_random_models<T>(p, keys, base, begin, end, sums);
    return;
  }
  for (int t = 0; t < p.num_models; ++t) {
    const T* x = static_cast<const T*>(p.models[t]);
    const float thr = p.thresholds ? p.thresholds[t] : 0.f;
    double* s = sums + 2 * t;
    if (p.sparsify == Sparsify::kMagnitude) {
      l1_model<T, Sparsify::kMagnitude>(x, base, begin, end, thr, s, s + 1);
    } else {
      l1_model<T, Sparsify::kNone>(x, base, begin, end, thr, s, s + 1);
    }
  }
}

template <typename T>
void task_l1_typed(const TaskMergeParams& p, double* norms) {
  uint32_t keys[kMergeMaxModels] = {};
  for (int t = 0; t < p.num_models; ++t) {
    keys[t] = p.streams ? stream_key(p.seed, p.streams[t]) : 0u;
  }
  // Fixed chunks summed in chunk order: the result does not depend on the thread count.
  const int64_t num_chunks = (p.numel + kChunk - 1) / kChunk;
  std::vector<double> chunk_sums(size_t(num_chunks) * 2 * p.num_models, 0.0);
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinNumel)
  for (int64_t c = 0; c < num_chunks; ++c) {
    task_l1_range<T>(p, keys, c * kChunk, std::min(p.numel, (c + 1) * kChunk),
                     chunk_sums.data() + c * 2 * p.num_models);
  }
  std::fill(norms, norms + 2 * p.num_models, 0.0);
  for (int64_t c = 0; c < num_chunks; ++c) {
    for (int i = 0; i < 2 * p.num_models; ++i) norms[i] += chunk_sums[c * 2 * p.num_models + i];
  }
}

// Histogram of one 16-bit digit of |a - b| over every tensor, among the elements whose high
// digit equals `prefix` (pass 2) or all elements (pass 1: prefix < 0). Returns the NaN count.
template <typename T>
uint64_t radix_histogram(const MagnitudeSelectParams& p, int shift, int64_t prefix,
                         std::vector<uint64_t>& hist) {
  std::fill(hist.begin(), hist.end(), 0);
  uint64_t nans = 0;
#pragma omp parallel reduction(+ : nans)
  {
    std::vector<uint64_t> local(kRadixBins, 0);
    for (int i = 0; i < p.num_tensors; ++i) {
      const T* a = static_cast<const T*>(p.a[i]);
      const T* b = p.b ? static_cast<const T*>(p.b[i]) : nullptr;
      const int64_t n = p.numels[i];
#pragma omp for schedule(static) nowait
      for (int64_t e = 0; e < n; ++e) {
        const uint32_t bits = magnitude_bits(widen(a[e]), b ? widen(b[e]) : 0.f);
        nans += bits > 0x7f800000u;
        if (prefix >= 0 && int64_t(bits >> 16) != prefix) continue;
        ++local[(bits >> shift) & 0xffffu];
      }
    }
#pragma omp critical
    for (int d = 0; d < kRadixBins; ++d) hist[d] += local[d];
  }
  return nans;
}

// Bracketed selection (the fast path for large inputs). A strided sample of the magnitudes gives
// a bit range [lo, hi] that holds the k-th largest with overwhelming probability. One pass counts,
// in blocks that vectorise, the elements above hi, equal to hi and equal to lo (sparse task
// vectors put most elements in one tie group, often 0, at an end of the bracket) and keeps the
// bits of those strictly inside (1.5 % of the elements for large inputs, up to twice the expected
// count): the k-th
// largest is then hi, lo, or picked from the kept bits. One pass at memory speed instead of the
// radix path's two scattering ones, and exact (counts, not estimates). An unrepresentative
// sample (the k-th largest outside [lo, hi], or too many elements inside) falls back to the
// radix path.
constexpr int64_t kBracketMinNumel = int64_t(1) << 20;
constexpr int64_t kMaxSample = int64_t(1) << 16;
constexpr int64_t kMinSample = int64_t(1) << 12;

// Sample size: one element in 256 (so the sample touches a small fraction of the cache lines),
// between 4096 and 65536.
inline int64_t sample_size(int64_t total) {
  return std::max(kMinSample, std::min(kMaxSample, total / 256));
}

// Half-width of the bracket in sample ranks: 4 standard deviations of the sample quantile.
inline double bracket_delta(int64_t m, double f) {
  return 4.0 * std::sqrt(double(m) * f * (1.0 - f)) + 8.0;
}
constexpr int64_t kBracketBlock = 1024;

struct BracketCounts {
  uint64_t above = 0;  // bits > hi
  uint64_t at_hi = 0;  // bits == hi
  uint64_t at_lo = 0;  // bits == lo < hi
  uint64_t nans = 0;
  bool overflow = false;       // more inside values than the buffer holds
  std::vector<uint32_t> kept;  // the bits with lo < bits < hi
};

// Bits of |a - b| for a block into `out` and the block's counts (vectorises).
template <typename T, bool kHasBase>
MELDKIT_CPU_CLONES uint32_t bracket_block(const T* __restrict a, const T* __restrict b, int64_t m,
                                          uint32_t lo, uint32_t hi, uint32_t inner,
                                          uint32_t* __restrict out, uint64_t counts[4]) {
  uint32_t above = 0, at_hi = 0, at_lo = 0, inside = 0, nans = 0;
  const uint32_t distinct = lo != hi;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t bits = magnitude_bits(widen(a[j]), kHasBase ? widen(b[j]) : 0.f);
    out[j] = bits;
    nans += bits > 0x7f800000u;
    above += bits > hi;
    at_hi += bits == hi;
    at_lo += (bits == lo) & distinct;
    inside += (bits - lo - 1u) < inner;  // lo < bits < hi
  }
  counts[0] += above;
  counts[1] += at_hi;
  counts[2] += at_lo;
  counts[3] += nans;
  return inside;
}

template <typename T>
BracketCounts bracket_pass(const MagnitudeSelectParams& p, uint32_t lo, uint32_t hi,
                           int64_t keep_cap) {
  const uint32_t inner = hi - lo >= 2u ? hi - lo - 1u : 0u;  // lo+1 … hi-1
  BracketCounts out;
  uint64_t above = 0, at_hi = 0, at_lo = 0, nans = 0;
  int overflow = 0;
#pragma omp parallel reduction(+ : above, at_hi, at_lo, nans, overflow)
  {
    // Each thread may keep up to the cap (interior elements can cluster in one thread's range);
    // a buffer only grows to what its thread finds.
    const size_t cap = size_t(keep_cap);
    std::vector<uint32_t> kept;
    alignas(64) uint32_t block[kBracketBlock];
    uint64_t counts[4] = {0, 0, 0, 0};
    for (int i = 0; i < p.num_tensors; ++i) {
      const T* a = static_cast<const T*>(p.a[i]);
      const T* b = p.b ? static_cast<const T*>(p.b[i]) : nullptr;
      const int64_t n = p.numels[i];
      const int64_t num_blocks = (n + kBracketBlock - 1) / kBracketBlock;
#pragma omp for schedule(static) nowait
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t e0 = blk * kBracketBlock;
        const int64_t m = std::min(kBracketBlock, n - e0);
        const uint32_t inside =
            b ? bracket_block<T, true>(a + e0, b + e0, m, lo, hi, inner, block, counts)
              : bracket_block<T, false>(a + e0, nullptr, m, lo, hi, inner, block, counts);
        if (inside == 0 || overflow) continue;
        if (kept.size() + inside > cap) {
          overflow = 1;
          continue;
        }
        for (int64_t j = 0; j < m; ++j) {
          if (block[j] - lo - 1u < inner) kept.push_back(block[j]);
        }
      }
    }
    above += counts[0];
    at_hi += counts[1];
    at_lo += counts[2];
    nans += counts[3];
#pragma omp critical
    out.kept.insert(out.kept.end(), kept.begin(), kept.end());
  }
  out.above = above;
  out.at_hi = at_hi;
  out.at_lo = at_lo;
  out.nans = nans;
  out.overflow = overflow != 0;
  return out;
}

// The bracket [lo, hi] from a strided sample, +-4 standard deviations of the sample quantile.
template <typename T>
bool sample_bracket(const MagnitudeSelectParams& p, int64_t total, uint32_t* lo, uint32_t* hi) {
  const int64_t m = sample_size(total);
  std::vector<uint32_t> sample(static_cast<size_t>(m));
  int tensor = 0;
  int64_t start = 0;  // global index of tensor's first element
  for (int64_t j = 0; j < m; ++j) {
    const int64_t g = int64_t((double(j) + 0.5) * double(total) / double(m));
    while (g >= start + p.numels[tensor]) start += p.numels[tensor++];
    const int64_t e = g - start;
    const T* a = static_cast<const T*>(p.a[tensor]);
    const T* b = p.b ? static_cast<const T*>(p.b[tensor]) : nullptr;
    sample[size_t(j)] = magnitude_bits(widen(a[e]), b ? widen(b[e]) : 0.f);
    if (sample[size_t(j)] > 0x7f800000u) return false;  // NaN: the radix path reports it
  }
  const double f = double(p.k) / double(total);
  const double centre = f * double(m);  // rank of the k-th largest, descending
  const double delta = bracket_delta(m, f);
  const int64_t hi_rank = int64_t(std::floor(centre - delta));  // descending ranks
  const int64_t lo_rank = int64_t(std::ceil(centre + delta));
  auto desc = [&](int64_t r) {  // the r-th largest sample (0-based)
    auto it = sample.begin() + (m - 1 - r);
    std::nth_element(sample.begin(), it, sample.end());
    return *it;
  };
  *hi = hi_rank < 0 ? 0xffffffffu : desc(hi_rank);
  *lo = lo_rank >= m ? 0u : desc(lo_rank);
  return true;
}

template <typename T>
bool magnitude_select_bracketed(const MagnitudeSelectParams& p, int64_t total, uint32_t* bits) {
  uint32_t lo = 0, hi = 0;
  if (!sample_bracket<T>(p, total, &lo, &hi)) return false;
  // The buffer holds twice the expected count inside the bracket (2·delta of m sample ranks).
  const int64_t m = sample_size(total);
  const double f = double(p.k) / double(total);
  const int64_t cap = int64_t(double(total) * 4.0 * bracket_delta(m, f) / double(m)) + 4096;
  BracketCounts c = bracket_pass<T>(p, lo, hi, cap);
  if (c.nans > 0) throw_value_error("magnitude_select: the task vectors contain NaN");
  if (c.overflow) return false;
  int64_t r = p.k - int64_t(c.above);  // rank among the elements <= hi
  if (r <= 0) return false;
  if (r <= int64_t(c.at_hi)) {
    *bits = hi;
    return true;
  }
  r -= int64_t(c.at_hi);
  const int64_t inside = int64_t(c.kept.size());
  if (r <= inside) {  // the r-th largest inside
    auto it = c.kept.end() - r;
    std::nth_element(c.kept.begin(), it, c.kept.end());
    *bits = *it;
    return true;
  }
  if (r - inside > int64_t(c.at_lo)) return false;
  *bits = lo;
  return true;
}

template <typename T>
uint32_t magnitude_select_typed(const MagnitudeSelectParams& p) {
  int64_t total = 0;
  for (int i = 0; i < p.num_tensors; ++i) total += p.numels[i];
  uint32_t bits = 0;
  if (total >= kBracketMinNumel && p.k <= total && magnitude_select_bracketed<T>(p, total, &bits)) {
    return bits;
  }
  std::vector<uint64_t> hist(kRadixBins);
  // NaN has no magnitude order: refuse it rather than keep or drop it silently.
  if (radix_histogram<T>(p, 16, -1, hist) > 0) {
    throw_value_error("magnitude_select: the task vectors contain NaN");
  }
  uint32_t high = 0, low = 0;
  int64_t k_within = 0;
  if (!radix_pick(hist.data(), kRadixBins, p.k, &high, &k_within)) {
    throw_value_error("magnitude_select: k = " + std::to_string(p.k) +
                      " exceeds the element count");
  }
  radix_histogram<T>(p, 0, int64_t(high), hist);
  radix_pick(hist.data(), kRadixBins, k_within, &low, &k_within);
  return (high << 16) | low;
}

}  // namespace

void task_merge_cpu(const TaskMergeParams& p) {
  if (p.numel == 0) return;
  MELDKIT_DISPATCH_FLOAT(p.in_dtype, "task_merge", "models", TIn, {
    MELDKIT_DISPATCH_FLOAT(p.out_dtype, "task_merge", "out", TOut,
                           { task_merge_typed<TIn, TOut>(p); });
  });
}

void task_l1_cpu(const TaskMergeParams& p, double* norms) {
  MELDKIT_DISPATCH_FLOAT(p.in_dtype, "task_l1", "models", T, { task_l1_typed<T>(p, norms); });
}

uint32_t magnitude_select_cpu(const MagnitudeSelectParams& p) {
  uint32_t bits = 0;
  MELDKIT_DISPATCH_FLOAT(p.dtype, "magnitude_select", "a", T,
                         { bits = magnitude_select_typed<T>(p); });
  return bits;
}

}  // namespace meldkit
