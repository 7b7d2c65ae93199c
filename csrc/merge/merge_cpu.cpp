// CPU merge kernels: the fused task merge (OpenMP over chunks, each element in one pass over the
// N models) and magnitude selection (a sampled bracket and one or two counting passes, or
// per-thread radix histograms, merged).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "meldkit/merge.h"
#include "meldkit/side_writes.h"
#include "meldkit/status.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// AVX-512 paths written with intrinsics (cpu_isa.h), taken at run time where the CPU has
// AVX-512 F: the merge pass keeps every model's sums in registers, and the bracket pass
// compresses the few elements inside its bracket without a flag array and a second scan.
#include "meldkit/cpu_isa.h"

namespace meldkit {
namespace {

#ifdef MELDKIT_AVX512_INTRINSICS
MELDKIT_AVX512_BEGIN

// Whether the AVX-512 paths run: the CPU has AVX-512 F, and MELDKIT_CPU_AVX512 is not 0.
inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f") && cpu_avx512_allowed();
  return has;
}

// 16 storage values as float32, exactly as widen() gives them (fp16 NaN payloads may differ:
// a NaN gives a NaN result either way).
MELDKIT_AVX512_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MELDKIT_AVX512_TARGET inline __m512 load16(const bf16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
MELDKIT_AVX512_TARGET inline __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

MELDKIT_AVX512_END
#endif

constexpr int64_t kChunk = 1 << 14;             // elements per OpenMP work item
constexpr int64_t kParallelMinNumel = 1 << 15;  // below this, threading costs more than it saves

// Called by every thread at the start of a dynamically scheduled parallel loop: the first to
// arrive runs the merge engine's queued writes (side_writes.h) while the others start on the
// loop's work items and take its share.
inline void run_side_writes() {
  if (side_writes_pending()) side_writes_run_pending();
}

constexpr int64_t kTile = 256;  // elements whose running sums stay in L1 while models stream by

// A hint to load the cache line `bytes` past p (integer arithmetic: the address may lie past
// the end of the array, where the hint loads nothing and cannot fault). The merge and bracket
// passes walk five or more streams at once; on Zen 4 the hardware prefetchers left them waiting
// on memory. With these hints, a line 1024 elements ahead in every model and the base (4 models
// of 4096^2, 2 threads): the fp32 bracket pass 19-23 -> 16-17.5 ms, the TIES merge pass 9.0 ->
// 7.1-7.9 ms in bf16 and 14.4 -> 11.8-12.4 ms in fp32, task arithmetic in bf16 5.5 -> 4.5 ms.
MELDKIT_ALWAYS_INLINE void prefetch_ahead(const void* p, int64_t bytes) {
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)), 0, 3);
}
constexpr int64_t kAhead = 1024;  // elements

// Model t's contribution to a tile, with the sparsify choice hoisted out of the element loop so
// that each variant vectorises (selects instead of branches). Same arithmetic, in the same model
// order, as merge_add: the result is bit-identical to the scalar definition.
// kCached (random masks): the keep decisions are the L1 pass's mask bits (`flag` of bits[j])
// instead of fresh draws.
// The running sums a tile needs: pos and neg always (the delta, and the election by mass), the
// agreeing weights to normalise with an election, the counts to elect by count. Only those are
// kept: each is a load and a store per element and model.
enum class Acc { kSums, kWeights, kCounts };

inline Acc acc_for(Consensus c, bool normalize) {
  if (c == Consensus::kCount) return Acc::kCounts;
  return c == Consensus::kSum && normalize ? Acc::kWeights : Acc::kSums;
}

template <typename TIn, Sparsify S, Acc A, bool kCached = false>
MELDKIT_ALWAYS_INLINE void accumulate_tile(
    const TIn* __restrict x, const float* __restrict b, const uint32_t* __restrict inner, int64_t n,
    float weight, float scale, float threshold, int32_t keep_below, uint32_t key,
    float* __restrict pos, float* __restrict neg, float* __restrict wpos, float* __restrict wneg,
    float* __restrict npos, float* __restrict nneg, const uint32_t* __restrict bits = nullptr,
    uint32_t flag = 0) {
  if (scale != scale) {
    // A NaN scale (the L1 factor of a task vector holding NaN) makes every element NaN, as the
    // reference's 0·NaN.
    for (int64_t j = 0; j < n; ++j) pos[j] += scale;
    return;
  }
  // Density 1 (threshold -inf) keeps every element, NaN included, as the reference's mask does.
  const bool keep_all = threshold == -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float tau = widen(x[j]) - b[j];
    bool keep = true;
    if constexpr (S == Sparsify::kMagnitude) keep = (fabsf(tau) >= threshold) | keep_all;
    // inner[j]: the element's stream-independent hash, computed once for all models.
    if constexpr (S == Sparsify::kRandom && !kCached) {
      keep = uniform01_below(key, inner[j], keep_below);  // u < density
    }
    float w;
    if constexpr (S == Sparsify::kRandom && kCached) {
      // The product or +0 by a bit mask: with the decision in memory GCC would branch on it.
      const uint32_t mask = 0u - uint32_t((bits[j] & flag) != 0u);
      w = bits_as_float(float_as_bits(weight * (scale * tau)) & mask);
    } else {
      w = keep ? weight * (scale * tau) : 0.f;
    }
    // p: w > 0, or NaN: a kept NaN goes into pos (and its weight and count), as the reference's
    // NaN·1, and the tile's result there is NaN (finish_tile_as). A NaN the mask drops is +0
    // here, dropped as the reference drops it. (One unordered compare: any more work in this
    // loop and GCC vectorised the magnitude variant less well, 2.5-6x slower.)
    const bool p = !(w <= 0.f), q = w < 0.f;
    pos[j] += p ? w : 0.f;
    neg[j] += q ? w : 0.f;
    if constexpr (A != Acc::kSums) {
      wpos[j] += p ? weight : 0.f;
      wneg[j] += q ? weight : 0.f;
    }
    if constexpr (A == Acc::kCounts) {
      npos[j] += p ? 1.f : 0.f;
      nneg[j] += q ? 1.f : 0.f;
    }
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
    float delta, divisor = wall;
    if constexpr (C == Consensus::kNone) {
      delta = pos[j] + neg[j];
    } else {
      bool positive;
      if constexpr (C == Consensus::kSum) {
        positive = (pos[j] + neg[j]) >= 0.f;
      } else {
        positive = (npos[j] - nneg[j]) >= 0.f;
      }
      delta = positive ? pos[j] : neg[j];
      if constexpr (kNormalize) divisor = positive ? wpos[j] : wneg[j];
      delta = pos[j] != pos[j] ? pos[j] : delta;  // NaN in a task vector: NaN, elected or not
    }
    if constexpr (kNormalize) delta = delta / (divisor == 0.f ? 1.f : divisor);
    out[j] = merge_finish(b[j], lambda, delta);
  }
}

template <typename TOut, Acc A>
MELDKIT_ALWAYS_INLINE void finish_tile(const TaskMergeParams& p, const float* b, const float* pos,
                                       const float* neg, const float* wpos, const float* wneg,
                                       const float* npos, const float* nneg, float wall, int64_t n,
                                       TOut* out) {
  // In float first, then rounded to TOut in a loop of its own: fused into one loop, GCC did not
  // vectorise the conversion to bf16/fp16 (measured 5x slower for a bf16 output).
  // Only the (consensus, normalize) pairs whose sums A keeps (acc_for) are compiled.
  float res[kTile];
#define MELDKIT_FINISH(C, NORM) \
  finish_tile_as<C, NORM>(b, pos, neg, wpos, wneg, npos, nneg, wall, p.lambda, n, res)
  switch (p.consensus) {
    case Consensus::kSum:
      if constexpr (A == Acc::kSums) {
        MELDKIT_FINISH(Consensus::kSum, false);
      } else {
        MELDKIT_FINISH(Consensus::kSum, true);
      }
      break;
    case Consensus::kCount:
      if constexpr (A == Acc::kCounts) {
        if (p.normalize)
          MELDKIT_FINISH(Consensus::kCount, true);
        else
          MELDKIT_FINISH(Consensus::kCount, false);
      }
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

#ifdef MELDKIT_AVX512_INTRINSICS
MELDKIT_AVX512_BEGIN

// accumulate_tile for all models at once, 16 elements at a time, each element's sums held in
// registers while the models stream by: for magnitude masks, no masks, and random masks whose
// keep bits the L1 pass cached (S == kRandom reads `bits`). Per element the same products,
// added in the same model order, as accumulate_tile: the same bits. Where the mask drops an
// element or the product is zero, accumulate_tile adds +0 to sums that are never -0, which
// leaves them unchanged, and this adds nothing; a kept NaN product (or any under a NaN scale)
// goes into the positive sum in both.
//
// On Zen 4 (512-bit operations on 256-bit units) this loop is bound by its vector instructions,
// not by memory: it ran at half the speed of a plain loop over the same data. Hence: the
// per-model constants are broadcast once per call (AvxModels); factors of 1 are left out
// (kMul); where only the sums are kept, one unordered compare gives "w > 0 or NaN"; two vectors
// go through the models per step; the common finishes (AvxFinish) happen in registers and
// store the result, instead of the sums going through the tile's arrays; and the tile's arrays
// are zeroed only where the scalar loops add into them (zeroing whole tiles, GCC emitted
// `rep stos`: a fifth of the task-arithmetic pass).
template <typename TIn, Sparsify S>
struct AvxModels {
  const TIn* x[kMergeMaxModels];
  __m512 weight[kMergeMaxModels], ws[kMergeMaxModels], thr[kMergeMaxModels];
  __mmask16 keep_all[kMergeMaxModels], nan_all[kMergeMaxModels];
  __m512i flag[kMergeMaxModels];
  __m512 lambda, divisor;  // the finishing steps': λ, and the weight sum (1 when it is 0)
  int n;
};

// How a step ends: kSums stores the running sums for finish_tile; the others finish in
// registers and store the result to `out` (finish_tile_as's arithmetic, then Store<TOut>):
// kNone adds the parts (kNoneNorm then divides by the weight sum), kElect keeps the part of
// the elected sign (consensus by mass).
enum class AvxFinish { kSums, kNone, kNoneNorm, kElect, kElectNorm };

// Store<bf16_t>::from for 16 lanes: round to nearest even, NaN quieted (float_to_bf16's bits).
MELDKIT_AVX512_TARGET inline void store16(bf16_t* o, __m512 r) {
  const __m512i u = _mm512_castps_si512(r);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                         _mm512_and_si512(hi, _mm512_set1_epi32(1))),
                        16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i v =
      _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(v));
}
MELDKIT_AVX512_TARGET inline void store16(float* o, __m512 r) { _mm512_storeu_ps(o, r); }

