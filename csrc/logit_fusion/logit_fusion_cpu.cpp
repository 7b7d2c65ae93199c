// CPU logit fusion (algorithm: logit_fusion.h). Work items are (row, vocabulary chunk) pairs; each
// keeps online-softmax states for every distribution over its chunk, tile by tile (a tile's max
// first, then its exp sums against that max, merged into the running state with one rescale), and
// the per-row epilogue merges the chunks' states in chunk order, so the result does not depend on
// the number of threads. The exp of float32 rows is a polynomial that vectorises.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "meldkit/logit_fusion.h"

namespace meldkit {
namespace {

constexpr int kTile = 256;
constexpr int64_t kChunk = 8192;

// exp(x) for x <= 0 (arguments are s - max), within 2 ulp of expf; 0 below -87.3 and for -inf.
// Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for e^r (Cephes' expf), then 2^n
// from the exponent bits. Plain arithmetic and selects only, so loops over it vectorise.
MELDKIT_ALWAYS_INLINE float exp_nonpositive(float x) {
  const bool underflow = !(x > -87.3f);
  const float xc = underflow ? 0.f : x;
  // Round to nearest by the 1.5 * 2^23 trick (exact for |t| < 2^22).
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const float scale = bits_as_float(uint32_t(int32_t(n) + 127) << 23);
  return underflow ? 0.f : p * scale;
}
MELDKIT_ALWAYS_INLINE double exp_nonpositive(double x) { return std::exp(x); }

template <typename Acc>
MELDKIT_ALWAYS_INLINE Acc tile_max(const Acc* s, int len) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  Acc m[8] = {neg_inf, neg_inf, neg_inf, neg_inf, neg_inf, neg_inf, neg_inf, neg_inf};
  int v = 0;
  for (; v + 8 <= len; v += 8) {
    for (int l = 0; l < 8; ++l) m[l] = s[v + l] > m[l] ? s[v + l] : m[l];
  }
  Acc out = neg_inf;
  for (; v < len; ++v) out = s[v] > out ? s[v] : out;
  for (int l = 0; l < 8; ++l) out = m[l] > out ? m[l] : out;
  return out;
}

template <typename Acc>
MELDKIT_ALWAYS_INLINE Acc sum8(const Acc* x, int len) {
  Acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int v = 0;
  for (; v + 8 <= len; v += 8) {
    for (int l = 0; l < 8; ++l) s[l] += x[v + l];
  }
  Acc tail = 0;
  for (; v < len; ++v) tail += x[v];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

template <typename Acc>
MELDKIT_ALWAYS_INLINE Acc dot8(const Acc* x, const Acc* y, int len) {
  Acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int v = 0;
  for (; v + 8 <= len; v += 8) {
    for (int l = 0; l < 8; ++l) s[l] += x[v + l] * y[v + l];
  }
  Acc tail = 0;
  for (; v < len; ++v) tail += x[v] * y[v];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// Merges a partial state (max m, sums) into a running one; `k` weighted sums each. A max of -inf
// means "nothing yet" (every position so far masked or underflowed).
template <typename Acc>
MELDKIT_ALWAYS_INLINE void merge_state(Acc* state, Acc m, Acc sum, const Acc* wsum, int k) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  if (m == neg_inf) return;
  if (state[0] == neg_inf) {
    state[0] = m;
    state[1] = sum;
    for (int i = 0; i < k; ++i) state[2 + i] = wsum[i];
  } else if (m > state[0]) {
    const Acc f = exp_nonpositive(state[0] - m);
    state[0] = m;
    state[1] = state[1] * f + sum;
    for (int i = 0; i < k; ++i) state[2 + i] = state[2 + i] * f + wsum[i];
  } else {
    const Acc f = exp_nonpositive(m - state[0]);
    state[1] += sum * f;
    for (int i = 0; i < k; ++i) state[2 + i] += wsum[i] * f;
  }
}

// One tile of one distribution with values s and k weight rows: its max, exp sums, then merge.
template <typename Acc>
MELDKIT_ALWAYS_INLINE void tile_group(const Acc* s, int len, const Acc* const* w, int k, Acc* state,
                                      Acc* e) {
  const Acc m = tile_max(s, len);
  if (m == -std::numeric_limits<Acc>::infinity()) return;
  for (int v = 0; v < len; ++v) e[v] = exp_nonpositive(s[v] - m);
  Acc wsum[kLogitFusionMaxExperts];
  for (int i = 0; i < k; ++i) wsum[i] = dot8(e, w[i], len);
  merge_state(state, m, sum8(e, len), wsum, k);
}

// State layout of one row (or one chunk of it):
//   L: [max, sum, E_P-sums of d_t for each t]            2 + T
//   S: [max, sum, E_Q-sums of d_t for each t]            2 + T
//   t: [max, sum, E_{Q_t}-sum of d_t]                    3 per expert
//   c = (t, j): [max, sum, E_{P~_c}-sum of d_t]          3 per candidate
struct Layout {
  int T, n;
  int l() const { return 0; }
  int s() const { return 2 + T; }
  int t(int i) const { return 2 * (2 + T) + 3 * i; }
  int c(int i, int j) const { return 2 * (2 + T) + 3 * T + 3 * (i * n + j); }
  int size() const { return 2 * (2 + T) + 3 * T + 3 * T * n; }
};

template <typename TIn, typename Acc>
MELDKIT_CPU_CLONES void chunk_states(const LogitFusionParams& p, const Layout& lay, int64_t row,
                                     int64_t v0, int64_t v1, Acc* state, Acc* buf) {
  const int T = p.num_experts, n = p.num_alphas;
  const int64_t V = p.vocab, B = p.rows;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int i = 0; i < lay.size(); ++i) state[i] = 0;
  state[lay.l()] = state[lay.s()] = neg_inf;
  for (int t = 0; t < T; ++t) {
    state[lay.t(t)] = neg_inf;
    for (int j = 0; j < n; ++j) state[lay.c(t, j)] = neg_inf;
  }
  // Tile buffers: zl, zs, e, cand, then T rows of z_t and T rows of d_t (S's weights are d_t
  // too; B_t negates their sum).
  Acc* zl = buf;
  Acc* zs = zl + kTile;
  Acc* e = zs + kTile;
  Acc* cand = e + kTile;
  Acc* zt = cand + kTile;
  Acc* d = zt + T * kTile;
  const Acc* dw[kLogitFusionMaxExperts];
  for (int t = 0; t < T; ++t) dw[t] = d + t * kTile;
  const TIn* L = static_cast<const TIn*>(p.large) + row * V;
  const TIn* S = static_cast<const TIn*>(p.small) + row * V;
  const TIn* X = static_cast<const TIn*>(p.experts);
  for (int64_t base = v0; base < v1; base += kTile) {
    const int len = int(std::min<int64_t>(kTile, v1 - base));
    for (int v = 0; v < len; ++v) {
      zl[v] = Acc(widen(L[base + v]));
      zs[v] = Acc(widen(S[base + v]));
    }
    for (int t = 0; t < T; ++t) {
      const TIn* Xt = X + (int64_t(t) * B + row) * V + base;
      for (int v = 0; v < len; ++v) zt[t * kTile + v] = Acc(widen(Xt[v]));
    }
    // A position where any input is -inf leaves every distribution: all values -inf, d = 0.
    for (int v = 0; v < len; ++v) {
      bool masked = zl[v] == neg_inf || zs[v] == neg_inf;
      for (int t = 0; t < T; ++t) masked = masked || zt[t * kTile + v] == neg_inf;
      cand[v] = masked ? Acc(1) : Acc(0);
    }
    for (int v = 0; v < len; ++v) {
      const bool masked = cand[v] != Acc(0);
      zl[v] = masked ? neg_inf : zl[v];
      zs[v] = masked ? neg_inf : zs[v];
    }
    for (int t = 0; t < T; ++t) {
      for (int v = 0; v < len; ++v) {
        const bool masked = cand[v] != Acc(0);
        Acc& z = zt[t * kTile + v];
        d[t * kTile + v] = masked ? Acc(0) : z - zs[v];
        z = masked ? neg_inf : z;
      }
    }
    tile_group(zl, len, dw, T, state + lay.l(), e);
    tile_group(zs, len, dw, T, state + lay.s(), e);
    for (int t = 0; t < T; ++t) {
      tile_group(zt + t * kTile, len, dw + t, 1, state + lay.t(t), e);
      for (int j = 0; j < n; ++j) {
        const Acc a = Acc(p.alphas[j]);
        const Acc* dt = d + t * kTile;
        for (int v = 0; v < len; ++v) cand[v] = zl[v] + a * dt[v];
        tile_group(cand, len, dw + t, 1, state + lay.c(t, j), e);
      }
    }
  }
}

template <typename Acc>
void row_epilogue(const LogitFusionParams& p, const Layout& lay, int64_t row, const Acc* chunks,
                  int64_t num_chunks, Acc* state, Acc* best_alpha, int* best_t) {
  const int T = p.num_experts, n = p.num_alphas;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  // Merge the chunks in order, group by group.
  for (int i = 0; i < lay.size(); ++i) state[i] = 0;
  const int groups_k[2] = {T, T};
  const int group_at[2] = {lay.l(), lay.s()};
  for (int g = 0; g < 2; ++g) state[group_at[g]] = neg_inf;
  for (int t = 0; t < T; ++t) {
    state[lay.t(t)] = neg_inf;
    for (int j = 0; j < n; ++j) state[lay.c(t, j)] = neg_inf;
  }
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Acc* part = chunks + c * lay.size();
    for (int g = 0; g < 2; ++g) {
      const int at = group_at[g];
      merge_state(state + at, part[at], part[at + 1], part + at + 2, groups_k[g]);
    }
    for (int t = 0; t < T; ++t) {
      const int at = lay.t(t);
      merge_state(state + at, part[at], part[at + 1], part + at + 2, 1);
      for (int j = 0; j < n; ++j) {
        const int ac = lay.c(t, j);
        merge_state(state + ac, part[ac], part[ac + 1], part + ac + 2, 1);
      }
    }
  }
  Acc* loss = static_cast<Acc*>(p.loss) + row * T * n;
  if (state[lay.l()] == neg_inf) {  // every position masked
    for (int i = 0; i < T * n; ++i) loss[i] = 0;
    *best_alpha = 0;
    *best_t = 0;
    return;
  }
  const Acc lse_l = state[lay.l()] + std::log(state[lay.l() + 1]);
  const Acc lse_s = state[lay.s()] + std::log(state[lay.s() + 1]);
  Acc mean_a = 0, mean_b = 0;
  for (int t = 0; t < T; ++t) {
    const int at = lay.t(t);
    const Acc lse_t = state[at] + std::log(state[at + 1]);
    mean_a += state[at + 2] / state[at + 1] - (lse_t - lse_s);
    mean_b += -state[lay.s() + 2 + t] / state[lay.s() + 1] + (lse_t - lse_s);
  }
  mean_a /= Acc(T);
  mean_b /= Acc(T);
  Acc best = std::numeric_limits<Acc>::infinity();
  *best_alpha = 0;
  *best_t = -1;
  for (int t = 0; t < T; ++t) {
    const Acc m_t = state[lay.l() + 2 + t] / state[lay.l() + 1];
    for (int j = 0; j < n; ++j) {
      const int ac = lay.c(t, j);
      const Acc a = Acc(p.alphas[j]);
      const Acc k = state[ac] + std::log(state[ac + 1]) - lse_l;
      const Acc f1 = a * (state[ac + 2] / state[ac + 1]) - k;
      const Acc f2 = k - a * m_t;
      const Acc l = (f1 - mean_a) * (f1 - mean_a) + (f2 - mean_b) * (f2 - mean_b);
      loss[t * n + j] = l;
      // Smallest loss (NaN ranks last); ties to the smaller alpha, then the lower expert (t
      // ascends, so an exact tie in both keeps the earlier t).
      const Acc key = l == l ? l : std::numeric_limits<Acc>::infinity();
      if (*best_t < 0 || key < best || (key == best && a < *best_alpha)) {
        best = key;
        *best_alpha = a;
        *best_t = t;
      }
    }
  }
}

