// CPU logit fusion (algorithm: logit_fusion.h). Work items are (row, vocabulary chunk) pairs; each
// keeps online-softmax states for every distribution over its chunk, tile by tile (a tile's max
// first, then its exp sums against that max, merged into the running state with one rescale), and
// the per-row epilogue merges the chunks' states in chunk order, so the result does not depend on
// the number of threads. The exp of float32 rows is a polynomial that vectorises.
//
// Most candidates need no exp at all (float32 rows, a grid with a uniform step h: the paper's
// 0, 0.1, ..., 2). Within a tile, exp(z_L + a_j d - rho) = exp(z_L + a_{j-1} d - rho) * exp(h d),
// so after an anchor candidate (its tile max rho, one exp per position as above) the next ones
// are one product per position with r = exp(h d), computed once per tile and expert, against the
// anchor's rho kept as the state's reference (merge_state needs a reference, not the exact max).
// A run of such steps is at most kMaxRun long, and only as long as run * h * max|d| <= kRunSpan:
// the values then stay within e^(+-kRunSpan) of the anchor's scale (no overflow); a position
// that underflowed at the anchor stays below e^(2 kRunSpan - 87) of the tile's largest term
// (negligible); the products' rounding (each step multiplies in r's error of about 2 ulp) stays
// below the exponent-argument rounding that the direct exp already carries (the tests' bound).
// A tile whose d holds an inf or a NaN, and float64 rows, take the direct exp everywhere.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "meldkit/logit_fusion.h"