// Model t's term of 16 elements: w = weight · (scale · tau), in this order (accumulate_tile's
// bits; a factor of 1 is left out by kMul, which gives the same bits: 1·x is x), and the lanes
// it goes to: kpn, the positive sums (kept NaN products, or all under a NaN scale, go there:
// accumulate_tile's rule; !(w <= 0) is w > 0 or NaN, one compare), and kn, the negative ones.
template <int kMul, typename TIn, Sparsify S>
MELDKIT_AVX512_TARGET MELDKIT_ALWAYS_INLINE __m512 model_term_avx512(const AvxModels<TIn, S>& c,
                                                                     int t, __m512 tau,
                                                                     __m512i bitv, __mmask16* kpn,
                                                                     __mmask16* kn) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 w = tau;
  if constexpr (kMul == 2) w = _mm512_mul_ps(c.ws[t], w);
  if constexpr (kMul >= 1) w = _mm512_mul_ps(c.weight[t], w);
  __mmask16 keep = 0xffff;
  if constexpr (S == Sparsify::kMagnitude) {
    const __m512 mag = _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(tau), _mm512_set1_epi32(0x7fffffff)));
    // density 1 (threshold -inf): NaN kept too
    keep = c.keep_all[t] | _mm512_cmp_ps_mask(mag, c.thr[t], _CMP_GE_OQ);
  }
  if constexpr (S == Sparsify::kRandom) keep = _mm512_test_epi32_mask(bitv, c.flag[t]);
  *kpn = c.nan_all[t] | _mm512_mask_cmp_ps_mask(keep, w, zero, _CMP_NLE_UQ);
  *kn = _mm512_mask_cmp_ps_mask(keep, w, zero, _CMP_LT_OQ);
  return w;
}

// The elected part of the sums by mass: positive = (pos + neg) >= 0 (set in *up); a NaN
// positive sum is the result, elected or not.
MELDKIT_AVX512_TARGET MELDKIT_ALWAYS_INLINE __m512 elected_avx512(__m512 sp, __m512 sn,
                                                                  __mmask16* up) {
  *up = _mm512_cmp_ps_mask(_mm512_add_ps(sp, sn), _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 d = _mm512_mask_mov_ps(sn, *up, sp);
  return _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(sp, sp, _CMP_UNORD_Q), sp);
}

// V vectors from element j through all models, keeping only pos and neg (Acc::kSums: the
// elections that also sum weights or counts take accumulate_weighted_avx512).
template <int V, AvxFinish F, int kMul, typename TIn, Sparsify S, typename TOut = float>
MELDKIT_AVX512_TARGET MELDKIT_ALWAYS_INLINE void accumulate_step_avx512(
    const AvxModels<TIn, S>& c, int64_t j, const float* __restrict b,
    const uint32_t* __restrict bits, float* __restrict pos, float* __restrict neg,
    TOut* __restrict out = nullptr) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 bv[V], sp[V], sn[V];
  __m512i bitv[V];
  for (int v = 0; v < V; ++v) {
    bv[v] = _mm512_loadu_ps(b + j + 16 * v);
    bitv[v] = _mm512_setzero_si512();
    if constexpr (S == Sparsify::kRandom) bitv[v] = _mm512_loadu_si512(bits + j + 16 * v);
    sp[v] = sn[v] = zero;
  }
  for (int t = 0; t < c.n; ++t) {
    for (int v = 0; v < V; ++v) {  // a hint for each cache line of the V vectors
      if ((16 * v * int(sizeof(TIn))) % 64 == 0) {
        prefetch_ahead(c.x[t] + j + 16 * v, kAhead * int64_t(sizeof(TIn)));
      }
    }
    for (int v = 0; v < V; ++v) {
      const __m512 tau = _mm512_sub_ps(load16(c.x[t] + j + 16 * v), bv[v]);
      __mmask16 kpn, kn;
      const __m512 w = model_term_avx512<kMul>(c, t, tau, bitv[v], &kpn, &kn);
      sp[v] = _mm512_mask_add_ps(sp[v], kpn, sp[v], w);
      sn[v] = _mm512_mask_add_ps(sn[v], kn, sn[v], w);
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t k = j + 16 * v;
    if constexpr (F == AvxFinish::kSums) {
      _mm512_storeu_ps(pos + k, sp[v]);
      _mm512_storeu_ps(neg + k, sn[v]);
      continue;
    }
    __m512 d;
    if constexpr (F == AvxFinish::kElect) {
      __mmask16 up;
      d = elected_avx512(sp[v], sn[v], &up);
    } else {
      d = _mm512_add_ps(sp[v], sn[v]);
      if constexpr (F == AvxFinish::kNoneNorm) d = _mm512_div_ps(d, c.divisor);
    }
    store16(out + k, _mm512_add_ps(bv[v], _mm512_mul_ps(c.lambda, d)));
  }
}

// The per-model constants of a call, broadcast; returns how many factors the products need
// (kMul: 2 with scales other than 1, 1 with weights other than 1, else 0).
template <typename TIn, Sparsify S>
MELDKIT_AVX512_TARGET MELDKIT_ALWAYS_INLINE int fill_avx_models(const TaskMergeParams& p,
                                                                int64_t e0, float wall,
                                                                AvxModels<TIn, S>& c) {
  c.n = p.num_models;
  c.lambda = _mm512_set1_ps(p.lambda);
  c.divisor = _mm512_set1_ps(wall == 0.f ? 1.f : wall);
  bool unit_scales = true, unit_weights = true;
  for (int t = 0; t < c.n; ++t) {
    c.x[t] = static_cast<const TIn*>(p.models[t]) + e0;
    c.weight[t] = _mm512_set1_ps(p.weights[t]);
    c.ws[t] = _mm512_set1_ps(p.scales[t]);
    const float thr = S == Sparsify::kMagnitude && p.thresholds ? p.thresholds[t] : 0.f;
    c.thr[t] = _mm512_set1_ps(thr);
    c.keep_all[t] = thr == -INFINITY ? __mmask16(0xffff) : __mmask16(0);
    c.nan_all[t] = p.scales[t] != p.scales[t] ? __mmask16(0xffff) : __mmask16(0);
    c.flag[t] = _mm512_set1_epi32(int(1u << (t & 31)));
    unit_scales &= p.scales[t] == 1.f;
    unit_weights &= p.weights[t] == 1.f;
  }
  return !unit_scales ? 2 : !unit_weights ? 1 : 0;
}

// TIES's default (election by mass, normalised by the elected weights: Acc::kWeights) for the
// tile's first m elements (a multiple of 16), finished in registers and stored to `out`:
// accumulate_weighted_avx512 and finish_tile_as<kSum, true>'s arithmetic, the same bits. One
// unordered compare gives "w > 0 or NaN" for the positive sums; the positive weight sum then
// also takes a NaN lane's weight, which changes nothing: that lane's result is NaN either way.
template <int kMul, typename TIn, Sparsify S, typename TOut>
MELDKIT_AVX512_TARGET void elect_norm_steps_avx512(const AvxModels<TIn, S>& c,
                                                   const float* __restrict b,
                                                   const uint32_t* __restrict bits, int64_t m,
                                                   TOut* __restrict out) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < m; j += 16) {
    const __m512 bv = _mm512_loadu_ps(b + j);
    __m512i bitv = _mm512_setzero_si512();
    if constexpr (S == Sparsify::kRandom) bitv = _mm512_loadu_si512(bits + j);
    __m512 sp = zero, sn = zero, swp = zero, swn = zero;
    for (int t = 0; t < c.n; ++t) {
      prefetch_ahead(c.x[t] + j, kAhead * int64_t(sizeof(TIn)));
      const __m512 tau = _mm512_sub_ps(load16(c.x[t] + j), bv);
      __mmask16 kpn, kn;
      const __m512 w = model_term_avx512<kMul>(c, t, tau, bitv, &kpn, &kn);
      sp = _mm512_mask_add_ps(sp, kpn, sp, w);
      sn = _mm512_mask_add_ps(sn, kn, sn, w);
      swp = _mm512_mask_add_ps(swp, kpn, swp, c.weight[t]);
      swn = _mm512_mask_add_ps(swn, kn, swn, c.weight[t]);
    }
    // The elected part over its weights (1 where they are 0).
    __mmask16 up;
    __m512 d = elected_avx512(sp, sn, &up);
    __m512 div = _mm512_mask_mov_ps(swn, up, swp);
    div = _mm512_mask_mov_ps(div, _mm512_cmp_ps_mask(div, zero, _CMP_EQ_OQ), one);
    d = _mm512_div_ps(d, div);
    store16(out + j, _mm512_add_ps(bv, _mm512_mul_ps(c.lambda, d)));
  }
}

template <typename TIn, Sparsify S, typename TOut>
MELDKIT_AVX512_TARGET void elect_norm_avx512(const TaskMergeParams& p, int64_t e0,
                                             const float* __restrict b,
                                             const uint32_t* __restrict bits, int64_t m,
                                             TOut* __restrict out) {
  AvxModels<TIn, S> c;
  const int muls = fill_avx_models(p, e0, 1.f, c);
  if (muls == 2) {
    elect_norm_steps_avx512<2>(c, b, bits, m, out);
  } else if (muls == 1) {
    elect_norm_steps_avx512<1>(c, b, bits, m, out);
  } else {
    elect_norm_steps_avx512<0>(c, b, bits, m, out);
  }
}

