// CPU routed_lora (algorithm: routed_lora.h). The small weights (A, B, W_z) are converted once
// per call to the accumulation type, B transposed so the expand is a row update over d_out.
// Forward and the token part of backward run OpenMP over tokens; the weight gradients run
// OpenMP over column blocks, each block summing over every token in order (deterministic).
// Dot products keep 8 partial sums, which vectorise without reassociation flags.
#include <algorithm>
#include <cmath>
#include <vector>

#include "meldkit/routed_lora.h"

namespace meldkit {
namespace {

constexpr int64_t kTokensPerChunk = 16;
constexpr int kColumnBlock = 256;
constexpr int64_t kParallelMinWork = 1 << 15;  // tokens x features below which one thread runs

template <typename T, typename Acc>
MELDKIT_ALWAYS_INLINE void load_row(const T* src, int n, Acc* dst) {
  for (int j = 0; j < n; ++j) dst[j] = Acc(widen(src[j]));
}

template <typename T, typename Acc>
MELDKIT_ALWAYS_INLINE void store_row(const Acc* src, int n, T* dst) {
  for (int j = 0; j < n; ++j) dst[j] = Store<T>::from(src[j]);
}

// 32 partial sums: four independent vector accumulators with AVX2, enough to hide the latency
// of the adds (one accumulator measured half the speed).
template <typename Acc>
MELDKIT_ALWAYS_INLINE Acc dot(const Acc* a, const Acc* b, int n) {
  Acc s[32] = {};
  int j = 0;
  for (; j + 32 <= n; j += 32) {
    for (int l = 0; l < 32; ++l) s[l] += a[j + l] * b[j + l];
  }
  Acc tail = 0;
  for (; j < n; ++j) tail += a[j] * b[j];
  for (int w = 16; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  }
  return s[0] + tail;
}

template <typename Acc>
MELDKIT_ALWAYS_INLINE void axpy(Acc alpha, const Acc* x, int n, Acc* y) {
  for (int j = 0; j < n; ++j) y[j] += alpha * x[j];
}

// dst[j] = src[j] * scale where expert e keeps feature j of token t, else 0.
template <typename Acc>
MELDKIT_ALWAYS_INLINE void apply_dropout(const Acc* src, int n, uint32_t key, uint64_t first,
                                         const DropoutRule& rule, Acc* dst) {
  for (int j = 0; j < n; ++j) dst[j] = src[j] * Acc(dropout_factor(key, first + uint64_t(j), rule));
}

template <typename Acc>
MELDKIT_ALWAYS_INLINE Acc scale_of(const RoutedLoraParams& p, int e) {
  return p.scaling_f64 != nullptr ? Acc(p.scaling_f64[e]) : Acc(p.scaling[e]);
}

// The top_k of p (ties to the lower index) as flags, and the sum of the selected p in index order.
template <typename Acc>
Acc select_top_k(const Acc* p, int num_experts, int top_k, bool* chosen) {
  for (int e = 0; e < num_experts; ++e) chosen[e] = false;
  for (int k = 0; k < top_k; ++k) {
    int best = -1;
    // Descending p, NaN last, ties to the lower index (the reference's stable sort on -p).
    for (int e = 0; e < num_experts; ++e) {
      if (chosen[e]) continue;
      if (best < 0 || (std::isnan(p[best]) && !std::isnan(p[e])) || p[e] > p[best]) best = e;
    }
    chosen[best] = true;
  }
  Acc sum = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (chosen[e]) sum += p[e];
  }
  return sum;
}

// The call's weights in the accumulation type: A [E, R, d_in], B transposed to [E, R, d_out],
// W_z [E, d_in].
template <typename Acc>
struct DenseWeights {
  std::vector<Acc> a, bt, wz;
  std::vector<uint32_t> keys;  // dropout stream of each expert
  explicit DenseWeights(const RoutedLoraParams& p) {
    const int64_t E = p.num_experts, R = p.rank, din = p.d_in, dout = p.d_out;
    a.resize(size_t(E * R * din));
    for (int64_t i = 0; i < E * R * din; ++i) a[size_t(i)] = load_as<Acc>(p.lora_a, p.a_dtype, i);
    bt.resize(size_t(E * R * dout));
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t o = 0; o < dout; ++o) {
        for (int64_t r = 0; r < R; ++r) {
          bt[size_t((e * R + r) * dout + o)] =
              load_as<Acc>(p.lora_b, p.b_dtype, (e * dout + o) * R + r);
        }
      }
    }
    if (p.top_k > 0) {
      wz.resize(size_t(E * din));
      for (int64_t i = 0; i < E * din; ++i) {
        wz[size_t(i)] = load_as<Acc>(p.router, p.router_dtype, i);
      }
    }
    for (int e = 0; e < p.num_experts; ++e) keys.push_back(stream_key(p.seed, uint32_t(e)));
  }
};

