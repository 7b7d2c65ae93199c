// CPU weighted_sum: OpenMP over chunks of the elements; within a chunk, tiles of kTile elements
// whose sums live in an L1-resident buffer while every input is streamed through it once. Each
// input is read once and the output written once, whatever N is. The per-tile loops run over a
// runtime length, which GCC vectorises (a fully unrolled 16-element block did not vectorise the
// fp16/bf16 conversions and measured 2-4x slower for them).
#include <algorithm>

#include "meldkit/weighted_sum.h"

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

template <typename TIn, typename TOut>
void weighted_sum_chunks(const WeightedSumParams& p) {
  const int64_t num_tiles = (p.numel + kTile - 1) / kTile;
  const int64_t num_chunks = (num_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinNumel)
  for (int64_t c = 0; c < num_chunks; ++c) {
    weighted_sum_tiles<TIn, TOut>(p, c * kTilesPerChunk,
                                  std::min(num_tiles, (c + 1) * kTilesPerChunk));
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