// The tile's first m elements (a multiple of 16) through all models, for the sums-only
// elections. F == kSums writes their sums to the tile's pos and neg for finish_tile; the other
// F write the results to `out` (the tile's first element), and `wall` is the weight sum
// kNoneNorm divides by.
template <typename TIn, Sparsify S, AvxFinish F = AvxFinish::kSums, typename TOut = float>
MELDKIT_AVX512_TARGET void accumulate_models_avx512(const TaskMergeParams& p, int64_t e0,
                                                    const float* __restrict b,
                                                    const uint32_t* __restrict bits, int64_t m,
                                                    float* __restrict pos, float* __restrict neg,
                                                    TOut* __restrict out = nullptr,
                                                    float wall = 1.f) {
  AvxModels<TIn, S> c;
  const int muls = fill_avx_models(p, e0, wall, c);
  constexpr int V = 2;
  auto steps = [&](auto mul) MELDKIT_AVX512_TARGET {
    constexpr int kMul = decltype(mul)::value;
    int64_t j = 0;
    for (; j + 16 * V <= m; j += 16 * V) {
      accumulate_step_avx512<V, F, kMul>(c, j, b, bits, pos, neg, out);
    }
    for (; j < m; j += 16) accumulate_step_avx512<1, F, kMul>(c, j, b, bits, pos, neg, out);
  };
  if (muls == 2) {
    steps(std::integral_constant<int, 2>());
  } else if (muls == 1) {
    steps(std::integral_constant<int, 1>());
  } else {
    steps(std::integral_constant<int, 0>());
  }
}

// accumulate_models_avx512 for the elections that also sum weights or counts (Acc::kWeights,
// kCounts), one vector at a time with the constants broadcast where used: the restructured loop
// above ran these 20-40 % slower on Zen 4 (bf16, 4 models; not understood), so they keep this
// one. Same arithmetic, same bits.
template <typename TIn, Sparsify S, Acc A>
MELDKIT_AVX512_TARGET void accumulate_weighted_avx512(
    const TaskMergeParams& p, int64_t e0, const float* __restrict b,
    const uint32_t* __restrict bits, int64_t m, float* __restrict pos, float* __restrict neg,
    float* __restrict wpos, float* __restrict wneg, float* __restrict npos,
    float* __restrict nneg) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t j = 0; j < m; j += 16) {
    const __m512 bv = _mm512_loadu_ps(b + j);
    __m512i bitv = _mm512_setzero_si512();
    if constexpr (S == Sparsify::kRandom) bitv = _mm512_loadu_si512(bits + j);
    __m512 sp = zero, sn = zero, swp = zero, swn = zero, snp = zero, snn = zero;
    for (int t = 0; t < p.num_models; ++t) {
      const TIn* x = static_cast<const TIn*>(p.models[t]) + e0 + j;
      prefetch_ahead(x, kAhead * int64_t(sizeof(TIn)));
      const __m512 tau = _mm512_sub_ps(load16(x), bv);
      const __m512 weight = _mm512_set1_ps(p.weights[t]);
      const __m512 w = _mm512_mul_ps(weight, _mm512_mul_ps(_mm512_set1_ps(p.scales[t]), tau));
      __mmask16 keep = 0xffff;
      if constexpr (S == Sparsify::kMagnitude) {
        const __m512 mag =
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(tau), abs_mask));
        const float thr = p.thresholds ? p.thresholds[t] : 0.f;
        keep = thr == -INFINITY ? __mmask16(0xffff)  // density 1: NaN kept too
                                : _mm512_cmp_ps_mask(mag, _mm512_set1_ps(thr), _CMP_GE_OQ);
      }
      if constexpr (S == Sparsify::kRandom) {
        keep = _mm512_test_epi32_mask(bitv, _mm512_set1_epi32(int(1u << t)));
      }
      const __mmask16 kp = _mm512_mask_cmp_ps_mask(keep, w, zero, _CMP_GT_OQ);
      const __mmask16 kn = _mm512_mask_cmp_ps_mask(keep, w, zero, _CMP_LT_OQ);
      // Kept NaN products, or all under a NaN scale, go into the positive sums
      // (accumulate_tile's rule).
      const float scale = p.scales[t];
      const __mmask16 nan_lanes =
          scale != scale ? __mmask16(0xffff) : _mm512_mask_cmp_ps_mask(keep, w, w, _CMP_UNORD_Q);
      sp = _mm512_mask_add_ps(sp, __mmask16(kp | nan_lanes), sp, w);
      sn = _mm512_mask_add_ps(sn, kn, sn, w);
      if constexpr (A != Acc::kSums) {
        swp = _mm512_mask_add_ps(swp, kp, swp, weight);
        swn = _mm512_mask_add_ps(swn, kn, swn, weight);
      }
      if constexpr (A == Acc::kCounts) {
        snp = _mm512_mask_add_ps(snp, kp, snp, one);
        snn = _mm512_mask_add_ps(snn, kn, snn, one);
      }
    }
    _mm512_storeu_ps(pos + j, sp);
    _mm512_storeu_ps(neg + j, sn);
    if constexpr (A != Acc::kSums) {
      _mm512_storeu_ps(wpos + j, swp);
      _mm512_storeu_ps(wneg + j, swn);
    }
    if constexpr (A == Acc::kCounts) {
      _mm512_storeu_ps(npos + j, snp);
      _mm512_storeu_ps(nneg + j, snn);
    }
  }
}

// The finishing the AVX-512 path can do in registers, into a float or bf16 output: the
// sums-only cases (Acc::kSums: no consensus, or the election by mass without normalising) and
// the normalised election by mass (Acc::kWeights, TIES's default).
template <typename TOut, Acc A>
inline AvxFinish avx_finish_for(const TaskMergeParams& p) {
  constexpr bool kOut = std::is_same<TOut, float>::value || std::is_same<TOut, bf16_t>::value;
  if (!kOut || A == Acc::kCounts) return AvxFinish::kSums;
  if (A == Acc::kWeights) return AvxFinish::kElectNorm;
  if (A == Acc::kSums && p.consensus == Consensus::kNone) {
    return p.normalize ? AvxFinish::kNoneNorm : AvxFinish::kNone;
  }
  return A == Acc::kSums && p.consensus == Consensus::kSum ? AvxFinish::kElect : AvxFinish::kSums;
}

template <typename TIn, Sparsify S, Acc A, typename TOut>
MELDKIT_AVX512_TARGET void accumulate_finish_avx512(AvxFinish f, const TaskMergeParams& p,
                                                    int64_t e0, const float* b,
                                                    const uint32_t* bits, int64_t m, float* pos,
                                                    float* neg, float* wpos, float* wneg,
                                                    float* npos, float* nneg, TOut* out,
                                                    float wall) {
  if constexpr (A != Acc::kSums) {
    (void)wall;
    if constexpr (A == Acc::kWeights &&
                  (std::is_same<TOut, float>::value || std::is_same<TOut, bf16_t>::value)) {
      if (f == AvxFinish::kElectNorm) {
        elect_norm_avx512<TIn, S>(p, e0, b, bits, m, out);
        return;
      }
    }
    (void)f, (void)out;
    accumulate_weighted_avx512<TIn, S, A>(p, e0, b, bits, m, pos, neg, wpos, wneg, npos, nneg);
  } else {
    (void)wpos, (void)wneg, (void)npos, (void)nneg;
    constexpr bool kOut = std::is_same<TOut, float>::value || std::is_same<TOut, bf16_t>::value;
    if constexpr (kOut) {
      switch (f) {
        case AvxFinish::kNone:
          accumulate_models_avx512<TIn, S, AvxFinish::kNone>(p, e0, b, bits, m, pos, neg, out,
                                                             wall);
          return;
        case AvxFinish::kNoneNorm:
          accumulate_models_avx512<TIn, S, AvxFinish::kNoneNorm>(p, e0, b, bits, m, pos, neg, out,
                                                                 wall);
          return;
        case AvxFinish::kElect:
          accumulate_models_avx512<TIn, S, AvxFinish::kElect>(p, e0, b, bits, m, pos, neg, out,
                                                              wall);
          return;
        default:
          break;
      }
    }
    (void)f, (void)out, (void)wall;
    accumulate_models_avx512<TIn, S>(p, e0, b, bits, m, pos, neg);
  }
}

MELDKIT_AVX512_END
#endif

