// CPU merge kernels: the fused task merge (OpenMP over chunks, each element in one pass over the
// N models) and magnitude selection (per-thread radix histograms, merged).
#include <algorithm>
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

template <typename TIn, typename TOut>
MELDKIT_CPU_CLONES void task_merge_range(const TaskMergeParams& p, const uint32_t* keys,
                                         int64_t begin, int64_t end) {
  const auto* base = static_cast<const TIn*>(p.base);
  auto* out = static_cast<TOut*>(p.out);
  for (int64_t e = begin; e < end; ++e) {
    const float b = widen(base[e]);
    MergeAcc acc;
    for (int t = 0; t < p.num_models; ++t) {
      const float tau = widen(static_cast<const TIn*>(p.models[t])[e]) - b;
      const bool keep = merge_keep(p.sparsify, tau, p.thresholds ? p.thresholds[t] : 0.f,
                                   p.densities ? p.densities[t] : 1.f, keys[t], uint64_t(e));
      merge_add(acc, p.weights[t], p.scales[t], tau, keep);
    }
    // `out` may be `base`: this element's reads are done.
    out[e] =
        Store<TOut>::from(merge_finish(b, p.lambda, merge_delta(acc, p.consensus, p.normalize)));
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

template <typename T>
MELDKIT_CPU_CLONES void task_l1_range(const TaskMergeParams& p, const uint32_t* keys, int64_t begin,
                                      int64_t end, double* sums) {
  const auto* base = static_cast<const T*>(p.base);
  for (int t = 0; t < p.num_models; ++t) {
    const T* x = static_cast<const T*>(p.models[t]);
    double all = 0.0, kept = 0.0;
    for (int64_t e = begin; e < end; ++e) {
      const float tau = widen(x[e]) - widen(base[e]);
      const bool keep = merge_keep(p.sparsify, tau, p.thresholds ? p.thresholds[t] : 0.f,
                                   p.densities ? p.densities[t] : 1.f, keys[t], uint64_t(e));
      all += fabsf(tau);
      kept += keep ? fabsf(tau) : 0.f;
    }
    sums[2 * t] += all;
    sums[2 * t + 1] += kept;
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

template <typename T>
uint32_t magnitude_select_typed(const MagnitudeSelectParams& p) {
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