// ---- forward -----------------------------------------------------------------------------------

template <typename TX, typename Acc>
MELDKIT_CPU_CLONES void forward_tokens(const RoutedLoraParams& p, const DenseWeights<Acc>& w,
                                       int64_t first, int64_t last, Acc* xf, Acc* xd, Acc* yacc) {
  const int E = p.num_experts, R = p.rank, din = p.d_in, dout = p.d_out;
  const DropoutRule rule = dropout_rule(p.dropout);
  const TX* x = static_cast<const TX*>(p.x);
  TX* y = static_cast<TX*>(p.y);
  Acc* probs = static_cast<Acc*>(p.probs);
  Acc* weights = static_cast<Acc*>(p.weights);
  Acc* h = static_cast<Acc*>(p.h);
  Acc pz[kRoutedLoraMaxExperts], g[kRoutedLoraMaxExperts];
  bool chosen[kRoutedLoraMaxExperts];
  for (int64_t t = first; t < last; ++t) {
    load_row(x + t * din, din, xf);
    if (p.top_k > 0) {
      Acc zmax = -INFINITY;
      for (int e = 0; e < E; ++e) {
        pz[e] = dot(xf, w.wz.data() + size_t(e) * din, din);
        zmax = std::max(zmax, pz[e]);
      }
      Acc total = 0;
      for (int e = 0; e < E; ++e) {
        pz[e] = std::exp(pz[e] - zmax);
        total += pz[e];
      }
      for (int e = 0; e < E; ++e) pz[e] /= total;
      const Acc sel = select_top_k(pz, E, p.top_k, chosen);
      for (int e = 0; e < E; ++e) {
        g[e] = chosen[e] ? pz[e] / sel : Acc(0);
        if (probs != nullptr) probs[t * E + e] = pz[e];
      }
    } else {
      for (int e = 0; e < E; ++e) {
        g[e] = load_as<Acc>(p.gates, p.gates_dtype, t * E + e);
        chosen[e] = true;
      }
    }
    for (int o = 0; o < dout; ++o) yacc[o] = 0;
    for (int e = 0; e < E; ++e) {
      weights[t * E + e] = g[e];
      Acc* he = h + (t * E + e) * R;
      if (!chosen[e]) {
        for (int r = 0; r < R; ++r) he[r] = 0;
        continue;
      }
      const Acc* src = xf;
      if (rule.active) {
        apply_dropout(xf, din, w.keys[size_t(e)], uint64_t(t) * uint64_t(din), rule, xd);
        src = xd;
      }
      const Acc c = g[e] * scale_of<Acc>(p, e);
      for (int r = 0; r < R; ++r) {
        he[r] = dot(src, w.a.data() + size_t(e * R + r) * din, din);
        if (c != Acc(0)) axpy(c * he[r], w.bt.data() + size_t(e * R + r) * dout, dout, yacc);
      }
    }
    store_row(yacc, dout, y + t * dout);
  }
}