template <typename TIn, typename TOut, Acc A>
MELDKIT_CPU_CLONES_AVX512 void task_merge_range(const TaskMergeParams& p, const uint32_t* keys,
                                                int64_t begin, int64_t end) {
  const auto* base = static_cast<const TIn*>(p.base);
  auto* out = static_cast<TOut*>(p.out);
  alignas(64) float b[kTile], pos[kTile], neg[kTile], wpos[kTile], wneg[kTile], npos[kTile],
      nneg[kTile];
  alignas(64) uint32_t inner[kTile], bits[kTile];
  const bool cached = p.sparsify == Sparsify::kRandom && p.mask_bits != nullptr;
#ifdef MELDKIT_AVX512_INTRINSICS
  // Fresh random draws (no cached bits) stay on the scalar path.
  const bool avx512 = cpu_has_avx512f() && (p.sparsify != Sparsify::kRandom || cached);
  const AvxFinish finish = avx_finish_for<TOut, A>(p);
#endif
  // mergekit's exactly-k rule (tie_cutoffs): a tile wholly before model t's cutoff keeps its
  // ties (|tau| >= threshold), one wholly after keeps |tau| > threshold, i.e. |tau| >= the next
  // float up; the one tile a cutoff falls inside takes the scalar loops, split there.
  TaskMergeParams tile_params = p;
  float tile_thr[kMergeMaxModels];
  int64_t split[kMergeMaxModels];
  const TaskMergeParams& tp = tile_params;
  for (int64_t e0 = begin; e0 < end; e0 += kTile) {
    const int64_t n = std::min(kTile, end - e0);
    float wall = 0.f;
    bool any_split = false;
    if (p.tie_cutoffs != nullptr) {
      for (int t = 0; t < p.num_models; ++t) {
        const int64_t c = p.tie_cutoffs[t];
        const float thr = p.thresholds[t];
        split[t] = -1;
        if (c >= e0 + n) {
          tile_thr[t] = thr;
        } else if (c <= e0) {
          tile_thr[t] = bits_as_float(float_as_bits(thr) + 1u);
        } else {
          tile_thr[t] = thr;
          split[t] = c - e0;
          any_split = true;
        }
      }
      tile_params.thresholds = tile_thr;
    }
    for (int64_t o = 0; o < n * int64_t(sizeof(TIn)); o += 64) {
      prefetch_ahead(base + e0, kAhead * int64_t(sizeof(TIn)) + o);
    }
    for (int64_t j = 0; j < n; ++j) b[j] = widen(base[e0 + j]);
    if (cached) {  // widened once per tile: the model loops then test 32-bit lanes
      const uint8_t* __restrict mb = p.mask_bits + e0;
      for (int64_t j = 0; j < n; ++j) bits[j] = mb[j];
    } else if (p.sparsify == Sparsify::kRandom) {
      // e0 is a multiple of the tile size, so a tile never crosses a multiple of 2^32.
      const uint32_t high = uniform01_high(uint64_t(e0));
      for (int64_t j = 0; j < n; ++j) inner[j] = uniform01_inner(high, uint64_t(e0 + j));
    }
    // The AVX-512 path takes the tile's first multiple of 16 elements (all of a full tile);
    // the scalar loops below take what is left, from `done` on.
    // `finished`: how many of them it also finished and wrote to `out` (finish_tile takes the
    // rest).
    int64_t done = 0, finished = 0;
    for (int t = 0; t < p.num_models; ++t) wall += p.weights[t];
#ifdef MELDKIT_AVX512_INTRINSICS
    if (avx512 && n >= 16 && !any_split) {
      done = n & ~int64_t(15);
      finished = finish != AvxFinish::kSums ? done : 0;
      switch (p.sparsify) {
        case Sparsify::kMagnitude:
          accumulate_finish_avx512<TIn, Sparsify::kMagnitude, A>(
              finish, tp, e0, b, bits, done, pos, neg, wpos, wneg, npos, nneg, out + e0, wall);
          break;
        case Sparsify::kRandom:
          accumulate_finish_avx512<TIn, Sparsify::kRandom, A>(
              finish, p, e0, b, bits, done, pos, neg, wpos, wneg, npos, nneg, out + e0, wall);
          break;
        default:
          accumulate_finish_avx512<TIn, Sparsify::kNone, A>(finish, p, e0, b, bits, done, pos, neg,
                                                            wpos, wneg, npos, nneg, out + e0, wall);
      }
    }
#endif
    // The AVX-512 path writes the sums of [0, done) whole; the scalar loops add into the rest.
    // (Zeroed in a loop of their own: zeroing the whole tile before, GCC emitted `rep stos`,
    // a fifth of the task-arithmetic pass's time on Zen 4.)
    for (int64_t j = done; j < n; ++j) {
      pos[j] = neg[j] = 0.f;
      if constexpr (A != Acc::kSums) wpos[j] = wneg[j] = 0.f;
      if constexpr (A == Acc::kCounts) npos[j] = nneg[j] = 0.f;
    }
    for (int t = 0; t < p.num_models && done < n; ++t) {
      const float w = p.weights[t], sc = p.scales[t];
      const TIn* x = static_cast<const TIn*>(p.models[t]) + e0 + done;
      const float thr = tp.thresholds ? tp.thresholds[t] : 0.f;
      const int32_t d = uniform01_threshold(p.densities ? p.densities[t] : 1.f);
      const int64_t r = n - done;
      float *ps = pos + done, *ng = neg + done, *wp = wpos + done, *wn = wneg + done;
      float *np = npos + done, *nn = nneg + done;
      const float* bb = b + done;
      const uint32_t *in = inner + done, *bt = bits + done;
      if (any_split && split[t] >= 0) {  // done == 0: ties kept before the cutoff, not after
        const int64_t c = split[t];
        const float above = bits_as_float(float_as_bits(thr) + 1u);
        accumulate_tile<TIn, Sparsify::kMagnitude, A>(x, bb, in, c, w, sc, thr, d, keys[t], ps, ng,
                                                      wp, wn, np, nn);
        accumulate_tile<TIn, Sparsify::kMagnitude, A>(x + c, bb + c, in + c, r - c, w, sc, above, d,
                                                      keys[t], ps + c, ng + c, wp + c, wn + c,
                                                      np + c, nn + c);
        continue;
      }
      switch (p.sparsify) {
        case Sparsify::kMagnitude:
          accumulate_tile<TIn, Sparsify::kMagnitude, A>(x, bb, in, r, w, sc, thr, d, keys[t], ps,
                                                        ng, wp, wn, np, nn);
          break;
        case Sparsify::kRandom:
          if (cached) {
            accumulate_tile<TIn, Sparsify::kRandom, A, true>(x, bb, in, r, w, sc, thr, d, keys[t],
                                                             ps, ng, wp, wn, np, nn, bt, 1u << t);
          } else {
            accumulate_tile<TIn, Sparsify::kRandom, A>(x, bb, in, r, w, sc, thr, d, keys[t], ps, ng,
                                                       wp, wn, np, nn);
          }
          break;
        default:
          accumulate_tile<TIn, Sparsify::kNone, A>(x, bb, in, r, w, sc, thr, d, keys[t], ps, ng, wp,
                                                   wn, np, nn);
      }
    }
    // `out` may be `base`: every read of this tile is done (b holds the base's values).
    if (finished < n) {
      const int64_t f = finished;
      finish_tile<TOut, A>(p, b + f, pos + f, neg + f, wpos + f, wneg + f, npos + f, nneg + f, wall,
                           n - f, out + e0 + f);
    }
  }
}

template <typename TIn, typename TOut>
void task_merge_typed(const TaskMergeParams& p) {
  uint32_t keys[kMergeMaxModels] = {};
  for (int t = 0; t < p.num_models; ++t) {
    keys[t] = p.streams ? stream_key(p.seed, p.streams[t]) : 0u;
  }
  const int64_t num_chunks = (p.numel + kChunk - 1) / kChunk;
  const Acc acc = acc_for(p.consensus, p.normalize);
  // Dynamic: chunks go to whichever thread is free, so a core taken by other work (the merge
  // engine's writer thread) does not leave the others waiting at the end.
#pragma omp parallel if (p.numel >= kParallelMinNumel)
  {
    run_side_writes();
#pragma omp for schedule(dynamic) nowait
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t begin = c * kChunk, end = std::min(p.numel, (c + 1) * kChunk);
      switch (acc) {
        case Acc::kSums:
          task_merge_range<TIn, TOut, Acc::kSums>(p, keys, begin, end);
          break;
        case Acc::kWeights:
          task_merge_range<TIn, TOut, Acc::kWeights>(p, keys, begin, end);
          break;
        default:
          task_merge_range<TIn, TOut, Acc::kCounts>(p, keys, begin, end);
      }
    }
  }
}

// Sums in kLanes interleaved double accumulators (a fixed order, so the result does not depend
// on the thread count), which lets the loop vectorise: one running sum would serialise on it.
constexpr int kLanes = kL1Lanes;  // merge.h's add_lane_sums uses the same lanes

// One model's |tau| sums over [begin, end), all and kept (magnitude masks, or none); random masks
// go through l1_random_models, which shares the hashing across models.
template <typename T, Sparsify S>
MELDKIT_ALWAYS_INLINE void l1_model(const T* x, const T* base, int64_t begin, int64_t end,
                                    float threshold, double* all_out, double* kept_out) {
  static_assert(S != Sparsify::kRandom, "random masks: l1_random_models");
  double all[kLanes] = {}, kept[kLanes] = {};
  // Density 1 (threshold -inf) keeps NaN too, as merge_keep and the reference do: a NaN there
  // makes the kept norm NaN (and the factor NaN), not a dropped element.
  const bool keep_all = threshold == -INFINITY;
  auto visit = [&](int64_t e, int lane) {
    const float tau = widen(x[e]) - widen(base[e]);
    bool keep = true;
    if constexpr (S == Sparsify::kMagnitude) keep = keep_all | (fabsf(tau) >= threshold);
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
  uint32_t inner[kTile], bits[kTile];
  float abs_tau[kTile], abs_kept[kTile];
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
      const int32_t d = uniform01_threshold(p.densities ? p.densities[t] : 1.f);
      const uint32_t key = keys[t];
      double* at = all[t];
      double* kt = kept[t];
      // The draws, |tau| and its kept part in a loop of their own (contiguous 32-bit lanes: it
      // vectorises); the draws also go, as bit t, to the merge pass. Summed into the double
      // lanes below: fused with the sums, GCC assembled each vector element by element.
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t keep = uniform01_below(key, inner[j], d) ? 1u : 0u;  // u < density
        bits[j] |= keep << t;
        const float a = fabsf(widen(x[j]) - widen(b[j]));
        abs_tau[j] = a;
        // a or +0 by a bit mask: with the draw in memory GCC would branch here, on random bits
        abs_kept[j] = bits_as_float(float_as_bits(a) & (0u - keep));
      }
      add_lane_sums(abs_tau, abs_kept, n, at, kt);
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
MELDKIT_CPU_CLONES_AVX512 void task_l1_range(const TaskMergeParams& p, const uint32_t* keys,
                                             int64_t begin, int64_t end, double* sums) {
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
  // Fixed chunks summed in chunk order: the result does not depend on the thread count (and is
  // task_l1_cuda's, chunk for chunk).
  static_assert(kChunk == kL1Chunk, "the CPU and CUDA L1 passes sum the same chunks");
  const int64_t num_chunks = (p.numel + kChunk - 1) / kChunk;
  std::vector<double> chunk_sums(size_t(num_chunks) * 2 * p.num_models, 0.0);
#pragma omp parallel if (p.numel >= kParallelMinNumel)
  {
    run_side_writes();
#pragma omp for schedule(dynamic) nowait
    for (int64_t c = 0; c < num_chunks; ++c) {
      task_l1_range<T>(p, keys, c * kChunk, std::min(p.numel, (c + 1) * kChunk),
                       chunk_sums.data() + c * 2 * p.num_models);
    }
  }
  std::fill(norms, norms + 2 * p.num_models, 0.0);
  for (int64_t c = 0; c < num_chunks; ++c) {
    for (int i = 0; i < 2 * p.num_models; ++i) norms[i] += chunk_sums[c * 2 * p.num_models + i];
  }
}

// Calls f(j) for each j < m whose flag (0 or 1, one byte each) is set, testing 8 flags at a time
// and taking each set byte by its position: for sparse flags, most words are skipped. Flags
// [m, the next multiple of 8) are cleared first (a short last block leaves old ones there), so
// the buffer must hold a multiple of 8 bytes past m.
template <typename F>
MELDKIT_ALWAYS_INLINE void for_each_flagged(uint8_t* flags, int64_t m, F&& f) {
  std::fill(flags + m, flags + ((m + 7) & ~int64_t(7)), uint8_t(0));
  for (int64_t w = 0; w < m; w += 8) {
    uint64_t word;
    std::memcpy(&word, flags + w, sizeof(word));
    while (word != 0) {
      f(w + (__builtin_ctzll(word) >> 3));
      word &= word - 1;
    }
  }
}

constexpr int64_t kDigitBlock = 1024;

// The digits of a block for radix_histogram (vectorises): digit[j] is the 16-bit digit at
// `shift` of |a - b|'s bits, flags[j] is 1 where it is to be counted (the high digit equals
// `prefix`, or any when match_all) and the magnitude is not an exact zero; those zeros (most of
// a sparse task vector) and NaNs are only counted, in counts[0] and counts[1].
template <typename T, bool kHasBase>
MELDKIT_CPU_CLONES_AVX512 void digit_block(const T* __restrict a, const T* __restrict b, int64_t m,
                                           int shift, bool match_all, uint32_t prefix,
                                           uint32_t* __restrict digit, uint8_t* __restrict flags,
                                           uint64_t counts[2]) {
  uint32_t zeros = 0, nans = 0;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t bits = magnitude_bits(widen(a[j]), kHasBase ? widen(b[j]) : 0.f);
    nans += bits > 0x7f800000u;
    const uint32_t match = match_all | ((bits >> 16) == prefix);
    const uint32_t zero = bits == 0u;
    zeros += match & zero;
    flags[j] = uint8_t(match & (zero ^ 1u));
    digit[j] = (bits >> shift) & 0xffffu;
  }
  counts[0] += zeros;
  counts[1] += nans;
}

