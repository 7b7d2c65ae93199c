// The merge family: magnitude thresholds by radix selection, and the fused task-vector merge.
//
// task_merge computes, for one tensor position of a model, out = base + lambda * delta from N
// fine-tuned tensors (mergekit's generalized task arithmetic, spec: merging.md section 2):
//   tau_t = model_t - base                                   (in float32)
//   keep_t: sparsify none | magnitude (|tau_t| >= threshold_t) | random (u(seed, stream_t, e) <
//   d_t) W_t   = weight_t * (scale_t * tau_t) if kept, else 0     (scale_t: rescale factor, 1 if
//   none) consensus none:      delta = sum_t W_t                   / sum_t weight_t        if
//   normalize consensus sum|count: s = +1 if vote >= 0 else -1 (vote: sum of W_t | of sign(W_t)),
//                        delta = sum_{sign W_t = s} W_t      / sum_{agreeing} weight_t (0 -> 1)
// One pass, O(1) state per element whatever N: positive and negative parts are summed separately.
#pragma once

#include <cmath>
#include <cstdint>

#include "meldkit/dtype.h"
#include "meldkit/macros.h"
#include "meldkit/random.h"

namespace meldkit {

enum class Sparsify : int { kNone = 0, kMagnitude = 1, kRandom = 2 };
enum class Consensus : int { kNone = 0, kSum = 1, kCount = 2 };

// Models one task_merge call takes; their parameters travel by value to the CUDA kernel.
constexpr int kMergeMaxModels = 32;

struct TaskMergeParams {
  int64_t numel = 0;
  int num_models = 0;
  const void* base = nullptr;           // [numel] of in_dtype
  const void* const* models = nullptr;  // [N] host array of [numel] of in_dtype
  DType in_dtype = DType::kFloat32;
  void* out = nullptr;  // [numel] of out_dtype; may be exactly `base`
  DType out_dtype = DType::kFloat32;
  Sparsify sparsify = Sparsify::kNone;
  Consensus consensus = Consensus::kNone;
  bool normalize = false;
  float lambda = 1.0f;
  const float* weights = nullptr;     // [N]
  const float* scales = nullptr;      // [N] rescale factors applied to kept entries
  const float* thresholds = nullptr;  // [N] magnitude: keep |tau| >= threshold
  const float* densities = nullptr;   // [N] random: keep u < density
  uint64_t seed = 0;
  const uint32_t* streams = nullptr;  // [N] random: counter-based stream of each model
  // CPU, random masks, N <= kMaskBitsMaxModels: [numel] bytes, bit t = model t's keep. The L1
  // pass writes them; the merge pass then reads them instead of drawing again (same bits).
  uint8_t* mask_bits = nullptr;
  // CPU, magnitude masks, mergekit's exactly-k rule (tie "exact_k"): [N] element indices; of the
  // elements whose |tau| equals model t's threshold, only those with index < tie_cutoffs[t] are
  // kept (magnitude_tie_cutoffs_cpu computes them). nullptr keeps every tie (|tau| >= threshold).
  const int64_t* tie_cutoffs = nullptr;
};
constexpr int kMaskBitsMaxModels = 8;

// Running sums of one element; positive and negative parts apart so the elected sign can pick.
struct MergeAcc {
  float pos = 0.f, neg = 0.f;    // sum of positive / negative W_t
  float wpos = 0.f, wneg = 0.f;  // weights of the models with positive / negative W_t
  float wall = 0.f;              // all weights (normalize without consensus)
  int npos = 0, nneg = 0;
};

MELDKIT_INLINE bool merge_keep(Sparsify s, float tau, float threshold, float density, uint32_t key,
                               uint64_t e) {
  switch (s) {
    case Sparsify::kMagnitude:  // density 1 (threshold -inf) keeps NaN too, as the reference
      return threshold == -INFINITY || fabsf(tau) >= threshold;
    case Sparsify::kRandom:
      return uniform01(key, e) < density;
    default:
      return true;
  }
}

// One model's contribution: W = weight * (scale * tau) if kept.
// A kept NaN (in tau), or any element under a NaN scale (an L1 factor of a task vector holding
// NaN), goes into pos, as the reference's NaN·1 and 0·NaN, and makes the element's result NaN
// (merge_delta); a NaN the mask drops is dropped, as the reference drops it.
MELDKIT_INLINE void merge_add(MergeAcc& a, float weight, float scale, float tau, bool keep) {
  a.wall = add_rn(a.wall, weight);
  if (scale != scale) {
    a.pos = add_rn(a.pos, scale);
    return;
  }
  if (!keep) return;
  const float w = mul_rn(weight, mul_rn(scale, tau));
  if (w != w) {
    a.pos = add_rn(a.pos, w);
    return;
  }
  if (w > 0.f) {
    a.pos = add_rn(a.pos, w);
    a.wpos = add_rn(a.wpos, weight);
    a.npos += 1;
  } else if (w < 0.f) {
    a.neg = add_rn(a.neg, w);
    a.wneg = add_rn(a.wneg, weight);
    a.nneg += 1;
  }
}

MELDKIT_INLINE float merge_delta(const MergeAcc& a, Consensus c, bool normalize) {
  if (a.pos != a.pos) return a.pos;  // NaN in a task vector
  if (c == Consensus::kNone) {
    const float delta = add_rn(a.pos, a.neg);
    return normalize ? delta / (a.wall == 0.f ? 1.f : a.wall) : delta;
  }
  const bool positive = c == Consensus::kSum ? add_rn(a.pos, a.neg) >= 0.f : (a.npos - a.nneg) >= 0;
  const float delta = positive ? a.pos : a.neg;
  if (!normalize) return delta;
  const float divisor = positive ? a.wpos : a.wneg;
  return delta / (divisor == 0.f ? 1.f : divisor);
}

// base + lambda * delta, rounded as the reference rounds it.
MELDKIT_INLINE float merge_finish(float base, float lambda, float delta) {
  return add_rn(base, mul_rn(lambda, delta));
}

void task_merge_cpu(const TaskMergeParams& p);
void task_merge_cuda(const TaskMergeParams& p, int device, void* stream);

// L1 norms for mergekit's rescaling: norms[2t] = sum |tau_t|, norms[2t+1] = sum of |tau_t| over
// the kept entries (same masks as task_merge; weights, scales and consensus unused). Summed in
// double, in a fixed order, so repeated calls agree bit for bit.
void task_l1_cpu(const TaskMergeParams& p, double* norms);
// Both sum kL1Chunk-element chunks apart (each in kL1Lanes interleaved double lanes, the lanes
// then added in lane order) and add the chunks in chunk order, so the CPU and CUDA norms, hence
// the rescale factors, are bit-identical. `partials` is device memory of
// task_l1_cuda_partials(numel, num_models) doubles; task_l1_cuda synchronises `stream`.
constexpr int64_t kL1Chunk = int64_t(1) << 14;
inline int64_t task_l1_cuda_partials(int64_t numel, int64_t num_models) {
  return (numel + kL1Chunk - 1) / kL1Chunk * 2 * num_models;
}
void task_l1_cuda(const TaskMergeParams& p, double* partials, double* norms, int device,
                  void* stream);

// ---- magnitude selection ----------------------------------------------------------------------
// The k-th largest |a - b| (b optional) over a list of tensors, exactly (the value torch.kthvalue
// gives for k' = n - k + 1), by radix selection on the float32 bit patterns of |a - b|: for
// non-negative floats, bit order is value order. Two 16-bit digits: a histogram of the high half,
// then of the low half among the elements whose high half is the selected one.

struct MagnitudeSelectParams {
  int num_tensors = 0;
  const void* const* a = nullptr;   // [num_tensors] host array of data pointers
  const void* const* b = nullptr;   // [num_tensors] or nullptr: select on |a|
  const int64_t* numels = nullptr;  // [num_tensors]
  DType dtype = DType::kFloat32;
  int64_t k = 1;  // 1 <= k <= total elements
};

constexpr int kRadixBins = 1 << 16;

// Bits of |a - b| (|a| when b is null), computed in float32 as the reference does.
MELDKIT_INLINE uint32_t magnitude_bits(float a, float b) { return float_as_bits(fabsf(a - b)); }

// L1 sums in kL1Lanes interleaved double accumulators, a fixed order (the result does not depend
// on the thread count) that vectorises: adds a[j] to all[j % kL1Lanes] and k[j] to kept[the same
// lane] for j < n, a tail after the last full group starting again at lane 0. 32 lanes are four
// vectors of 8 doubles, i.e. four independent chains of adds: with 8 (one chain), DARE's L1 pass
// waited on the add latency (DARE-TIES per 4096x14336 position 117-118 -> 103-106 ms). Changing
// the lane count changes the order of these double sums, hence possibly the last bit of a rescale.
constexpr int kL1Lanes = 32;
inline void add_lane_sums(const float* a, const float* k, int64_t n, double* all, double* kept) {
  int64_t j = 0;
  for (; j + kL1Lanes <= n; j += kL1Lanes) {
    for (int l = 0; l < kL1Lanes; ++l) {
      all[l] += a[j + l];
      kept[l] += k[j + l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    all[l] += a[j];
    kept[l] += k[j];
  }
}

// Given a histogram of digits (descending scan), find the digit holding the k-th largest and
// the rank of the k-th largest within that digit. Returns false if k exceeds the count.
template <typename Count>
inline bool radix_pick(const Count* hist, int bins, int64_t k, uint32_t* digit, int64_t* k_within) {
  int64_t above = 0;
  for (int d = bins - 1; d >= 0; --d) {
    if (above + int64_t(hist[d]) >= k) {
      *digit = uint32_t(d);
      *k_within = k - above;
      return true;
    }
    above += int64_t(hist[d]);
  }
  return false;
}

// Returns the threshold's float32 bits; throws ValueError on NaN (NaN has no magnitude order).
// From 2^20 elements: one counting pass inside a sampled bracket (merge_cpu.cpp), falling back
// to two radix-histogram passes (16 + 16 bits) when the sample misses; below, the radix passes.
uint32_t magnitude_select_cpu(const MagnitudeSelectParams& p);
// Adds to hist (kRadixBins counts) a histogram of one 16-bit digit of the bits of |a - b| over
// p's tensors (p.k unused): the high digit of every element when prefix < 0, else the low digit
// of the elements whose high digit is prefix. Two calls per tensor give an exact selection over
// more tensors than fit in memory at once (whole-model TIES). Returns the NaN count.
uint64_t magnitude_histogram_cpu(const MagnitudeSelectParams& p, int64_t prefix, uint64_t* hist);
// The per-tensor selections of num_models models against one base (mergekit's TIES): bits[t]
// is the ks[t]-th largest |models[t] - base| (1 <= ks[t] <= numel), exactly what
// magnitude_select_cpu gives each, but large tensors take one fused pass that reads the base
// once for all models. With `cutoffs` (else nullptr), that pass also counts, per block, the
// values equal to its bracket's ends: where a model's threshold is one of them, cutoffs[t] is
// its tie cutoff (as magnitude_tie_cutoffs_cpu gives it), else -1.
void magnitude_select_models_cpu(const void* base, const void* const* models, int num_models,
                                 int64_t numel, DType dtype, const int64_t* ks, uint32_t* bits,
                                 int64_t* cutoffs = nullptr);
// mergekit's exactly-k rule on top of those thresholds: the top ks[t] magnitudes, equal
// magnitudes ranked by index (lower first), are |tau| > threshold plus the first r ties at the
// threshold, r = ks[t] - #(|tau| > threshold). cutoffs[t] is one past the r-th tie's index (or
// numel when every tie is kept): TaskMergeParams::tie_cutoffs. One counting pass reads the base
// once for all models, then one chunk per model is scanned.
void magnitude_tie_cutoffs_cpu(const void* base, const void* const* models, int num_models,
                               int64_t numel, DType dtype, const uint32_t* bits, const int64_t* ks,
                               int64_t* cutoffs);

// The CUDA version counts three digits of 11, 11 and 10 bits (its histograms fit in shared
// memory). `workspace` is device memory of kMagnitudeSelectCudaWorkspace uint64 counters. It reads
// each histogram back to the host, so it synchronises `stream` (not capturable in a CUDA graph).
constexpr int kMagnitudeSelectCudaWorkspace = 2048 + 1;
uint32_t magnitude_select_cuda(const MagnitudeSelectParams& p, unsigned long long* workspace,
                               int device, void* stream);
// The per-tensor selections of num_models (<= kMergeMaxModels) models against one base, each
// pass for all models in one launch and one read-back (3 synchronisations, not 3 per model):
// bits[t] = the float32 bits of the ks[t]-th largest |models[t] - base| (1 <= ks[t] < numel).
// `workspace`: num_models * kMagnitudeSelectCudaWorkspace uint64 counters.
void magnitude_select_models_cuda(const void* base, const void* const* models, int num_models,
                                  int64_t numel, DType dtype, const int64_t* ks, uint32_t* bits,
                                  unsigned long long* workspace, int device, void* stream);

// ---- band selection (Model Breadcrumbs) -------------------------------------------------------
// out = theta where the ascending rank of |theta - base| (float32; equal magnitudes ordered by
// index) lies in [start, stop), base elsewhere. lo and hi are the magnitudes at ranks start and
// stop - 1 (exact selections, above); has_lo = start > 0, has_hi = stop < numel. One pass keeps
// everything strictly between lo and hi and counts the elements below each; the few elements
// equal to a (nonzero) boundary value are collected in index order and kept by rank afterwards.
// Elements with |theta - base| = 0 are written as theta: kept or dropped, they equal base.

struct BandSelectParams {
  const void* theta = nullptr;  // [numel] of dtype
  const void* base = nullptr;
  void* out = nullptr;
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
  bool has_lo = false, has_hi = false;
  float lo = 0.f, hi = 0.f;
  int64_t start = 0, stop = 0;
  // Without an upper cut: keep the ties at lo that come *first* in index order (a descending
  // stable order's top ranks: TIES with tie="exact_k") instead of the last ones.
  bool lo_ties_first = false;
};

void band_select_cpu(const BandSelectParams& p);

// ---- DELLA's MagPrune (CPU) --------------------------------------------------------------------
// out = theta where uniform01(stream_key(seed, stream), e) < p_e, base elsewhere, with
// p_e = float32((density - epsilon) + (2 epsilon) * (r / (n - 1))) (r / (n - 1) = 0 when n = 1),
// r the ascending rank of |theta_e - base_e| (float32; equal magnitudes by index) within its row
// of n = row_len elements (a 1-D tensor is one row). Ranks by a stable radix sort of the magnitude
// bits per row; OpenMP over rows.

struct DellaSelectParams {
  const void* theta = nullptr;  // [numel] of dtype
  const void* base = nullptr;
  void* out = nullptr;
  int64_t numel = 0;
  int64_t row_len = 1;  // divides numel
  DType dtype = DType::kFloat32;
  double density = 1.0, epsilon = 0.0;
  uint64_t seed = 0;
  uint32_t stream = 0;
  double* l1 = nullptr;  // optional [2]: sum |tau| and sum over kept |tau| (float64; rows in
                         // order, each row in index order)
};

void della_select_cpu(const DellaSelectParams& p);

}  // namespace meldkit