namespace meldkit {
namespace {

constexpr int kTile = 256;
constexpr int64_t kChunk = 8192;
// Candidates computed by products after each anchor candidate (see the top of the file), and the
// most the exponent may move over such a run, run * |h| * max|d|.
constexpr int kMaxRun = kLogitFusionCpuMaxRun;
constexpr float kRunSpan = kLogitFusionCpuRunSpan;

// exp(x) for x <= 0 (arguments are s - max), within 2 ulp of expf; 0 below -87.3 and for -inf.
// Also exact to 2 ulp for 0 < x <= 80 (the step factors exp(h d) of the product runs).
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
MELDKIT_ALWAYS_INLINE Acc tile_group(const Acc* s, int len, const Acc* const* w, int k, Acc* state,
                                     Acc* e) {
  const Acc m = tile_max(s, len);
  if (m == -std::numeric_limits<Acc>::infinity()) return m;  // e is left as it was
  for (int v = 0; v < len; ++v) e[v] = exp_nonpositive(s[v] - m);
  Acc wsum[kLogitFusionMaxExperts];
  for (int i = 0; i < k; ++i) wsum[i] = dot8(e, w[i], len);
  merge_state(state, m, sum8(e, len), wsum, k);
  return m;
}

// A product-run candidate: e holds exp(s_prev - ref) for the previous candidate of the run; it
// becomes exp(s - ref) = e * r, and its sums (one weight row w) merge into the state with the
// anchor's reference `ref`.
template <typename Acc>
MELDKIT_ALWAYS_INLINE void run_group(Acc* e, const Acc* r, const Acc* w, int len, Acc* state,
                                     Acc ref) {
  for (int v = 0; v < len; ++v) e[v] *= r[v];
  const Acc wsum = dot8(e, w, len);
  merge_state(state, ref, sum8(e, len), &wsum, 1);
}

// float32 (the only type that takes runs): one pass with eight-lane vectors, the same sums in
// the same order as sum8 and dot8. GCC does not vectorise the fused loop written with arrays (it
// fell back to permutes and scalar sums, 3x slower), hence its vector extension.
#if defined(__GNUC__) || defined(__clang__)
MELDKIT_ALWAYS_INLINE void run_group(float* e, const float* r, const float* w, int len,
                                     float* state, float ref) {
  typedef float v8f __attribute__((vector_size(32)));
  v8f s = {0, 0, 0, 0, 0, 0, 0, 0};
  v8f ws = {0, 0, 0, 0, 0, 0, 0, 0};
  int v = 0;
  for (; v + 8 <= len; v += 8) {
    v8f x, rv, wv;
    std::memcpy(&x, e + v, sizeof(x));
    std::memcpy(&rv, r + v, sizeof(rv));
    std::memcpy(&wv, w + v, sizeof(wv));
    x = x * rv;
    std::memcpy(e + v, &x, sizeof(x));
    s += x;
    ws += x * wv;
  }
  float ts = 0.f, tw = 0.f;
  for (; v < len; ++v) {
    const float x = e[v] * r[v];
    e[v] = x;
    ts += x;
    tw += x * w[v];
  }
  const float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + ts;
  const float wsum = ((ws[0] + ws[1]) + (ws[2] + ws[3])) + ((ws[4] + ws[5]) + (ws[6] + ws[7])) + tw;
  merge_state(state, ref, sum, &wsum, 1);
}
#endif

// The largest |x| of a tile; +inf if any element is an inf or a NaN.
template <typename Acc>
MELDKIT_ALWAYS_INLINE Acc tile_absmax(const Acc* x, int len) {
  Acc m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int v = 0;
  for (; v + 8 <= len; v += 8) {
    for (int l = 0; l < 8; ++l) {
      const Acc a = std::abs(x[v + l]);
      m[l] = !(a <= m[l]) ? a : m[l];  // a NaN wins and stays
    }
  }
  Acc out = 0;
  for (; v < len; ++v) {
    const Acc a = std::abs(x[v]);
    out = !(a <= out) ? a : out;
  }
  for (int l = 0; l < 8; ++l) out = !(m[l] <= out) ? m[l] : out;
  return out == out ? out : std::numeric_limits<Acc>::infinity();
}

// Which grid points may follow their predecessor by a product (see the top of the file): those
// whose step from it equals the grid's first step h, up to the rounding of the grid to float.
struct GridRuns {
  bool any = false;
  float step = 0.f;
  bool cont[kLogitFusionMaxAlphas] = {};
};

template <typename Acc>
GridRuns grid_runs(const LogitFusionParams& p) {
  GridRuns g;
  if (!std::is_same<Acc, float>::value || p.num_alphas < 2) return g;
  float amax = 0.f;
  for (int j = 0; j < p.num_alphas; ++j) amax = std::max(amax, std::abs(float(p.alphas[j])));
  g.step = float(p.alphas[1]) - float(p.alphas[0]);
  if (!(g.step != 0.f) || !std::isfinite(g.step)) return g;
  const float tol = 4.f * std::numeric_limits<float>::epsilon() * amax;
  for (int j = 1; j < p.num_alphas; ++j) {
    const float h = float(p.alphas[j]) - float(p.alphas[j - 1]);
    g.cont[j] = std::abs(h - g.step) <= tol;
    g.any = g.any || g.cont[j];
  }
  return g;
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
MELDKIT_CPU_CLONES void chunk_states(const LogitFusionParams& p, const Layout& lay,
                                     const GridRuns& runs, int64_t row, int64_t v0, int64_t v1,
                                     Acc* state, Acc* buf) {
  const int T = p.num_experts, n = p.num_alphas;
  const int64_t V = p.vocab, B = p.rows;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int i = 0; i < lay.size(); ++i) state[i] = 0;
  state[lay.l()] = state[lay.s()] = neg_inf;
  for (int t = 0; t < T; ++t) {
    state[lay.t(t)] = neg_inf;
    for (int j = 0; j < n; ++j) state[lay.c(t, j)] = neg_inf;
  }
  // Tile buffers: zl, zs, e, cand, the run's exps and step factors, then T rows of z_t and T rows
  // of d_t (S's weights are d_t too; B_t negates their sum).
  Acc* zl = buf;
  Acc* zs = zl + kTile;
  Acc* e = zs + kTile;
  Acc* cand = e + kTile;
  Acc* run_e = cand + kTile;
  Acc* run_r = run_e + kTile;
  Acc* zt = run_r + kTile;
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
      const Acc* dt = d + t * kTile;
      // How many candidates may follow an anchor by products in this tile (0: none).
      int cap = 0;
      if (runs.any) {
        const Acc span = Acc(std::abs(runs.step)) * tile_absmax(dt, len);
        cap = !(span <= Acc(kRunSpan))               ? 0
              : span * Acc(kMaxRun) <= Acc(kRunSpan) ? kMaxRun
                                                     : int(Acc(kRunSpan) / span);
      }
      bool have_r = false;
      int run = 0;
      Acc ref = neg_inf;
      for (int j = 0; j < n; ++j) {
        if (runs.cont[j] && run < cap) {
          ++run;
          if (ref == neg_inf) continue;  // the anchor's tile was all -inf: so is this one
          if (!have_r) {
            const Acc h = Acc(runs.step);
            for (int v = 0; v < len; ++v) run_r[v] = exp_nonpositive(h * dt[v]);
            have_r = true;
          }
          run_group(run_e, run_r, dt, len, state + lay.c(t, j), ref);
          continue;
        }
        // Directly: its tile max and exps, which a run after it continues from.
        run = 0;
        const Acc a = Acc(p.alphas[j]);
        for (int v = 0; v < len; ++v) cand[v] = zl[v] + a * dt[v];
        ref = tile_group(cand, len, dw + t, 1, state + lay.c(t, j), run_e);
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
  if (state[lay.l()] == neg_inf) {  // every position masked: loss 0, +inf outside the ranges
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < n; ++j) {
        const bool allowed = ((p.allowed[t] >> j) & 1u) != 0;
        loss[t * n + j] = allowed ? Acc(0) : std::numeric_limits<Acc>::infinity();
      }
    }
    *best_alpha = 0;
    *best_t = 0;
    return;
  }
  // Differences of log-sum-exps as (max - max) + (log sum - log sum): a logit offset shared
  // by the models cancels in the maxima exactly instead of in the rounded sums.
  const auto lse_diff = [&](int x, int y) {
    return (state[x] - state[y]) + (std::log(state[x + 1]) - std::log(state[y + 1]));
  };
  Acc mean_a = 0, mean_b = 0;
  for (int t = 0; t < T; ++t) {
    const int at = lay.t(t);
    const Acc d_ts = lse_diff(at, lay.s());
    mean_a += state[at + 2] / state[at + 1] - d_ts;
    mean_b += -state[lay.s() + 2 + t] / state[lay.s() + 1] + d_ts;
  }
  mean_a /= Acc(T);
  mean_b /= Acc(T);
  Acc best = std::numeric_limits<Acc>::infinity();
  *best_alpha = 0;
  *best_t = -1;
  for (int t = 0; t < T; ++t) {
    const Acc m_t = state[lay.l() + 2 + t] / state[lay.l() + 1];
    for (int j = 0; j < n; ++j) {
      if (((p.allowed[t] >> j) & 1u) == 0) {  // outside expert t's range
        loss[t * n + j] = std::numeric_limits<Acc>::infinity();
        continue;
      }
      const int ac = lay.c(t, j);
      const Acc a = Acc(p.alphas[j]);
      const Acc k = lse_diff(ac, lay.l());
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
  if (*best_t < 0) *best_t = 0;  // no allowed candidate: alpha 0, expert 0
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
  const size_t buf_size = size_t(kTile) * size_t(6 + 2 * p.num_experts);
  const GridRuns runs = grid_runs<Acc>(p);
  const bool parallel = B * V >= (1 << 14);
#pragma omp parallel if (parallel)
  {
    std::vector<Acc> buf(buf_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t row = it / num_chunks, c = it % num_chunks;
      chunk_states<TIn, Acc>(p, lay, runs, row, c * kChunk, std::min(V, (c + 1) * kChunk),
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