// Histogram of one 16-bit digit of |a - b| over every tensor, among the elements whose high
// digit equals `prefix` (pass 2) or all elements (pass 1: prefix < 0). Returns the NaN count.
// Blocks are bracketed by digit_block; only the flagged elements are scattered into the
// histogram, 8 flags tested at a time (pass 2 keeps few). Exact zeros are counted, not
// scattered: one counter incremented per element would chain every increment on the previous
// one through memory.
template <typename T>
uint64_t radix_histogram(const MagnitudeSelectParams& p, int shift, int64_t prefix,
                         std::vector<uint64_t>& hist) {
  std::fill(hist.begin(), hist.end(), 0);
  const bool match_all = prefix < 0;
  const uint32_t pre = match_all ? 0u : uint32_t(prefix);
  uint64_t nans = 0, zeros = 0;
#pragma omp parallel reduction(+ : nans, zeros)
  {
    std::vector<uint64_t> local(kRadixBins, 0);
    alignas(64) uint32_t digit[kDigitBlock];
    alignas(64) uint8_t flags[kDigitBlock];
    uint64_t counts[2] = {0, 0};
    for (int i = 0; i < p.num_tensors; ++i) {
      const T* a = static_cast<const T*>(p.a[i]);
      const T* b = p.b ? static_cast<const T*>(p.b[i]) : nullptr;
      const int64_t n = p.numels[i];
      const int64_t num_blocks = (n + kDigitBlock - 1) / kDigitBlock;
#pragma omp for schedule(dynamic, 16) nowait
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t e0 = blk * kDigitBlock;
        const int64_t m = std::min(kDigitBlock, n - e0);
        if (b) {
          digit_block<T, true>(a + e0, b + e0, m, shift, match_all, pre, digit, flags, counts);
        } else {
          digit_block<T, false>(a + e0, nullptr, m, shift, match_all, pre, digit, flags, counts);
        }
        for_each_flagged(flags, m, [&](int64_t j) { ++local[digit[j]]; });
      }
    }
    zeros += counts[0];
    nans += counts[1];
#pragma omp critical
    for (int d = 0; d < kRadixBins; ++d) hist[d] += local[d];
  }
  hist[0] += zeros;  // an exact zero's digits are 0 at either shift
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

// Sample size: one element in 1024, between 4096 and 65536. Each sampled element misses the
// cache (and often the TLB), while the values kept inside the bracket, whose count grows as the
// sample shrinks (as 1/sqrt(m)), are selected from a histogram at about a nanosecond each: on
// Zen 4 one in 1024 costs least (4 fp32 models of 4096^2: sampling 4.3 ms at one in 256, the
// selection inside 6.6 ms by nth_element; 1.2 ms and under 1 ms now).
inline int64_t sample_size(int64_t total) {
  return std::max(kMinSample, std::min(kMaxSample, total / 1024));
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
  // With exactly-k cutoffs wanted: (block, count) of each run of `kept` in order, so a value of
  // `kept` can be traced to its block.
  std::vector<std::pair<int64_t, uint32_t>> marks;
};

// One selection's bracket: the sample's ends and the keep buffer's size per thread.
struct Bracket {
  uint32_t lo = 0, hi = 0, inner = 0;  // inner: the count of values lo+1 … hi-1
  size_t cap = 0;
};

// Bits of |a - b| for a block into `out` and the block's counts (vectorises); `flags[j]` is 1
// where lo < bits < hi, else 0, so the keep loop can skip 8 elements at a time. The base `b` is
// the storage type, or float when a fused pass widened it once for several models.
template <typename T, typename TB, bool kHasBase>
MELDKIT_CPU_CLONES_AVX512 uint32_t bracket_block(const T* __restrict a, const TB* __restrict b,
                                                 int64_t m, const Bracket& br,
                                                 uint32_t* __restrict out,
                                                 uint8_t* __restrict flags, uint64_t counts[4]) {
  uint32_t above = 0, at_hi = 0, at_lo = 0, inside = 0, nans = 0;
  const uint32_t lo = br.lo, hi = br.hi, inner = br.inner, distinct = lo != hi;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t bits = magnitude_bits(widen(a[j]), kHasBase ? float(widen(b[j])) : 0.f);
    out[j] = bits;
    nans += bits > 0x7f800000u;
    above += bits > hi;
    at_hi += bits == hi;
    at_lo += (bits == lo) & distinct;
    const uint32_t in = (bits - lo - 1u) < inner;  // lo < bits < hi
    inside += in;
    flags[j] = uint8_t(in);
  }
  counts[0] += above;
  counts[1] += at_hi;
  counts[2] += at_lo;
  counts[3] += nans;
  return inside;
}

// One thread's share of one selection's bracket pass.
struct BracketLocal {
  uint64_t counts[4] = {0, 0, 0, 0};
  bool overflow = false;
  std::vector<uint32_t> kept;
  std::vector<std::pair<int64_t, uint32_t>> marks;  // see BracketCounts::marks

  // Keeps the `inside` flagged values of a block that bracket_block filled. Each thread may keep
  // up to the cap (interior elements can cluster in one thread's range); a buffer only grows to
  // what its thread finds.
  void keep(const uint32_t* block, uint8_t* flags, int64_t m, uint32_t inside, size_t cap) {
    if (inside == 0 || overflow) return;
    if (kept.size() + inside > cap) {
      overflow = true;
      return;
    }
    // The inside elements are sparse (1.5 %).
    for_each_flagged(flags, m, [&](int64_t j) { kept.push_back(block[j]); });
  }

  // Keeps `inside` values gathered in order (the AVX-512 path's compressed block): the same
  // values, in the same order, as keep() over that block's flags.
  void keep_packed(const uint32_t* packed, uint32_t inside, size_t cap) {
    if (inside == 0 || overflow) return;
    if (kept.size() + inside > cap) {
      overflow = true;
      return;
    }
    kept.insert(kept.end(), packed, packed + inside);
  }

  // Adds this thread's share to `out` (inside an omp critical section).
  void add_to(BracketCounts& out) const {
    out.above += counts[0];
    out.at_hi += counts[1];
    out.at_lo += counts[2];
    out.nans += counts[3];
    out.overflow = out.overflow || overflow;
    out.kept.insert(out.kept.end(), kept.begin(), kept.end());
    out.marks.insert(out.marks.end(), marks.begin(), marks.end());
  }
};

#ifdef MELDKIT_AVX512_INTRINSICS
MELDKIT_AVX512_BEGIN

// bracket_block and BracketLocal::keep in one loop: the same counts, and the inside values
// compressed in order into `packed` (m + 16 slots), instead of every value and a flag per element
// written out and the flags scanned again. m is a multiple of 16 (the caller takes the tail).
template <typename T, typename TB, bool kHasBase>
MELDKIT_AVX512_TARGET uint32_t bracket_block_avx512(const T* __restrict a, const TB* __restrict b,
                                                    int64_t m, const Bracket& br,
                                                    uint32_t* __restrict packed,
                                                    uint64_t counts[4]) {
  const __m512i hi = _mm512_set1_epi32(int(br.hi)), lo = _mm512_set1_epi32(int(br.lo));
  const __m512i lo1 = _mm512_set1_epi32(int(br.lo + 1u)), inner = _mm512_set1_epi32(int(br.inner));
  const __m512i inf = _mm512_set1_epi32(0x7f800000), abs_mask = _mm512_set1_epi32(0x7fffffff);
  const bool distinct = br.lo != br.hi;
  // The count above hi from a mask, on the scalar side, and NaN (bits above inf, so also
  // "above") only by a running maximum, recounted at the end of a block that has one: on Zen 4
  // this loop is bound by its vector instructions. (Taking the ends' counts only in vectors
  // with an element in [lo, hi] made bf16 inputs, whose magnitudes tie at the ends often, 30 %
  // slower: the branch mispredicts.)
  uint64_t above = 0;
  const __m512i one = _mm512_set1_epi32(1);
  __m512i at_hi = _mm512_setzero_si512(), at_lo = at_hi, top = at_hi;
  uint32_t inside = 0;
  auto magnitude_bits16 = [&](int64_t j) MELDKIT_AVX512_TARGET {
    __m512 d = load16(a + j);
    if constexpr (kHasBase) d = _mm512_sub_ps(d, load16(b + j));
    return _mm512_and_si512(_mm512_castps_si512(d), abs_mask);
  };
  for (int64_t j = 0; j < m; j += 16) {
    const __m512i bits = magnitude_bits16(j);
    above += uint64_t(__builtin_popcount(unsigned(_mm512_cmpgt_epu32_mask(bits, hi))));
    top = _mm512_max_epu32(top, bits);
    at_hi = _mm512_mask_add_epi32(at_hi, _mm512_cmpeq_epu32_mask(bits, hi), at_hi, one);
    if (distinct) {
      at_lo = _mm512_mask_add_epi32(at_lo, _mm512_cmpeq_epu32_mask(bits, lo), at_lo, one);
    }
    // lo < bits < hi, as (bits - lo - 1) < inner in unsigned arithmetic
    const __mmask16 in = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(bits, lo1), inner);
    if (in != 0) {
      _mm512_storeu_si512(packed + inside, _mm512_maskz_compress_epi32(in, bits));
      inside += uint32_t(__builtin_popcount(unsigned(in)));
    }
  }
  // Summed through memory: GCC 12's _mm512_reduce_add_epi32 warns on its own header.
  const __m512i sums[2] = {at_hi, at_lo};
  for (int c = 0; c < 2; ++c) {
    alignas(64) uint32_t lanes[16];
    _mm512_store_si512(lanes, sums[c]);
    for (uint32_t v : lanes) counts[1 + c] += v;
  }
  counts[0] += above;
  if (_mm512_cmpgt_epu32_mask(top, inf) != 0) {  // NaN in this block: count them
    uint64_t nans = 0;
    for (int64_t j = 0; j < m; j += 16) {
      nans +=
          uint64_t(__builtin_popcount(unsigned(_mm512_cmpgt_epu32_mask(magnitude_bits16(j), inf))));
    }
    counts[3] += nans;
  }
  return inside;
}