template <typename TX, typename Acc>
void forward(const RoutedLoraParams& p) {
  const DenseWeights<Acc> w(p);
  const int64_t chunks = (p.num_tokens + kTokensPerChunk - 1) / kTokensPerChunk;
#pragma omp parallel if (p.num_tokens * p.d_in >= kParallelMinWork)
  {
    std::vector<Acc> xf(size_t(p.d_in)), xd(size_t(p.d_in)), yacc(size_t(p.d_out));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      forward_tokens<TX, Acc>(p, w, c * kTokensPerChunk,
                              std::min(p.num_tokens, (c + 1) * kTokensPerChunk), xf.data(),
                              xd.data(), yacc.data());
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

// Per token: q[t, e*R + r] = dL/dh (zero for unused experts), qz[t, e] = dL/dz (router mode),
// u[t, e*R + r] = g_e s_e h (the expand's input, for dB); plus dgates and dx rows.
template <typename TX, typename Acc>
MELDKIT_CPU_CLONES void backward_tokens(const RoutedLoraParams& p, const DenseWeights<Acc>& w,
                                        int64_t first, int64_t last, Acc* q, Acc* qz, Acc* u,
                                        Acc* dyf, Acc* dxacc, Acc* tmp) {
  const int E = p.num_experts, R = p.rank, din = p.d_in, dout = p.d_out;
  const DropoutRule rule = dropout_rule(p.dropout);
  const TX* dy = static_cast<const TX*>(p.dy);
  const Acc* probs = static_cast<const Acc*>(p.probs);
  const Acc* dprobs = static_cast<const Acc*>(p.dprobs);
  const Acc* weights = static_cast<const Acc*>(p.weights);
  const Acc* h = static_cast<const Acc*>(p.h);
  Acc dg[kRoutedLoraMaxExperts], dp[kRoutedLoraMaxExperts];
  bool chosen[kRoutedLoraMaxExperts];
  std::vector<Acc> du_row(static_cast<size_t>(R));
  for (int64_t t = first; t < last; ++t) {
    load_row(dy + t * dout, dout, dyf);
    Acc sel = 0;
    if (p.top_k > 0) {
      sel = select_top_k(probs + t * E, E, p.top_k, chosen);
    } else {
      for (int e = 0; e < E; ++e) chosen[e] = true;
    }
    for (int e = 0; e < E; ++e) {
      Acc* qe = q + (t * E + e) * R;
      Acc* ue = u + (t * E + e) * R;
      dg[e] = 0;
      if (!chosen[e]) {
        for (int r = 0; r < R; ++r) qe[r] = ue[r] = 0;
        continue;
      }
      const Acc s = scale_of<Acc>(p, e);
      const Acc c = weights[t * E + e] * s;
      const Acc* he = h + (t * E + e) * R;
      // A zero coefficient's products are not formed (0 * inf would be NaN): the expert gives
      // this token nothing, in y (forward) as in dx, dA and dB; dg still gets s <h, dU>.
      const bool on = c != Acc(0);
      Acc hu = 0;
      for (int r = 0; r < R; ++r) {
        du_row[size_t(r)] = dot(dyf, w.bt.data() + size_t(e * R + r) * dout, dout);
        hu += he[r] * du_row[size_t(r)];
        qe[r] = on ? c * du_row[size_t(r)] : Acc(0);
        ue[r] = on ? c * he[r] : Acc(0);
      }
      dg[e] = s * hu;
    }
    if (p.top_k > 0) {
      Acc gdg = 0;
      for (int e = 0; e < E; ++e) {
        if (chosen[e]) gdg += weights[t * E + e] * dg[e];
      }
      Acc pdp = 0;
      for (int e = 0; e < E; ++e) {
        dp[e] = dprobs != nullptr ? dprobs[t * E + e] : Acc(0);
        if (chosen[e]) dp[e] += (dg[e] - gdg) / sel;
        pdp += probs[t * E + e] * dp[e];
      }
      for (int e = 0; e < E; ++e) qz[t * E + e] = probs[t * E + e] * (dp[e] - pdp);
    } else if (p.dgates != nullptr) {
      for (int e = 0; e < E; ++e) store_as(p.dgates, p.gates_dtype, t * E + e, dg[e]);
    }
    if (p.dx == nullptr) continue;
    for (int j = 0; j < din; ++j) dxacc[j] = 0;
    for (int e = 0; e < E; ++e) {
      const Acc* qe = q + (t * E + e) * R;
      bool any = false;
      for (int r = 0; r < R; ++r) any = any || qe[r] != Acc(0);
      if (!any) continue;
      Acc* target = rule.active ? tmp : dxacc;
      if (rule.active) {
        for (int j = 0; j < din; ++j) tmp[j] = 0;
      }
      for (int r = 0; r < R; ++r) axpy(qe[r], w.a.data() + size_t(e * R + r) * din, din, target);
      if (rule.active) {
        const uint32_t key = w.keys[size_t(e)];
        const uint64_t first_el = uint64_t(t) * uint64_t(din);
        for (int j = 0; j < din; ++j) {
          dxacc[j] += tmp[j] * Acc(dropout_factor(key, first_el + uint64_t(j), rule));
        }
      }
    }
    if (p.top_k > 0) {
      for (int e = 0; e < E; ++e) axpy(qz[t * E + e], w.wz.data() + size_t(e) * din, din, dxacc);
    }
    store_row(dxacc, din, static_cast<TX*>(p.dx) + t * din);
  }
}

// dA[e, r, j] = sum_t q[t, e*R + r] xd_e[t, j] and dW_z[e, j] = sum_t qz[t, e] x[t, j] for the
// columns [j0, j1) of one block, tokens in order.
template <typename TX, typename Acc>
MELDKIT_CPU_CLONES void input_grads_block(const RoutedLoraParams& p, const DenseWeights<Acc>& w,
                                          const Acc* q, const Acc* qz, int j0, int j1, Acc* acc_a,
                                          Acc* acc_z, Acc* xb, Acc* xd) {
  const int E = p.num_experts, R = p.rank, din = p.d_in, nj = j1 - j0;
  const DropoutRule rule = dropout_rule(p.dropout);
  const bool want_a = p.da != nullptr, want_z = p.drouter != nullptr && p.top_k > 0;
  const TX* x = static_cast<const TX*>(p.x);
  for (int i = 0; i < E * R * nj; ++i) acc_a[i] = 0;
  for (int i = 0; i < E * nj; ++i) acc_z[i] = 0;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    load_row(x + t * din + j0, nj, xb);
    if (want_a) {
      for (int e = 0; e < E; ++e) {
        const Acc* qe = q + (t * E + e) * R;
        bool any = false;
        for (int r = 0; r < R; ++r) any = any || qe[r] != Acc(0);
        if (!any) continue;
        const Acc* src = xb;
        if (rule.active) {
          apply_dropout(xb, nj, w.keys[size_t(e)], uint64_t(t) * uint64_t(din) + uint64_t(j0), rule,
                        xd);
          src = xd;
        }
        for (int r = 0; r < R; ++r) {
          if (qe[r] != Acc(0)) axpy(qe[r], src, nj, acc_a + (e * R + r) * nj);
        }
      }
    }
    if (want_z) {
      for (int e = 0; e < E; ++e) {
        const Acc qv = qz[t * E + e];
        if (qv != Acc(0)) axpy(qv, xb, nj, acc_z + e * nj);
      }
    }
  }
  if (want_a) {
    for (int i = 0; i < E * R; ++i) {
      for (int jj = 0; jj < nj; ++jj) {
        store_as(p.da, p.a_dtype, int64_t(i) * din + j0 + jj, acc_a[i * nj + jj]);
      }
    }
  }
  if (want_z) {
    for (int e = 0; e < E; ++e) {
      for (int jj = 0; jj < nj; ++jj) {
        store_as(p.drouter, p.router_dtype, int64_t(e) * din + j0 + jj, acc_z[e * nj + jj]);
      }
    }
  }
}

// dB[e, o, r] = sum_t dy[t, o] u[t, e*R + r] for the output columns [o0, o1).
template <typename TX, typename Acc>
MELDKIT_CPU_CLONES void lora_b_grad_block(const RoutedLoraParams& p, const Acc* u, int o0, int o1,
                                          Acc* acc, Acc* dyb) {
  const int ER = p.num_experts * p.rank, R = p.rank, dout = p.d_out, no = o1 - o0;
  const TX* dy = static_cast<const TX*>(p.dy);
  for (int i = 0; i < ER * no; ++i) acc[i] = 0;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    load_row(dy + t * dout + o0, no, dyb);
    for (int c = 0; c < ER; ++c) {
      const Acc uv = u[t * ER + c];
      if (uv != Acc(0)) axpy(uv, dyb, no, acc + c * no);
    }
  }
  for (int c = 0; c < ER; ++c) {
    const int e = c / R, r = c % R;
    for (int oo = 0; oo < no; ++oo) {
      store_as(p.db, p.b_dtype, (int64_t(e) * dout + o0 + oo) * R + r, acc[c * no + oo]);
    }
  }
}

