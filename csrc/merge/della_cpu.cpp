// DELLA's MagPrune on the CPU (algorithm: merge.h, "DELLA's MagPrune"): per row, the ranks of the
// magnitudes from a stable LSD radix sort of the float32 bits of |tau| (for non-negative floats
// the bit order is the value order; stability keeps equal magnitudes in index order, as the
// reference's stable sort), then each element's keep probability from its rank and the
// counter-based draw. OpenMP over rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "meldkit/macros.h"
#include "meldkit/merge.h"
#include "meldkit/random.h"
#include "meldkit/status.h"

namespace meldkit {
namespace {

constexpr int kDigitBits = 8;  // 256 bins: cheap to clear and scan for rows of a few thousand
constexpr uint32_t kDigitBins = 1u << kDigitBits;

// Indices 0 … n-1 in ascending order of key (stable: equal keys keep index order), by an LSD radix
// sort over four 8-bit digits: the four histograms in one pass, then one scatter per digit that
// the keys do not all share, ping-ponging between (key, idx) and the scratch arrays. Returns the
// array that holds the order (idx or idx2).
uint32_t* radix_order(uint32_t* key, uint32_t* idx, uint32_t* key2, uint32_t* idx2, int64_t n,
                      uint32_t* hist /* [4 * kDigitBins] */) {
  constexpr int kDigits = 32 / kDigitBits;
  std::fill(hist, hist + kDigits * kDigitBins, 0u);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t k = key[j];
    for (int d = 0; d < kDigits; ++d) ++hist[d * kDigitBins + ((k >> (d * kDigitBits)) & 0xffu)];
    idx[j] = uint32_t(j);
  }
  uint32_t *src_k = key, *src_i = idx, *dst_k = key2, *dst_i = idx2;
  for (int d = 0; d < kDigits; ++d) {
    uint32_t* h = hist + d * kDigitBins;
    const int shift = d * kDigitBits;
    if (h[(src_k[0] >> shift) & 0xffu] == uint32_t(n)) continue;  // every key has this digit
    uint32_t sum = 0;
    for (uint32_t b = 0; b < kDigitBins; ++b) {
      const uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t k = src_k[j];
      const uint32_t slot = h[(k >> shift) & 0xffu]++;
      dst_k[slot] = k;
      dst_i[slot] = src_i[j];
    }
    std::swap(src_k, dst_k);
    std::swap(src_i, dst_i);
  }
  return src_i;
}

// One row's draws and writes, in index order: element j is kept when its draw falls below
// prob[rank[j]]. Adds the row's sums of |tau| and of the kept |tau| (float64, kL1Lanes interleaved
// sums: a fixed order) to sums[0], sums[1].
template <typename T>
MELDKIT_CPU_CLONES void della_write(const DellaSelectParams& p, int64_t r0, int64_t n,
                                    const uint32_t* rank, const float* prob, uint32_t key,
                                    uint8_t* kept_flags, float* abs_tau, float* abs_kept,
                                    double* sums) {
  const T* theta = static_cast<const T*>(p.theta);
  const T* base = static_cast<const T*>(p.base);
  T* out = static_cast<T*>(p.out);
  // The draws' high-word hash once per row when the row stays within one 2^32 block of
  // elements (always, short of 4-billion-element tensors); per element otherwise.
  if ((uint64_t(r0) >> 32) == (uint64_t(r0 + n - 1) >> 32)) {
    const uint32_t high = uniform01_high(uint64_t(r0));
    for (int64_t j = 0; j < n; ++j) {
      kept_flags[j] = uniform01_from_high(key, high, uint64_t(r0 + j)) < prob[rank[j]] ? 1 : 0;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      kept_flags[j] = uniform01(key, uint64_t(r0 + j)) < prob[rank[j]] ? 1 : 0;
    }
  }
  // The writes, |tau| and its kept part in a loop of contiguous accesses (it vectorises), then
  // the float64 lane sums over those arrays: fused into one loop, GCC assembled each vector of
  // the sums element by element (as it did in DARE's L1 pass).
  for (int64_t j = 0; j < n; ++j) {
    const float a = std::fabs(widen(theta[r0 + j]) - widen(base[r0 + j]));
    out[r0 + j] = kept_flags[j] ? theta[r0 + j] : base[r0 + j];
    abs_tau[j] = a;
    abs_kept[j] = kept_flags[j] ? a : 0.f;
  }
  double all[kL1Lanes] = {}, kept[kL1Lanes] = {};
  add_lane_sums(abs_tau, abs_kept, n, all, kept);
  double total = 0.0, total_kept = 0.0;
  for (int k = 0; k < kL1Lanes; ++k) {
    total += all[k];
    total_kept += kept[k];
  }
  sums[0] = total;
  sums[1] = total_kept;
}

template <typename T>
void della_typed(const DellaSelectParams& p) {
  const T* theta = static_cast<const T*>(p.theta);
  const T* base = static_cast<const T*>(p.base);
  const int64_t n = p.row_len;
  const int64_t rows = n > 0 ? p.numel / n : 0;
  const uint32_t key = stream_key(p.seed, p.stream);
  // The keep probability of each rank, as the reference computes it:
  // float32((d - eps) + (2 eps) * (r / (n - 1))), r / (n - 1) = 0 for one-element rows.
  std::vector<float> prob(size_t(std::max<int64_t>(n, 0)));
  const double low = p.density - p.epsilon, span = 2.0 * p.epsilon, denom = double(n - 1);
  for (int64_t r = 0; r < n; ++r) {
    prob[size_t(r)] = float(low + span * (n > 1 ? double(r) / denom : 0.0));
  }
  std::vector<double> row_sums(size_t(2 * rows), 0.0);
#pragma omp parallel
  {
    const size_t m = size_t(std::max<int64_t>(n, 0));
    std::vector<uint32_t> keys(m), order(m), keys2(m), order2(m), rank(m);
    std::vector<uint32_t> hist(4 * kDigitBins);
    std::vector<uint8_t> kept_flags(m);
    std::vector<float> abs_tau(m), abs_kept(m);
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t r0 = row * n;
      for (int64_t j = 0; j < n; ++j) {  // |tau| >= 0: its float32 bits sort as its value
        keys[size_t(j)] = float_as_bits(std::fabs(widen(theta[r0 + j]) - widen(base[r0 + j])));
      }
      const uint32_t* sorted =
          radix_order(keys.data(), order.data(), keys2.data(), order2.data(), n, hist.data());
      for (int64_t r = 0; r < n; ++r) rank[sorted[r]] = uint32_t(r);  // rank, in index order
      della_write<T>(p, r0, n, rank.data(), prob.data(), key, kept_flags.data(), abs_tau.data(),
                     abs_kept.data(), &row_sums[size_t(2 * row)]);
    }
  }
  // Rows in order: the sums do not depend on the thread count.
  double all = 0.0, kept = 0.0;
  for (int64_t row = 0; row < rows; ++row) {
    all += row_sums[size_t(2 * row)];
    kept += row_sums[size_t(2 * row + 1)];
  }
  if (p.l1) {
    p.l1[0] = all;
    p.l1[1] = kept;
  }
}

}  // namespace

void della_select_cpu(const DellaSelectParams& p) {
  MELDKIT_DISPATCH_FLOAT(p.dtype, "della_select", "theta", T, { della_typed<T>(p); });
}

}  // namespace meldkit