// One block's bracket counts and inside values for several models against one base, the
// models taken in turn for each 16 elements, as the merge pass walks its streams. On Zen 4 the
// pass that took one model's whole block at a time (bracket_block_avx512, still the single
// selection's) ran at about half the merge pass's bandwidth: taking the models in turn gained
// 10 %, storing the compressed inside values without a branch (it mispredicted in one vector
// in five) and the prefetch hints the rest of 15-25 %. The same counts and the same values, in
// the same order per model, as bracket_block_avx512 over each model's block. m is a multiple
// of 16; count <= kMaxFused.
constexpr int kMaxFused = 8;
struct FusedBracket {
  uint32_t hi, lo, inner;
  uint64_t above, at_hi, at_lo, nans;
  uint32_t inside;
  bool distinct;
};

template <typename T>
MELDKIT_AVX512_TARGET void bracket_models_avx512(const T* const* a, const float* __restrict b,
                                                 int count, int64_t m, FusedBracket* f,
                                                 uint32_t* const* packed) {
  const __m512i inf = _mm512_set1_epi32(0x7f800000), abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i hi[kMaxFused], lo[kMaxFused], lo1[kMaxFused], inner[kMaxFused];
  for (int t = 0; t < count; ++t) {
    hi[t] = _mm512_set1_epi32(int(f[t].hi));
    lo[t] = _mm512_set1_epi32(int(f[t].lo));
    lo1[t] = _mm512_set1_epi32(int(f[t].lo + 1u));
    inner[t] = _mm512_set1_epi32(int(f[t].inner));
  }
  __m512i top = _mm512_setzero_si512();
  for (int64_t j = 0; j < m; j += 16) {
    const __m512 bj = _mm512_loadu_ps(b + j);
    for (int t = 0; t < count; ++t) {
      FusedBracket& ft = f[t];
      prefetch_ahead(a[t] + j, kAhead * int64_t(sizeof(T)));
      const __m512i bits =
          _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(load16(a[t] + j), bj)), abs_mask);
      ft.above += uint64_t(__builtin_popcount(unsigned(_mm512_cmpgt_epu32_mask(bits, hi[t]))));
      ft.at_hi += uint64_t(__builtin_popcount(unsigned(_mm512_cmpeq_epu32_mask(bits, hi[t]))));
      if (ft.distinct) {
        ft.at_lo += uint64_t(__builtin_popcount(unsigned(_mm512_cmpeq_epu32_mask(bits, lo[t]))));
      }
      top = _mm512_max_epu32(top, bits);
      const __mmask16 in = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(bits, lo1[t]), inner[t]);
      _mm512_storeu_si512(packed[t] + ft.inside, _mm512_maskz_compress_epi32(in, bits));
      ft.inside += uint32_t(__builtin_popcount(unsigned(in)));
    }
  }
  if (_mm512_cmpgt_epu32_mask(top, inf) != 0) {  // NaN in this block: count them per model
    for (int t = 0; t < count; ++t) {
      for (int64_t j = 0; j < m; j += 16) {
        const __m512i bits = _mm512_and_si512(
            _mm512_castps_si512(_mm512_sub_ps(load16(a[t] + j), _mm512_loadu_ps(b + j))), abs_mask);
        f[t].nans += uint64_t(__builtin_popcount(unsigned(_mm512_cmpgt_epu32_mask(bits, inf))));
      }
    }
  }
}

MELDKIT_AVX512_END
#endif

// Scratch of one thread's bracket pass: a block's bits and flags (portable path) or its packed
// inside values (AVX-512 path, 16 slots of slack for the last compressed store).
struct BracketScratch {
  alignas(64) uint32_t block[kBracketBlock + 16];
  alignas(64) uint8_t flags[kBracketBlock];
};

// One block of one selection's bracket pass: its counts into local.counts and its inside values
// into local's kept buffer, by the AVX-512 path where the CPU has it (same counts, same values in
// the same order), else by bracket_block and the flag scan.
template <typename T, typename TB, bool kHasBase>
MELDKIT_ALWAYS_INLINE void bracket_and_keep(const T* a, const TB* b, int64_t m, const Bracket& br,
                                            BracketScratch& s, BracketLocal& local) {
#ifdef MELDKIT_AVX512_INTRINSICS
  if (cpu_has_avx512f()) {
    const int64_t body = m & ~int64_t(15);
    uint32_t inside = bracket_block_avx512<T, TB, kHasBase>(a, b, body, br, s.block, local.counts);
    local.keep_packed(s.block, inside, br.cap);
    if (body < m) {  // the tail, through the portable path
      inside = bracket_block<T, TB, kHasBase>(a + body, kHasBase ? b + body : b, m - body, br,
                                              s.block, s.flags, local.counts);
      local.keep(s.block, s.flags, m - body, inside, br.cap);
    }
    return;
  }
#endif
  const uint32_t inside =
      bracket_block<T, TB, kHasBase>(a, b, m, br, s.block, s.flags, local.counts);
  local.keep(s.block, s.flags, m, inside, br.cap);
}

// One selection over a list of tensors (a whole-model selection, or one tensor).
template <typename T>
BracketCounts bracket_pass(const MagnitudeSelectParams& p, const Bracket& br) {
  BracketCounts out;
#pragma omp parallel
  {
    run_side_writes();
    BracketLocal local;
    BracketScratch scratch;
    for (int i = 0; i < p.num_tensors; ++i) {
      const T* a = static_cast<const T*>(p.a[i]);
      const T* b = p.b ? static_cast<const T*>(p.b[i]) : nullptr;
      const int64_t n = p.numels[i];
      const int64_t num_blocks = (n + kBracketBlock - 1) / kBracketBlock;
      // Dynamic, as the merge pass: a core taken by other work does not stall the others.
#pragma omp for schedule(dynamic, 16) nowait
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t e0 = blk * kBracketBlock;
        const int64_t m = std::min(kBracketBlock, n - e0);
        if (b) {
          bracket_and_keep<T, T, true>(a + e0, b + e0, m, br, scratch, local);
        } else {
          bracket_and_keep<T, T, false>(a + e0, b, m, br, scratch, local);
        }
      }
    }
#pragma omp critical
    local.add_to(out);
  }
  return out;
}

// A block of the base widened to float32, in a clone of its own: written inline in the
// (uncloned) pass below it compiled for the baseline ISA only.
template <typename T>
MELDKIT_CPU_CLONES_AVX512 void widen_block(const T* __restrict src, int64_t m,
                                           float* __restrict dst) {
  for (int64_t o = 0; o < m * int64_t(sizeof(T)); o += 64) {  // the next block's lines
    prefetch_ahead(src, m * int64_t(sizeof(T)) + o);
  }
  for (int64_t j = 0; j < m; ++j) dst[j] = float(widen(src[j]));
}

