// CPU weighted_sum: OpenMP over tiles of elements. Each tile's running sum lives in a small stack
// buffer (L1-resident), and every input is streamed through it once, so the loop reads each
// input exactly once and writes the output once, whatever N is.
#include <algorithm>
#include <vector>

#include "meldkit/weighted_sum.h"

namespace meldkit {
namespace {

constexpr int64_t kTile = 2048;                 // elements per tile: 8 KB of fp32 accumulators
constexpr int64_t kParallelMinNumel = 1 << 15;  // below this, threading costs more than it saves

template <typename TIn, typename TOut>
void weighted_sum_tiles(const WeightedSumParams& p) {
  using Acc = acc_t<TIn>;
  const TIn* const* in = reinterpret_cast<const TIn* const*>(p.inputs);
  TOut* out = static_cast<TOut*>(p.out);
  const int64_t num_tiles = (p.numel + kTile - 1) / kTile;

#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinNumel)
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int64_t begin = tile * kTile;
    const int64_t len = std::min(kTile, p.numel - begin);
    Acc acc[kTile];
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

}  // namespace

void weighted_sum_cpu(const WeightedSumParams& p) {
  if (p.numel == 0) return;
  MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(p.in_dtype, "weighted_sum", "tensors", TIn, {
    MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(p.out_dtype, "weighted_sum", "out", TOut,
                                      { weighted_sum_tiles<TIn, TOut>(p); });
  });
}

}  // namespace meldkit