template <typename TX, typename Acc>
void backward(const RoutedLoraParams& p) {
  const DenseWeights<Acc> w(p);
  const int64_t N = p.num_tokens;
  const int E = p.num_experts, ER = p.num_experts * p.rank;
  std::vector<Acc> q(size_t(N * ER)), u(size_t(N * ER)), qz(size_t(N * E));
  const bool parallel = N * std::max(p.d_in, p.d_out) >= kParallelMinWork;
  const int64_t chunks = (N + kTokensPerChunk - 1) / kTokensPerChunk;
#pragma omp parallel if (parallel)
  {
    std::vector<Acc> dyf(size_t(p.d_out)), dxacc(size_t(p.d_in)), tmp(size_t(p.d_in));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      backward_tokens<TX, Acc>(p, w, c * kTokensPerChunk, std::min(N, (c + 1) * kTokensPerChunk),
                               q.data(), qz.data(), u.data(), dyf.data(), dxacc.data(), tmp.data());
    }
  }
  if (p.da != nullptr || (p.drouter != nullptr && p.top_k > 0)) {
    const int blocks = (p.d_in + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel if (parallel)
    {
      std::vector<Acc> acc_a(size_t(ER) * kColumnBlock), acc_z(size_t(E) * kColumnBlock),
          xb(kColumnBlock), xd(kColumnBlock);
#pragma omp for schedule(static)
      for (int b = 0; b < blocks; ++b) {
        input_grads_block<TX, Acc>(p, w, q.data(), qz.data(), b * kColumnBlock,
                                   std::min(p.d_in, (b + 1) * kColumnBlock), acc_a.data(),
                                   acc_z.data(), xb.data(), xd.data());
      }
    }
  }
  if (p.db != nullptr) {
    const int blocks = (p.d_out + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel if (parallel)
    {
      std::vector<Acc> acc(size_t(ER) * kColumnBlock), dyb(kColumnBlock);
#pragma omp for schedule(static)
      for (int b = 0; b < blocks; ++b) {
        lora_b_grad_block<TX, Acc>(p, u.data(), b * kColumnBlock,
                                   std::min(p.d_out, (b + 1) * kColumnBlock), acc.data(),
                                   dyb.data());
      }
    }
  }
}

}  // namespace