// The per-tensor selections of several models against one base in one pass: each block of the
// base is read and widened once, then every model's block is bracketed against it, so the base
// streams from memory once instead of once per model.
template <typename T>
// With `ends` (mergekit's exactly-k rule wanted), each block's counts of values equal to each
// bracket end are kept too: ends[(blk * count + i) * 2 + {0, 1}] = {at_hi, at_lo} of model
// which[i], so a threshold that falls on an end finds its ties without another pass; and the
// kept values carry their blocks (BracketCounts::marks), so one inside the bracket does too.
std::vector<BracketCounts> bracket_pass_models(const T* base, const T* const* models,
                                               const std::vector<int>& which,
                                               const Bracket* brackets, int64_t n,
                                               std::vector<uint32_t>* ends = nullptr) {
  const int count = int(which.size());
  std::vector<BracketCounts> out(static_cast<size_t>(count));
  const int64_t num_blocks = (n + kBracketBlock - 1) / kBracketBlock;
  if (ends != nullptr) ends->assign(size_t(num_blocks) * size_t(count) * 2, 0u);
#pragma omp parallel
  {
    run_side_writes();
    std::vector<BracketLocal> local(static_cast<size_t>(count));
    alignas(64) float bw[kBracketBlock];
    BracketScratch scratch;
#ifdef MELDKIT_AVX512_INTRINSICS
    const bool fused_avx = cpu_has_avx512f();
    std::vector<FusedBracket> fb(fused_avx ? size_t(count) : 0);
    std::vector<std::vector<uint32_t>> packed(fused_avx ? size_t(count) : 0);
    std::vector<uint32_t*> packed_ptr(packed.size());
    std::vector<const T*> a_ptr(packed.size());
    for (size_t i = 0; i < fb.size(); ++i) {
      const Bracket& br = brackets[which[i]];
      fb[i].hi = br.hi;
      fb[i].lo = br.lo;
      fb[i].inner = br.inner;
      fb[i].distinct = br.lo != br.hi;
      packed[i].resize(size_t(kBracketBlock) + 16);
      packed_ptr[i] = packed[i].data();
    }
#endif
#pragma omp for schedule(dynamic, 16) nowait
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      const int64_t e0 = blk * kBracketBlock;
      const int64_t m = std::min(kBracketBlock, n - e0);
      widen_block(base + e0, m, bw);
#ifdef MELDKIT_AVX512_INTRINSICS
      if (fused_avx && m == kBracketBlock) {
        for (int i = 0; i < count; ++i) {
          FusedBracket& f = fb[size_t(i)];
          f.above = f.at_hi = f.at_lo = f.nans = 0;
          f.inside = 0;
          a_ptr[size_t(i)] = models[which[size_t(i)]] + e0;
        }
        for (int i0 = 0; i0 < count; i0 += kMaxFused) {
          bracket_models_avx512<T>(a_ptr.data() + i0, bw, std::min(kMaxFused, count - i0), m,
                                   fb.data() + i0, packed_ptr.data() + i0);
        }
        for (int i = 0; i < count; ++i) {
          const FusedBracket& f = fb[size_t(i)];
          BracketLocal& l = local[size_t(i)];
          l.counts[0] += f.above;
          l.counts[1] += f.at_hi;
          l.counts[2] += f.at_lo;
          l.counts[3] += f.nans;
          const size_t kept0 = l.kept.size();
          l.keep_packed(packed_ptr[size_t(i)], f.inside, brackets[which[size_t(i)]].cap);
          if (ends != nullptr) {
            uint32_t* e = ends->data() + (size_t(blk) * size_t(count) + size_t(i)) * 2;
            e[0] = uint32_t(f.at_hi);
            e[1] = uint32_t(f.at_lo);
            if (l.kept.size() > kept0) l.marks.emplace_back(blk, uint32_t(l.kept.size() - kept0));
          }
        }
        continue;
      }
#endif
      for (int i = 0; i < count; ++i) {
        const Bracket& br = brackets[which[size_t(i)]];
        BracketLocal& l = local[size_t(i)];
        const uint64_t hi0 = l.counts[1], lo0 = l.counts[2];
        const size_t kept0 = l.kept.size();
        bracket_and_keep<T, float, true>(models[which[size_t(i)]] + e0, bw, m, br, scratch, l);
        if (ends != nullptr) {
          uint32_t* e = ends->data() + (size_t(blk) * size_t(count) + size_t(i)) * 2;
          e[0] = uint32_t(l.counts[1] - hi0);
          e[1] = uint32_t(l.counts[2] - lo0);
          if (l.kept.size() > kept0) l.marks.emplace_back(blk, uint32_t(l.kept.size() - kept0));
        }
      }
    }
#pragma omp critical
    for (int i = 0; i < count; ++i) local[size_t(i)].add_to(out[size_t(i)]);
  }
  return out;
}

// The bracket [lo, hi] from a strided sample, +-4 standard deviations of the sample quantile,
// and the keep buffer's size: twice the expected count inside (2·delta of m sample ranks).
template <typename T>
bool sample_bracket(const MagnitudeSelectParams& p, int64_t total, Bracket* br) {
  const int64_t m = sample_size(total);
  std::vector<uint32_t> sample(static_cast<size_t>(m));
  std::vector<int64_t> starts(size_t(p.num_tensors) + 1, 0);  // global index of each first element
  for (int i = 0; i < p.num_tensors; ++i) starts[size_t(i) + 1] = starts[size_t(i)] + p.numels[i];
  // In parallel (every caller has at least kBracketMinNumel elements): the sample touches every
  // page of the inputs once (a page fault each on a fresh memory map) and misses the cache at
  // every element, which one thread paid alone before. (Parallel only from a sample of 8192,
  // one thread faulted in whole memory-mapped checkpoint tensors of up to 4M elements:
  // `meldkit merge` of TIES 10-15 % slower end to end.)
  int nan_found = 0;
#pragma omp parallel for schedule(static) reduction(| : nan_found)
  for (int64_t j = 0; j < m; ++j) {
    const int64_t g = int64_t((double(j) + 0.5) * double(total) / double(m));
    // The last tensor starting at or before g (empty tensors share their start with the next).
    const int tensor = int(std::upper_bound(starts.begin(), starts.end(), g) - starts.begin()) - 1;
    const int64_t e = g - starts[size_t(tensor)];
    const T* a = static_cast<const T*>(p.a[tensor]);
    const T* b = p.b ? static_cast<const T*>(p.b[tensor]) : nullptr;
    sample[size_t(j)] = magnitude_bits(widen(a[e]), b ? widen(b[e]) : 0.f);
    nan_found |= int(sample[size_t(j)] > 0x7f800000u);
  }
  if (nan_found) return false;  // NaN: the radix path reports it
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
  br->hi = hi_rank < 0 ? 0xffffffffu : desc(hi_rank);
  br->lo = lo_rank >= m ? 0u : desc(lo_rank);
  br->inner = br->hi - br->lo >= 2u ? br->hi - br->lo - 1u : 0u;
  br->cap = size_t(double(total) * 4.0 * delta / double(m)) + 4096;
  return true;
}

// The r-th largest (1-based) of `kept`, values v with lo < v < hi: a histogram of at most 4096
// bins over (lo, hi) finds the bin that holds it, and nth_element picks it among that bin's
// values only (nth_element over all of them cost 1.5 ms for 250 000 values). Reorders `kept`.
inline uint32_t kth_largest_inside(std::vector<uint32_t>& kept, const Bracket& br, int64_t r) {
  constexpr int kBinBits = 12;
  const uint32_t base = br.lo + 1u;  // the smallest possible value
  int shift = 0;
  while ((uint64_t(br.inner) >> shift) >= (uint64_t(1) << kBinBits)) ++shift;
  std::vector<uint32_t> hist((size_t(1) << kBinBits), 0u);
  for (const uint32_t v : kept) ++hist[(v - base) >> shift];
  int64_t above = 0;  // values in the bins above
  size_t bin = hist.size();
  while (bin-- > 0 && above + int64_t(hist[bin]) < r) above += int64_t(hist[bin]);
  // The values of that bin to the front, then the (r - above)-th largest among them.
  auto end = std::partition(kept.begin(), kept.end(),
                            [&](uint32_t v) { return ((v - base) >> shift) == bin; });
  auto it = end - (r - above);
  std::nth_element(kept.begin(), it, end);
  return *it;
}

// The k-th largest from a bracket pass's counts; false when the bracket missed it (or its buffer
// overflowed): the caller then takes the radix path.
inline bool bracket_resolve(BracketCounts& c, const Bracket& br, int64_t k, uint32_t* bits) {
  if (c.nans > 0) throw_value_error("magnitude_select: the task vectors contain NaN");
  if (c.overflow) return false;
  int64_t r = k - int64_t(c.above);  // rank among the elements <= hi
  if (r <= 0) return false;
  if (r <= int64_t(c.at_hi)) {
    *bits = br.hi;
    return true;
  }
  r -= int64_t(c.at_hi);
  const int64_t inside = int64_t(c.kept.size());
  if (r <= inside) {  // the r-th largest inside
    *bits = kth_largest_inside(c.kept, br, r);
    return true;
  }
  if (r - inside > int64_t(c.at_lo)) return false;
  *bits = br.lo;
  return true;
}

template <typename T>
bool magnitude_select_bracketed(const MagnitudeSelectParams& p, int64_t total, uint32_t* bits) {
  Bracket br;
  if (!sample_bracket<T>(p, total, &br)) return false;
  BracketCounts c = bracket_pass<T>(p, br);
  return bracket_resolve(c, br, p.k, bits);
}

template <typename T>
uint32_t magnitude_select_radix(const MagnitudeSelectParams& p);

// Small inputs: every magnitude's bits in one buffer and a linear-time selection of the k-th
// largest (the same value as the radix path: the bits of non-negative floats sort as the floats).
// The radix path has a fixed cost per selection (per thread, two 2^16-bin histograms zeroed,
// merged and scanned) that dominates small inputs. A TIES merge of 3 models (3 selections, Zen 4,
// 2 threads) took 0.07 against 0.44 ms at 4096 elements, 0.21 against 0.47 ms at 16384, and
// 0.77 against 0.51 ms at 32768.
constexpr int64_t kSmallSelectNumel = int64_t(1) << 14;

template <typename T>
uint32_t magnitude_select_small(const MagnitudeSelectParams& p, int64_t total) {
  std::vector<uint32_t> all;
  all.reserve(size_t(total));
  uint32_t nans = 0;
  for (int i = 0; i < p.num_tensors; ++i) {
    const T* a = static_cast<const T*>(p.a[i]);
    const T* b = p.b ? static_cast<const T*>(p.b[i]) : nullptr;
    for (int64_t j = 0; j < p.numels[i]; ++j) {
      const uint32_t bits = magnitude_bits(widen(a[j]), b ? widen(b[j]) : 0.f);
      nans += bits > 0x7f800000u;
      all.push_back(bits);
    }
  }
  if (nans > 0) throw_value_error("magnitude_select: the task vectors contain NaN");
  auto it = all.end() - p.k;
  std::nth_element(all.begin(), it, all.end());
  return *it;
}

template <typename T>
uint32_t magnitude_select_typed(const MagnitudeSelectParams& p) {
  int64_t total = 0;
  for (int i = 0; i < p.num_tensors; ++i) total += p.numels[i];
  if (total <= kSmallSelectNumel && p.k >= 1 && p.k <= total) {
    return magnitude_select_small<T>(p, total);
  }
  uint32_t bits = 0;
  if (total >= kBracketMinNumel && p.k <= total && magnitude_select_bracketed<T>(p, total, &bits)) {
    return bits;
  }
  return magnitude_select_radix<T>(p);
}