template <typename TIn, typename Acc>
MELDKIT_CPU_CLONES void write_logits(const LogitFusionParams& p, int64_t row, int64_t v0,
                                     int64_t v1, Acc alpha, int t) {
  const int64_t V = p.vocab, B = p.rows;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const TIn* L = static_cast<const TIn*>(p.large) + row * V;
  const TIn* S = static_cast<const TIn*>(p.small) + row * V;
  const TIn* X = static_cast<const TIn*>(p.experts);
  Acc* out = static_cast<Acc*>(p.logits) + row * V;
  for (int64_t v = v0; v < v1; ++v) {
    const Acc zl = Acc(widen(L[v])), zs = Acc(widen(S[v]));
    bool masked = zl == neg_inf || zs == neg_inf;
    for (int e = 0; e < p.num_experts; ++e) {
      masked = masked || Acc(widen(X[(int64_t(e) * B + row) * V + v])) == neg_inf;
    }
    const Acc zt = Acc(widen(X[(int64_t(t) * B + row) * V + v]));
    out[v] = masked ? neg_inf : zl + alpha * (zt - zs);
  }
}

template <typename TIn, typename Acc>
void run(const LogitFusionParams& p) {
  const Layout lay{p.num_experts, p.num_alphas};
  const int64_t B = p.rows, V = p.vocab;
  const int64_t num_chunks = (V + kChunk - 1) / kChunk;
  const int64_t items = B * num_chunks;
  std::vector<Acc> partial(size_t(items * lay.size()));
  const size_t buf_size = size_t(kTile) * size_t(4 + 2 * p.num_experts);
  const bool parallel = B * V >= (1 << 14);
#pragma omp parallel if (parallel)
  {
    std::vector<Acc> buf(buf_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t row = it / num_chunks, c = it % num_chunks;
      chunk_states<TIn, Acc>(p, lay, row, c * kChunk, std::min(V, (c + 1) * kChunk),
                             partial.data() + it * lay.size(), buf.data());
    }
  }
  std::vector<Acc> alpha(static_cast<size_t>(B));
  std::vector<int> expert(static_cast<size_t>(B));
#pragma omp parallel if (parallel)
  {
    std::vector<Acc> state(size_t(lay.size()));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B; ++row) {
      row_epilogue(p, lay, row, partial.data() + row * num_chunks * lay.size(), num_chunks,
                   state.data(), &alpha[size_t(row)], &expert[size_t(row)]);
      static_cast<Acc*>(p.alpha)[row] = alpha[size_t(row)];
      p.expert[row] = expert[size_t(row)];
    }
  }
  if (p.logits == nullptr) return;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t row = it / num_chunks, c = it % num_chunks;
    write_logits<TIn, Acc>(p, row, c * kChunk, std::min(V, (c + 1) * kChunk), alpha[size_t(row)],
                           expert[size_t(row)]);
  }
}

}  // namespace

void logit_fusion_cpu(const LogitFusionParams& p) {
  if (p.rows == 0) return;
  MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(p.dtype, "logit_fusion", "large", T, { run<T, acc_t<T>>(p); });
}

}  // namespace meldkit
