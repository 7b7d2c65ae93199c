// CPU weighted_sum: OpenMP over chunks of the elements; within a chunk, tiles of kTile elements
// whose sums live in an L1-resident buffer while every input is streamed through it once. Each
// input is read once and the output written once, whatever N is. The per-tile loops run over a
// runtime length, which GCC vectorises (a fully unrolled 16-element block did not vectorise the
// fp16/bf16 conversions and measured 2-4x slower for them).
#include <algorithm>
#include <type_traits>

#include "meldkit/weighted_sum.h"

// float16 inputs on x86-64: the software conversion (dtype.h: exact under FTZ/DAZ, vectorises)
// costs about ten operations per element, so a float16 sum ran at a third of a bfloat16 one.
// CPUs with F16C convert 8 halves in one instruction, exactly (half subnormals are converted
// whatever MXCSR's DAZ says; tests/ops/test_denormal_modes.py runs this path under FTZ/DAZ).
#if !defined(__CUDACC__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MELDKIT_WS_F16C 1
#endif

namespace meldkit {
namespace {

constexpr int64_t kTile = 512;                  // elements per tile: 2 KB of fp32 sums
constexpr int64_t kTilesPerChunk = 32;          // 16K elements per OpenMP work item
constexpr int64_t kParallelMinNumel = 1 << 15;  // below this, threading costs more than it saves

// Tiles [first, last) of the output.
template <typename TIn, typename TOut>
MELDKIT_CPU_CLONES void weighted_sum_tiles(const WeightedSumParams& p, int64_t first,
                                           int64_t last) {
  using Acc = acc_t<TIn>;
  const auto* const* in = reinterpret_cast<const TIn* const*>(p.inputs);
  auto* out = static_cast<TOut*>(p.out);
  Acc acc[kTile];
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t begin = tile * kTile;
    const int64_t len = std::min(kTile, p.numel - begin);
    const TIn* x0 = in[0] + begin;
    const float w0 = p.weights[0];
    for (int64_t j = 0; j < len; ++j) acc[j] = weighted_sum_first(w0, widen(x0[j]));
    for (int i = 1; i < p.num_inputs; ++i) {
      const TIn* x = in[i] + begin;
      const float w = p.weights[i];
      for (int64_t j = 0; j < len; ++j) acc[j] = weighted_sum_step(acc[j], w, widen(x[j]));
    }
    // `out` may be one of the inputs: every read of this tile happened above.
    TOut* o = out + begin;
    for (int64_t j = 0; j < len; ++j) o[j] = Store<TOut>::from(acc[j]);
  }
}

#ifdef MELDKIT_WS_F16C
inline bool cpu_has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}

// weighted_sum_tiles for float16 inputs with F16C: the same products and sums, in the same
// order (mul then add, no contraction), 8 lanes at a time; a float16 output is rounded by the
// hardware to nearest even (the software's rule) and NaNs are written as the software writes
// them (its quiet NaN), so the bits are the portable path's.
template <typename TOut>
__attribute__((target("avx2,f16c"))) void weighted_sum_tiles_f16c(const WeightedSumParams& p,
                                                                  int64_t first, int64_t last) {
  const auto* const* in = reinterpret_cast<const f16_t* const*>(p.inputs);
  auto* out = static_cast<TOut*>(p.out);
  alignas(32) float acc[kTile];
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t begin = tile * kTile;
    const int64_t len = std::min(kTile, p.numel - begin);
    const int64_t body = len & ~int64_t(7);
    for (int i = 0; i < p.num_inputs; ++i) {
      const f16_t* x = in[i] + begin;
      const float w = p.weights[i];
      const __m256 wv = _mm256_set1_ps(w);
      for (int64_t j = 0; j < body; j += 8) {
        const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j)));
        const __m256 prod = _mm256_mul_ps(wv, xv);
        _mm256_store_ps(acc + j, i == 0 ? prod : _mm256_add_ps(_mm256_load_ps(acc + j), prod));
      }
      for (int64_t j = body; j < len; ++j) {
        acc[j] =
            i == 0 ? weighted_sum_first(w, widen(x[j])) : weighted_sum_step(acc[j], w, widen(x[j]));
      }
    }
    // `out` may be one of the inputs: every read of this tile happened above.
    TOut* o = out + begin;
    if constexpr (std::is_same_v<TOut, f16_t>) {
      for (int64_t j = 0; j < body; j += 8) {
        const __m256 v = _mm256_load_ps(acc + j);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
          for (int64_t k = j; k < j + 8; ++k) o[k] = Store<f16_t>::from(acc[k]);
        }
      }
      for (int64_t j = body; j < len; ++j) o[j] = Store<f16_t>::from(acc[j]);
    } else {
      for (int64_t j = 0; j < len; ++j) o[j] = Store<TOut>::from(acc[j]);
    }
  }
}
#endif

template <typename TIn, typename TOut>
void weighted_sum_chunks(const WeightedSumParams& p) {
  const int64_t num_tiles = (p.numel + kTile - 1) / kTile;
  const int64_t num_chunks = (num_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinNumel)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t first = c * kTilesPerChunk, last = std::min(num_tiles, first + kTilesPerChunk);
#ifdef MELDKIT_WS_F16C
    if constexpr (std::is_same_v<TIn, f16_t>) {
      if (cpu_has_f16c()) {
        weighted_sum_tiles_f16c<TOut>(p, first, last);
        continue;
      }
    }
#endif
    weighted_sum_tiles<TIn, TOut>(p, first, last);
  }
}

}  // namespace

void weighted_sum_cpu(const WeightedSumParams& p) {
  if (p.numel == 0) return;
  MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(p.in_dtype, "weighted_sum", "tensors", TIn, {
    MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(p.out_dtype, "weighted_sum", "out", TOut,
                                      { weighted_sum_chunks<TIn, TOut>(p); });
  });
}

}  // namespace meldkit