// Two radix-histogram passes: the path for small inputs, and when a bracket misses.
template <typename T>
uint32_t magnitude_select_radix(const MagnitudeSelectParams& p) {
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

// Per-tensor selections of several models against one base: samples per model, one fused
// bracket pass for all whose sample is usable, then the single-selection path for the others
// and for any bracket that missed.
// The index one past the r-th (1-based) element of [begin, end) whose |a - b| bits are `thr`.
template <typename T>
int64_t nth_tie_index(const T* a, const T* b, int64_t begin, int64_t end, uint32_t thr, int64_t r) {
  for (int64_t e = begin; e < end; ++e) {
    if (magnitude_bits(widen(a[e]), widen(b[e])) == thr && --r == 0) return e + 1;
  }
  return end;  // not reached when the counts are right
}

template <typename T>
void magnitude_select_models_typed(const void* base, const void* const* models, int num_models,
                                   int64_t numel, DType dtype, const int64_t* ks, uint32_t* bits,
                                   int64_t* cutoffs) {
  std::vector<MagnitudeSelectParams> single(static_cast<size_t>(num_models));
  std::vector<Bracket> brackets(static_cast<size_t>(num_models));
  std::vector<int> fused;
  for (int t = 0; t < num_models; ++t) {
    MagnitudeSelectParams& q = single[size_t(t)];
    q.num_tensors = 1;
    q.a = &models[t];
    q.b = &base;
    q.numels = &numel;
    q.dtype = dtype;
    q.k = ks[t];
    if (numel >= kBracketMinNumel && ks[t] <= numel &&
        sample_bracket<T>(q, numel, &brackets[size_t(t)])) {
      fused.push_back(t);
    }
  }
  std::vector<bool> done(static_cast<size_t>(num_models), false);
  if (!fused.empty()) {
    std::vector<const T*> typed(static_cast<size_t>(num_models));
    for (int t = 0; t < num_models; ++t) typed[size_t(t)] = static_cast<const T*>(models[t]);
    std::vector<uint32_t> ends;
    std::vector<BracketCounts> counts =
        bracket_pass_models<T>(static_cast<const T*>(base), typed.data(), fused, brackets.data(),
                               numel, cutoffs != nullptr ? &ends : nullptr);
    const int64_t num_fused = int64_t(fused.size());
    // The kept values in their marks' order (bracket_resolve reorders, not resizes, them).
    std::vector<std::vector<uint32_t>> in_orders(cutoffs != nullptr ? fused.size() : 0);
    for (size_t i = 0; i < in_orders.size(); ++i) in_orders[i] = counts[i].kept;
    for (const BracketCounts& c : counts) {  // before the parallel loop, which cannot throw
      if (c.nans > 0) throw_value_error("magnitude_select: the task vectors contain NaN");
    }
    std::vector<uint8_t> resolved(fused.size(), 0);
#pragma omp parallel for schedule(dynamic, 1) if (num_fused > 1)
    for (int64_t i = 0; i < num_fused; ++i) {
      const int t = fused[size_t(i)];
      resolved[size_t(i)] =
          uint8_t(bracket_resolve(counts[size_t(i)], brackets[size_t(t)], ks[t], &bits[size_t(t)]));
    }
    for (size_t i = 0; i < fused.size(); ++i) {
      const int t = fused[i];
      const Bracket& br = brackets[size_t(t)];
      BracketCounts& c = counts[i];
      const size_t inside = c.kept.size();
      done[size_t(t)] = resolved[i] != 0;
      if (cutoffs == nullptr || !done[size_t(t)]) continue;
      const std::vector<uint32_t>& in_order = in_orders[i];
      // A threshold on an end of the bracket: its ties and the values above it are counted.
      const uint32_t thr = bits[size_t(t)];
      int end_slot = -1;
      int64_t above = 0, ties = 0;
      if (thr == br.hi) {
        end_slot = 0;
        above = int64_t(c.above);
        ties = int64_t(c.at_hi);
      } else if (thr == br.lo) {
        end_slot = 1;
        above = int64_t(c.above + c.at_hi + inside);
        ties = int64_t(c.at_lo);
      }
      if (end_slot < 0) {
        // Inside the bracket: every tie is a kept value, traced to its block by the marks.
        above = int64_t(c.above + c.at_hi);
        std::vector<int64_t> tie_blocks;
        size_t off = 0;
        for (const auto& [blk, cnt] : c.marks) {
          for (size_t j = off; j < off + cnt; ++j) {
            above += in_order[j] > thr;
            if (in_order[j] == thr) tie_blocks.push_back(blk);
          }
          off += cnt;
        }
        if (off != in_order.size()) continue;  // marks incomplete: the counting pass decides
        const int64_t r = ks[t] - above;       // ties to keep; 1 <= r for the k-th largest
        if (r >= int64_t(tie_blocks.size()) || r <= 0) {
          cutoffs[t] = r <= 0 ? 0 : numel;
          continue;
        }
        std::sort(tie_blocks.begin(), tie_blocks.end());
        const int64_t blk = tie_blocks[size_t(r - 1)];  // the r-th tie in index order
        int64_t before = 0;                             // ties in earlier blocks
        while (tie_blocks[size_t(before)] < blk) ++before;
        const int64_t e0 = blk * kBracketBlock;
        cutoffs[t] = nth_tie_index(typed[size_t(t)], static_cast<const T*>(base), e0,
                                   std::min(numel, e0 + kBracketBlock), thr, r - before);
        continue;
      }
      const int64_t r = ks[t] - above;
      if (r >= ties) {
        cutoffs[t] = numel;
        continue;
      }
      int64_t seen = 0;
      const int64_t num_blocks = (numel + kBracketBlock - 1) / kBracketBlock;
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t here = ends[(size_t(blk) * fused.size() + i) * 2 + size_t(end_slot)];
        if (seen + here >= r) {
          const int64_t e0 = blk * kBracketBlock;
          cutoffs[t] = nth_tie_index(typed[size_t(t)], static_cast<const T*>(base), e0,
                                     std::min(numel, e0 + kBracketBlock), thr, r - seen);
          break;
        }
        seen += here;
      }
    }
  }
  for (int t = 0; t < num_models; ++t) {
    if (done[size_t(t)]) continue;
    const bool sampled = std::find(fused.begin(), fused.end(), t) != fused.end();
    bits[t] = sampled ? magnitude_select_radix<T>(single[size_t(t)])  // the bracket missed
                      : magnitude_select_typed<T>(single[size_t(t)]);
  }
}

// Counts of one block of one model against its threshold: |tau| bits above it and equal to it.
template <typename T>
MELDKIT_CPU_CLONES_AVX512 void tie_count_block(const T* __restrict a, const float* __restrict b,
                                               int64_t m, uint32_t thr, uint64_t* above,
                                               uint64_t* equal) {
  uint32_t ab = 0, eq = 0;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t bits = magnitude_bits(widen(a[j]), b[j]);
    ab += bits > thr;
    eq += bits == thr;
  }
  *above += ab;
  *equal += eq;
}

template <typename T>
void magnitude_tie_cutoffs_typed(const void* base_ptr, const void* const* models, int num_models,
                                 int64_t numel, const uint32_t* bits, const int64_t* ks,
                                 int64_t* cutoffs) {
  const T* base = static_cast<const T*>(base_ptr);
  std::vector<int> which;  // the models whose k leaves some elements out
  for (int t = 0; t < num_models; ++t) {
    cutoffs[t] = numel;
    if (ks[t] > 0 && ks[t] < numel) which.push_back(t);
  }
  if (which.empty()) return;
  const int count = int(which.size());
  const int64_t num_chunks = (numel + kChunk - 1) / kChunk;
  std::vector<uint64_t> above(size_t(num_chunks) * size_t(count), 0);
  std::vector<uint64_t> equal(above.size(), 0);
#pragma omp parallel if (numel >= kParallelMinNumel)
  {
    run_side_writes();
    alignas(64) float bw[kBracketBlock];
#pragma omp for schedule(dynamic) nowait
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t end = std::min(numel, (c + 1) * kChunk);
      for (int64_t e0 = c * kChunk; e0 < end; e0 += kBracketBlock) {
        const int64_t m = std::min(kBracketBlock, end - e0);
        widen_block(base + e0, m, bw);
        for (int i = 0; i < count; ++i) {
          const int t = which[size_t(i)];
          const size_t slot = size_t(c) * size_t(count) + size_t(i);
          tie_count_block(static_cast<const T*>(models[t]) + e0, bw, m, bits[t], &above[slot],
                          &equal[slot]);
        }
      }
    }
  }
  for (int i = 0; i < count; ++i) {
    const int t = which[size_t(i)];
    uint64_t total_above = 0, total_equal = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      total_above += above[size_t(c) * size_t(count) + size_t(i)];
      total_equal += equal[size_t(c) * size_t(count) + size_t(i)];
    }
    // The threshold is the ks[t]-th largest, so above < k <= above + equal.
    const int64_t r = ks[t] - int64_t(total_above);  // ties to keep, in index order
    if (r >= int64_t(total_equal)) continue;         // all of them: no cutoff
    if (r <= 0) {
      cutoffs[t] = 0;
      continue;
    }
    int64_t seen = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t here = int64_t(equal[size_t(c) * size_t(count) + size_t(i)]);
      if (seen + here < r) {
        seen += here;
        continue;
      }
      cutoffs[t] = nth_tie_index(static_cast<const T*>(models[t]), base, c * kChunk,
                                 std::min(numel, (c + 1) * kChunk), bits[t], r - seen);
      break;
    }
  }
}

}  // namespace

void magnitude_tie_cutoffs_cpu(const void* base, const void* const* models, int num_models,
                               int64_t numel, DType dtype, const uint32_t* bits, const int64_t* ks,
                               int64_t* cutoffs) {
  MELDKIT_DISPATCH_FLOAT(dtype, "magnitude_tie_cutoffs", "models", T, {
    magnitude_tie_cutoffs_typed<T>(base, models, num_models, numel, bits, ks, cutoffs);
  });
}

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

uint64_t magnitude_histogram_cpu(const MagnitudeSelectParams& p, int64_t prefix, uint64_t* hist) {
  std::vector<uint64_t> h(kRadixBins);
  uint64_t nans = 0;
  MELDKIT_DISPATCH_FLOAT(p.dtype, "magnitude_histogram", "theta", T,
                         { nans = radix_histogram<T>(p, prefix < 0 ? 16 : 0, prefix, h); });
  for (int d = 0; d < kRadixBins; ++d) hist[d] += h[size_t(d)];
  return nans;
}

void magnitude_select_models_cpu(const void* base, const void* const* models, int num_models,
                                 int64_t numel, DType dtype, const int64_t* ks, uint32_t* bits,
                                 int64_t* cutoffs) {
  if (cutoffs != nullptr) std::fill(cutoffs, cutoffs + num_models, int64_t(-1));
  MELDKIT_DISPATCH_FLOAT(dtype, "magnitude_select", "a", T, {
    magnitude_select_models_typed<T>(base, models, num_models, numel, dtype, ks, bits, cutoffs);
  });
}

}  // namespace meldkit