void routed_lora_forward_cpu(const RoutedLoraParams& p) {
  if (p.num_tokens == 0) return;
  MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(p.x_dtype, "routed_lora", "x", TX,
                                    { forward<TX, acc_t<TX>>(p); });
}

void routed_lora_backward_cpu(const RoutedLoraParams& p) {
  if (p.num_tokens == 0) {
    // Weight gradients of an empty batch are zero.
    const int64_t E = p.num_experts, R = p.rank;
    for (int64_t i = 0; p.da != nullptr && i < E * R * p.d_in; ++i) {
      store_as(p.da, p.a_dtype, i, 0.0);
    }
    for (int64_t i = 0; p.db != nullptr && i < E * R * p.d_out; ++i) {
      store_as(p.db, p.b_dtype, i, 0.0);
    }
    for (int64_t i = 0; p.drouter != nullptr && i < E * p.d_in; ++i) {
      store_as(p.drouter, p.router_dtype, i, 0.0);
    }
    return;
  }
  MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(p.x_dtype, "routed_lora", "x", TX,
                                    { backward<TX, acc_t<TX>>(p); });
}

namespace {

template <typename T>
MELDKIT_CPU_CLONES void dropout_apply_rows(const DropoutApplyParams& p, uint32_t key,
                                           const DropoutRule& rule, int64_t r0, int64_t r1) {
  const T* src = static_cast<const T*>(p.src);
  T* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t first = uint64_t(r) * uint64_t(cols);
    const T* s = src + r * cols;
    T* o = out + r * cols;
    for (int64_t j = 0; j < cols; ++j)
      o[j] = s[j] * T(dropout_factor(key, first + uint64_t(j), rule));
  }
}

}  // namespace

void dropout_apply_cpu(const DropoutApplyParams& p) {
  const DropoutRule rule = dropout_rule(p.dropout);
  const uint32_t key = stream_key(p.seed, p.expert);
  const int64_t rows_per_item =
      std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, p.cols));
  const int64_t items = (p.rows + rows_per_item - 1) / rows_per_item;
#pragma omp parallel for schedule(static) if (p.rows * p.cols >= (int64_t(1) << 15))
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r0 = i * rows_per_item, r1 = std::min(p.rows, r0 + rows_per_item);
    if (p.dtype == DType::kFloat64) {
      dropout_apply_rows<double>(p, key, rule, r0, r1);
    } else {
      dropout_apply_rows<float>(p, key, rule, r0, r1);
    }
  }
}

}  // namespace meldkit
