// CUDA routed_lora (algorithm and contract: routed_lora.h; the CPU twin: routed_lora_cpu.cpp).
//
// Forward, one kernel, one warp per token (TokenForwardKernel):
//   router logits as warp dot products over d_in (8 rows per pass over x), softmax and the
//   top-k by rank (each lane ranks its experts against all others: value descending, ties to the
//   lower index, NaN last), sums over experts done by lane 0 in index order as the CPU does;
//   then A_e xd_e for the selected experts (dropout mask regenerated per element), h written to
//   global memory and read back (the warp's own writes, ordered by __syncwarp) by the expand
//   y[o] = sum_{e,r} (g_e s_e h_{e,r}) B[e,o,r], lanes striding over o.
// Backward, up to three kernels plus a deterministic fold:
//   1. TokenBackwardKernel, one warp per token: dU = dy B_e (warp dots over d_out), dg, the
//      router's softmax/top-k backward, dgates, and the scratch rows q = dL/dh, u = g s h and
//      qz = dL/dz; then dx with lanes over d_in.
//   2. ColumnGradKernel over x: dA and dW_z. A thread owns one column j and up to 8 rows of one
//      expert (so x and the dropout mask are loaded/hashed once per 8 rows) and sums over its
//      tokens in order, skipping zero coefficients as the CPU does.
//   3. ColumnGradKernel over dy: dB, the same with u as coefficients and no mask.
//   When few columns would leave the GPU idle, the tokens are cut into S contiguous splits
//   (S a function of the shapes only); each split writes fp32 partials, and FoldSplitsKernel adds
//   them in split order. No atomics anywhere: results are bit-identical run to run.
// Scratch (q, u, qz, partials) comes from cudaMallocAsync on the caller's stream and returns with
// cudaFreeAsync, so nothing synchronises with the host and the call can be captured in a graph.
// Weights of any float dtype are read where they are used: with_weights() turns the runtime dtype
// into a typed pointer once per loop, not per element.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "meldkit/cuda_utils.cuh"
#include "meldkit/routed_lora.h"

namespace meldkit {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kTokenWarps = 4;  // tokens per block of the token kernels
constexpr int kTokenThreads = kTokenWarps * kWarp;
constexpr int64_t kTokenMaxBlocks = 1 << 16;  // grid-stride beyond this
constexpr int kRowChunk = 8;                  // weight rows per pass over a token row / column
constexpr int kColumnThreads = 128;
constexpr int64_t kColumnTargetThreads = 1 << 18;  // enough to fill an H100 several times
constexpr int64_t kMinTokensPerSplit = 64;
constexpr int kMaxSplits = 65535;  // gridDim.y

struct Args {
  int64_t num_tokens;
  int d_in, d_out, num_experts, rank, top_k;
  bool drop;
  float keep, drop_scale;
  uint32_t keys[kRoutedLoraMaxExperts];  // dropout stream of each expert
  const void* x;
  const void* lora_a;
  DType a_dtype;
  const void* lora_b;
  DType b_dtype;
  const float* scaling;
  const void* router;
  DType router_dtype;
  const void* gates;
  DType gates_dtype;  // also the dtype of dgates
  // Forward outputs; in the backward, weights/probs/h are read. Not const-restrict: the forward
  // reads h back after writing it, which the read-only cache path would not see.
  void* y;
  float* probs;
  float* weights;
  float* h;
  // Backward.
  const void* dy;
  const float* dprobs;
  void* dx;
  void* dgates;
  float* q;   // [N, E*R] dL/dh
  float* u;   // [N, E*R] g s h, or null when dB is not wanted
  float* qz;  // [N, E] dL/dz (router mode)
};

// ---- device helpers ----------------------------------------------------------------------------

// Calls f with `data` as a typed pointer of `dtype` (float64 never reaches CUDA).
template <typename F>
__device__ __forceinline__ void with_weights(DType dtype, const void* data, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      f(static_cast<const bf16_t*>(data));
      break;
    case DType::kFloat16:
      f(static_cast<const f16_t*>(data));
      break;
    default:
      f(static_cast<const float*>(data));
      break;
  }
}

// A kept element is multiplied by the dropout scale, a dropped one by 0 (so NaN and inf in x
// still propagate, as the header's xd = x * keep * scale and the reference say).
__device__ __forceinline__ float dropout_factor(uint32_t key, uint64_t element, float keep,
                                                float scale) {
  return dropout_keep(key, element, keep) ? scale : 0.f;
}

// The dropout mask of one expert on one token row: element j is first + j.
struct RowMask {
  bool active;
  uint32_t key;
  uint64_t first;
  float keep, scale;
};

__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: every lane ends with the same bits (each step adds the same two values).
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// out[i] = sum_j v[j] * mask(j) * w[i * row_stride + j * col_stride] for i < rows (<= kRows),
// lanes striding over j, then reduced over the warp; every lane gets the sums.
template <int kRows, typename TV, typename TW>
__device__ __forceinline__ void warp_dots(const TV* v, int n, const TW* w, int64_t row_stride,
                                          int64_t col_stride, int rows, const RowMask& mask,
                                          float (&out)[kRows]) {
  const int lane = threadIdx.x % kWarp;
  float acc[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = 0.f;
  for (int j = lane; j < n; j += kWarp) {
    float xv = widen(v[j]);
    if (mask.active) {
      xv *= dropout_factor(mask.key, mask.first + uint64_t(j), mask.keep, mask.scale);
    }
    const TW* wj = w + int64_t(j) * col_stride;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (i < rows) acc[i] += xv * widen(wj[i * row_stride]);
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) out[i] = warp_sum(acc[i]);
}

// Whether expert j ranks before expert e: larger probability first, ties to the lower index, NaN
// after every number (a strict total order, so exactly top_k experts have rank < top_k). On rows
// without NaN, or all NaN (the only rows a softmax gives), this is the CPU's repeated argmax.
__device__ __forceinline__ bool ranks_before(float pj, int j, float pe, int e) {
  const bool nj = isnan(pj), ne = isnan(pe);
  if (nj || ne) return ne && (!nj || j < e);
  return pj > pe || (pj == pe && j < e);
}

// The top_k of p[0, E) (shared memory, written before the call and __syncwarp'ed) as a bit mask,
// the same in every lane.
__device__ __forceinline__ uint64_t select_top_k(const float* p, int num_experts, int top_k) {
  const int lane = threadIdx.x % kWarp;
  bool chosen[2] = {false, false};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int e = lane + half * kWarp;
    if (e < num_experts) {
      const float pe = p[e];
      int rank = 0;
      for (int j = 0; j < num_experts; ++j) rank += ranks_before(p[j], j, pe, e) ? 1 : 0;
      chosen[half] = rank < top_k;
    }
  }
  const uint64_t lo = __ballot_sync(kFullMask, chosen[0]);
  const uint64_t hi = __ballot_sync(kFullMask, chosen[1]);
  return lo | (hi << 32);
}

__device__ __forceinline__ uint64_t all_experts(int num_experts) {
  return num_experts >= 64 ? ~uint64_t(0) : (uint64_t(1) << num_experts) - 1;
}

__device__ __forceinline__ bool has_bit(uint64_t mask, int e) { return (mask >> e) & 1u; }

// Sum of p[e] over the set bits, in index order (lane 0's result, broadcast).
__device__ __forceinline__ float masked_sum_in_order(const float* p, uint64_t mask,
                                                     int num_experts) {
  float s = 0.f;
  if (threadIdx.x % kWarp == 0) {
    for (int e = 0; e < num_experts; ++e) {
      if (has_bit(mask, e)) s += p[e];
    }
  }
  s = __shfl_sync(kFullMask, s, 0);
  __syncwarp();  // lane 0's reads of p come before any lane's later write to it
  return s;
}

// ---- forward -----------------------------------------------------------------------------------

template <typename TX>
__global__ void __launch_bounds__(kTokenThreads) TokenForwardKernel(Args a) {
  __shared__ float s_prob[kTokenWarps][kRoutedLoraMaxExperts];
  __shared__ float s_coef[kTokenWarps][kRoutedLoraMaxExperts];  // g_e s_e
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float* sp = s_prob[warp];
  float* sc = s_coef[warp];
  const int E = a.num_experts, R = a.rank, din = a.d_in, dout = a.d_out;
  const RowMask no_mask{false, 0u, 0u, 1.f, 1.f};
  const int64_t stride = int64_t(gridDim.x) * kTokenWarps;
  for (int64_t t = int64_t(blockIdx.x) * kTokenWarps + warp; t < a.num_tokens; t += stride) {
    const TX* xt = static_cast<const TX*>(a.x) + t * din;
    uint64_t chosen;
    if (a.top_k > 0) {
      // Logits z = W_z x_t, kRowChunk experts per pass over x.
      for (int e0 = 0; e0 < E; e0 += kRowChunk) {
        const int rows = min(kRowChunk, E - e0);
        float z[kRowChunk];
        with_weights(a.router_dtype, a.router, [&](auto w) {
          warp_dots<kRowChunk>(xt, din, w + int64_t(e0) * din, din, 1, rows, no_mask, z);
        });
        if (lane == 0) {
#pragma unroll
          for (int i = 0; i < kRowChunk; ++i) {
            if (i < rows) sp[e0 + i] = z[i];
          }
        }
      }
      __syncwarp();
      // Softmax in the CPU's order: the max and the total by one lane, in index order.
      float zmax = -INFINITY;
      if (lane == 0) {
        for (int e = 0; e < E; ++e) zmax = zmax < sp[e] ? sp[e] : zmax;  // std::max's rule
      }
      zmax = __shfl_sync(kFullMask, zmax, 0);
      __syncwarp();  // lane 0's reads of sp before the overwrite below
      for (int e = lane; e < E; e += kWarp) sp[e] = expf(sp[e] - zmax);
      __syncwarp();
      const float total = masked_sum_in_order(sp, all_experts(E), E);
      for (int e = lane; e < E; e += kWarp) sp[e] = sp[e] / total;
      __syncwarp();
      chosen = select_top_k(sp, E, a.top_k);
      const float sel = masked_sum_in_order(sp, chosen, E);
      for (int e = lane; e < E; e += kWarp) {
        const float pe = sp[e];
        const float g = has_bit(chosen, e) ? pe / sel : 0.f;
        if (a.probs != nullptr) a.probs[t * E + e] = pe;
        a.weights[t * E + e] = g;
        sc[e] = g * a.scaling[e];
      }
    } else {
      chosen = all_experts(E);
      for (int e = lane; e < E; e += kWarp) {
        const float g = load_as<float>(a.gates, a.gates_dtype, t * E + e);
        a.weights[t * E + e] = g;
        sc[e] = g * a.scaling[e];
      }
    }
    __syncwarp();

    // h_e = A_e xd_e for the chosen experts (every expert in gate mode), 0 for the others.
    for (int e = 0; e < E; ++e) {
      float* he = a.h + (t * E + e) * R;
      if (!has_bit(chosen, e)) {
        for (int r = lane; r < R; r += kWarp) he[r] = 0.f;
        continue;
      }
      const RowMask mask{a.drop, a.keys[e], uint64_t(t) * uint64_t(din), a.keep, a.drop_scale};
      for (int r0 = 0; r0 < R; r0 += kRowChunk) {
        const int rows = min(kRowChunk, R - r0);
        float hv[kRowChunk];
        with_weights(a.a_dtype, a.lora_a, [&](auto w) {
          warp_dots<kRowChunk>(xt, din, w + (int64_t(e) * R + r0) * din, din, 1, rows, mask, hv);
        });
        if (lane == 0) {
#pragma unroll
          for (int i = 0; i < kRowChunk; ++i) {
            if (i < rows) he[r0 + i] = hv[i];
          }
        }
      }
    }
    __syncwarp();  // orders lane 0's h stores before every lane's loads below

    // y[o] = sum over chosen e with g_e s_e != 0, r of (g_e s_e h_{e,r}) B[e, o, r], e and r in
    // order as the CPU adds them.
    const float* ht = a.h + t * E * R;
    TX* yt = static_cast<TX*>(a.y) + t * dout;
    with_weights(a.b_dtype, a.lora_b, [&](auto b) {
      for (int o = lane; o < dout; o += kWarp) {
        float acc = 0.f;
        for (uint64_t m = chosen; m != 0; m &= m - 1) {
          const int e = __ffsll(static_cast<long long>(m)) - 1;
          const float c = sc[e];
          if (c == 0.f) continue;
          const auto* be = b + (int64_t(e) * dout + o) * R;
          for (int r = 0; r < R; ++r) acc += (c * ht[e * R + r]) * widen(be[r]);
        }
        yt[o] = Store<TX>::from(acc);
      }
    });
    __syncwarp();  // the next token rewrites this warp's shared arrays
  }
}

// ---- backward, per token -----------------------------------------------------------------------

// Six blocks per SM caps registers at 80: unbounded it takes 96 (5 blocks); at 64 it spills.
template <typename TX>
__global__ void __launch_bounds__(kTokenThreads, 6) TokenBackwardKernel(Args a) {
  __shared__ float s_prob[kTokenWarps][kRoutedLoraMaxExperts];  // p, then qz
  __shared__ float s_grad[kTokenWarps][kRoutedLoraMaxExperts];  // dg, then dp
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float* sp = s_prob[warp];
  float* sg = s_grad[warp];
  const int E = a.num_experts, R = a.rank, din = a.d_in, dout = a.d_out;
  const int64_t ER = int64_t(E) * R;
  const bool router = a.top_k > 0;
  const RowMask no_mask{false, 0u, 0u, 1.f, 1.f};
  const int64_t stride = int64_t(gridDim.x) * kTokenWarps;
  for (int64_t t = int64_t(blockIdx.x) * kTokenWarps + warp; t < a.num_tokens; t += stride) {
    const TX* dyt = static_cast<const TX*>(a.dy) + t * dout;
    uint64_t chosen;
    float sel = 0.f;
    if (router) {
      // The forward's selection again, from the probabilities it stored.
      for (int e = lane; e < E; e += kWarp) sp[e] = a.probs[t * E + e];
      __syncwarp();
      chosen = select_top_k(sp, E, a.top_k);
      sel = masked_sum_in_order(sp, chosen, E);
    } else {
      chosen = all_experts(E);
    }

    // Per expert: dU_r = <dy, B[e, :, r]>, q = g s dU, u = g s h, dg = s <h, dU>.
    uint64_t active = 0;  // experts with some q != 0 (the only ones dx visits)
    float* qt = a.q + t * ER;
    float* ut = a.u != nullptr ? a.u + t * ER : nullptr;
    for (int e = 0; e < E; ++e) {
      if (!has_bit(chosen, e)) {
        for (int r = lane; r < R; r += kWarp) {
          qt[e * R + r] = 0.f;
          if (ut != nullptr) ut[e * R + r] = 0.f;
        }
        if (lane == 0) sg[e] = 0.f;
        continue;
      }
      const float s = a.scaling[e];
      const float c = a.weights[t * E + e] * s;
      const float* he = a.h + (t * E + e) * R;
      float hu = 0.f;
      bool any = false;
      for (int r0 = 0; r0 < R; r0 += kRowChunk) {
        const int rows = min(kRowChunk, R - r0);
        float du[kRowChunk];
        // B[e, o, r0 + i]: rows are adjacent elements, columns (o) R apart.
        with_weights(a.b_dtype, a.lora_b, [&](auto w) {
          warp_dots<kRowChunk>(dyt, dout, w + int64_t(e) * dout * R + r0, 1, R, rows, no_mask, du);
        });
#pragma unroll
        for (int i = 0; i < kRowChunk; ++i) {
          if (i < rows) {
            const float hv = he[r0 + i];
            // A zero coefficient's products are not formed (0 * inf would be NaN), as on
            // the CPU: no dx, dA or dB from this token; dg still gets s <h, dU>.
            const float qv = c != 0.f ? c * du[i] : 0.f;
            hu += hv * du[i];
            any = any || qv != 0.f;
            if (lane == 0) {
              qt[e * R + r0 + i] = qv;
              if (ut != nullptr) ut[e * R + r0 + i] = c != 0.f ? c * hv : 0.f;
            }
          }
        }
      }
      if (lane == 0) sg[e] = s * hu;
      if (any) active |= uint64_t(1) << e;
    }
    __syncwarp();

    if (router) {
      // dp_i = dprobs_i + (dg_i - sum_Omega g dg) / S on Omega; dz = p (dp - <p, dp>); the sums in
      // index order by lane 0 as on the CPU.
      float gdg = 0.f;
      if (lane == 0) {
        for (int e = 0; e < E; ++e) {
          if (has_bit(chosen, e)) gdg += a.weights[t * E + e] * sg[e];
        }
      }
      gdg = __shfl_sync(kFullMask, gdg, 0);
      __syncwarp();  // lane 0's reads of sg before the overwrite below
      for (int e = lane; e < E; e += kWarp) {
        float dp = a.dprobs != nullptr ? a.dprobs[t * E + e] : 0.f;
        if (has_bit(chosen, e)) dp += (sg[e] - gdg) / sel;
        sg[e] = dp;
      }
      __syncwarp();
      float pdp = 0.f;
      if (lane == 0) {
        for (int e = 0; e < E; ++e) pdp += sp[e] * sg[e];
      }
      pdp = __shfl_sync(kFullMask, pdp, 0);
      __syncwarp();  // lane 0's reads of sp before the overwrite below
      for (int e = lane; e < E; e += kWarp) {
        const float qz = sp[e] * (sg[e] - pdp);
        a.qz[t * E + e] = qz;
        sp[e] = qz;
      }
    } else if (a.dgates != nullptr) {
      for (int e = lane; e < E; e += kWarp) store_as(a.dgates, a.gates_dtype, t * E + e, sg[e]);
    }

    if (a.dx != nullptr) {
      __syncwarp();  // q (lane 0's global stores) and qz (shared) before every lane reads them
      TX* dxt = static_cast<TX*>(a.dx) + t * din;
      const uint64_t first = uint64_t(t) * uint64_t(din);
      // The router part reads W_z only in router mode; gate mode passes a never-read float view.
      const DType zdtype = router ? a.router_dtype : DType::kFloat32;
      with_weights(a.a_dtype, a.lora_a, [&](auto wa) {
        with_weights(zdtype, a.router, [&](auto wz) {
          for (int j = lane; j < din; j += kWarp) {
            float acc = 0.f;
            for (uint64_t m = active; m != 0; m &= m - 1) {
              const int e = __ffsll(static_cast<long long>(m)) - 1;
              const float* qe = qt + e * R;
              const auto* ae = wa + int64_t(e) * R * din + j;
              if (!a.drop) {
                for (int r = 0; r < R; ++r) acc += qe[r] * widen(ae[int64_t(r) * din]);
              } else {
                float tmp = 0.f;
                for (int r = 0; r < R; ++r) tmp += qe[r] * widen(ae[int64_t(r) * din]);
                acc += tmp * dropout_factor(a.keys[e], first + uint64_t(j), a.keep, a.drop_scale);
              }
            }
            if (router) {
              for (int e = 0; e < E; ++e) acc += sp[e] * widen(wz[int64_t(e) * din + j]);
            }
            dxt[j] = Store<TX>::from(acc);
          }
        });
      });
    }
    __syncwarp();  // the next token rewrites this warp's shared arrays
  }
}

// ---- backward, weight gradients by columns -----------------------------------------------------

// Where a group of rows lands: element (e, r, col) at e * se + r * sr + col * sc of `out`
// (dtype), or, with splits, of partials[split * numel + ...] (fp32).
struct ColumnTarget {
  void* out;
  DType dtype;
  float* partials;
  int64_t numel;
  int64_t se, sr, sc;
};

struct ColumnArgs {
  const void* v;  // [N, ncols] x or dy (TX)
  int64_t num_tokens, tokens_per_split;
  int ncols, col_tiles;
  // Row groups: E * chunks groups of up to kRowChunk ranks of one expert (coef), then, when
  // groups is larger, one W_z row per expert (qz).
  int num_experts, rank, chunks, groups;
  const float* coef;  // [N, E*R]: q (dA) or u (dB)
  const float* qz;    // [N, E] (dW_z)
  bool drop;          // mask v per expert (dA only)
  float keep, drop_scale;
  uint32_t keys[kRoutedLoraMaxExperts];
  ColumnTarget rows, z;
};

// out[row, col] = sum over tokens t of the split, in order, of coef[t, row] * v[t, col] (v masked
// by the row's expert for dA). Block: one row group x kColumnThreads columns; grid.y: splits.
template <typename TX>
__global__ void __launch_bounds__(kColumnThreads) ColumnGradKernel(ColumnArgs a) {
  // Row groups vary fastest, so blocks running together read the same columns of v (L2 hits).
  const int group = int(blockIdx.x % unsigned(a.groups));
  const int tile = int(blockIdx.x / unsigned(a.groups));
  const int col = tile * kColumnThreads + int(threadIdx.x);
  if (col >= a.ncols) return;  // no collective operations below
  const int64_t t0 = int64_t(blockIdx.y) * a.tokens_per_split;
  const int64_t t1 = min(a.num_tokens, t0 + a.tokens_per_split);
  const bool is_z = group >= a.num_experts * a.chunks;
  int e, r0, rows, stride;
  const float* cf;
  bool masked;
  if (!is_z) {
    e = group / a.chunks;
    r0 = (group % a.chunks) * kRowChunk;
    rows = min(kRowChunk, a.rank - r0);
    stride = a.num_experts * a.rank;
    cf = a.coef + e * a.rank + r0;
    masked = a.drop;
  } else {
    e = group - a.num_experts * a.chunks;
    r0 = 0;
    rows = 1;
    stride = a.num_experts;
    cf = a.qz + e;
    masked = false;
  }
  const uint32_t key = a.keys[e];
  const TX* v = static_cast<const TX*>(a.v) + col;
  float acc[kRowChunk];
#pragma unroll
  for (int i = 0; i < kRowChunk; ++i) acc[i] = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    // The coefficients are the same for the whole block: the skip below is uniform.
    float c[kRowChunk];
    bool any = false;
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) {
      c[i] = i < rows ? cf[t * stride + i] : 0.f;
      any = any || c[i] != 0.f;
    }
    if (!any) continue;
    float x = widen(v[t * a.ncols]);
    if (masked) {
      x *= dropout_factor(key, uint64_t(t) * uint64_t(a.ncols) + uint64_t(col), a.keep,
                          a.drop_scale);
    }
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) {
      if (c[i] != 0.f) acc[i] += c[i] * x;  // zero coefficients skipped, as on the CPU
    }
  }
  const ColumnTarget& target = is_z ? a.z : a.rows;
#pragma unroll
  for (int i = 0; i < kRowChunk; ++i) {
    if (i < rows) {
      const int64_t idx = e * target.se + (r0 + i) * target.sr + col * target.sc;
      if (target.partials != nullptr) {
        target.partials[int64_t(blockIdx.y) * target.numel + idx] = acc[i];
      } else {
        store_as(target.out, target.dtype, idx, acc[i]);
      }
    }
  }
}

// out[i] = the splits' partials of element i added in split order.
__global__ void __launch_bounds__(kElementwiseThreads)
    FoldSplitsKernel(const float* partials, int splits, int64_t numel, void* out, DType dtype) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    float s = partials[i];
    for (int k = 1; k < splits; ++k) s += partials[int64_t(k) * numel + i];
    store_as(out, dtype, i, s);
  }
}

// out = src * expert e's dropout factor, elementwise (dropout_apply_cuda).
// Element (t, j) of the mask is uniform01(key, t * cols + j): the flat index, row-major.
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads)
    DropoutApplyKernel(const T* src, T* out, int64_t numel, uint32_t key, DropoutRule rule) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = src[i] * T(dropout_factor(key, uint64_t(i), rule));
  }
}

// ---- host side ---------------------------------------------------------------------------------

void check_params(const RoutedLoraParams& p, const char* op) {
  if (p.num_experts < 1 || p.num_experts > kRoutedLoraMaxExperts) {
    throw_value_error(std::string(op) + ": needs 1 to " + std::to_string(kRoutedLoraMaxExperts) +
                      " experts, got " + std::to_string(p.num_experts));
  }
  const DType dtypes[] = {p.x_dtype, p.a_dtype, p.b_dtype, p.router_dtype, p.gates_dtype};
  for (DType d : dtypes) {
    if (d == DType::kFloat64) {
      throw_type_error(std::string(op) + ": no CUDA kernel for dtype float64");
    }
  }
}

Args make_args(const RoutedLoraParams& p) {
  Args a{};
  a.num_tokens = p.num_tokens;
  a.d_in = p.d_in;
  a.d_out = p.d_out;
  a.num_experts = p.num_experts;
  a.rank = p.rank;
  a.top_k = p.top_k;
  const DropoutRule rule = dropout_rule(p.dropout);
  a.drop = rule.active;
  a.keep = rule.keep;
  a.drop_scale = rule.scale;
  for (int e = 0; e < p.num_experts; ++e) a.keys[e] = stream_key(p.seed, uint32_t(e));
  a.x = p.x;
  a.lora_a = p.lora_a;
  a.a_dtype = p.a_dtype;
  a.lora_b = p.lora_b;
  a.b_dtype = p.b_dtype;
  a.scaling = p.scaling;
  a.router = p.router;
  a.router_dtype = p.router_dtype;
  a.gates = p.gates;
  a.gates_dtype = p.gates_dtype;
  a.y = p.y;
  a.probs = static_cast<float*>(p.probs);
  a.weights = static_cast<float*>(p.weights);
  a.h = static_cast<float*>(p.h);
  a.dy = p.dy;
  a.dprobs = static_cast<const float*>(p.dprobs);
  a.dx = p.dx;
  a.dgates = p.dgates;
  return a;
}

int token_blocks(int64_t num_tokens) {
  return int(std::min<int64_t>((num_tokens + kTokenWarps - 1) / kTokenWarps, kTokenMaxBlocks));
}

// Splits of the token range for a column kernel of `threads` threads: enough to fill the GPU,
// each at least kMinTokensPerSplit tokens. Depends on the shapes only, so the fold order (and the
// rounding) is the same on every run.
int column_splits(int64_t num_tokens, int64_t threads) {
  const int64_t by_threads = kColumnTargetThreads / std::max<int64_t>(threads, 1);
  const int64_t by_tokens = num_tokens / kMinTokensPerSplit;
  return int(std::clamp<int64_t>(std::min(by_threads, by_tokens), 1, kMaxSplits));
}

// One column-kernel launch (and its fold when split). `rows`/`z` targets get their partials
// pointers here.
struct ColumnPlan {
  ColumnArgs args;
  int splits = 1;
  int groups = 0;
  int64_t partial_floats = 0;  // rows.numel and z.numel times splits
};

// The coefficient pointers (q, u, qz) are set once the scratch exists.
ColumnPlan plan_columns(const Args& a, const void* v, int ncols, bool with_rows, bool with_z,
                        bool drop, ColumnTarget rows, ColumnTarget z) {
  ColumnPlan plan;
  ColumnArgs& c = plan.args;
  c = ColumnArgs{};
  c.v = v;
  c.num_tokens = a.num_tokens;
  c.ncols = ncols;
  c.col_tiles = (ncols + kColumnThreads - 1) / kColumnThreads;
  c.num_experts = a.num_experts;
  c.rank = a.rank;
  c.chunks = with_rows ? (a.rank + kRowChunk - 1) / kRowChunk : 0;
  c.drop = drop;
  c.keep = a.keep;
  c.drop_scale = a.drop_scale;
  for (int e = 0; e < a.num_experts; ++e) c.keys[e] = a.keys[e];
  if (!with_rows) rows.numel = 0;
  if (!with_z) z.numel = 0;
  c.rows = rows;
  c.z = z;
  plan.groups = a.num_experts * c.chunks + (with_z ? a.num_experts : 0);
  c.groups = plan.groups;
  plan.splits =
      column_splits(a.num_tokens, int64_t(c.col_tiles) * kColumnThreads * int64_t(plan.groups));
  c.tokens_per_split = (a.num_tokens + plan.splits - 1) / plan.splits;
  // Rounding tokens_per_split up can leave the last splits empty; they then write zeros.
  if (plan.splits > 1) plan.partial_floats = int64_t(plan.splits) * (rows.numel + z.numel);
  return plan;
}

template <typename TX>
void run_columns(ColumnPlan& plan, float* partials, cudaStream_t stream, const char* op) {
  ColumnArgs& c = plan.args;
  if (plan.groups == 0 || c.col_tiles == 0) return;
  if (plan.splits > 1) {
    c.rows.partials = partials;
    c.z.partials = partials + int64_t(plan.splits) * c.rows.numel;
  }
  const dim3 grid(unsigned(int64_t(c.col_tiles) * plan.groups), unsigned(plan.splits));
  ColumnGradKernel<TX><<<grid, kColumnThreads, 0, stream>>>(c);
  cuda_check(cudaGetLastError(), op, "kernel launch");
  if (plan.splits == 1) return;
  for (const ColumnTarget* t : {&c.rows, &c.z}) {
    if (t->numel == 0) continue;
    const int blocks = int(std::min<int64_t>(
        (t->numel + kElementwiseThreads - 1) / kElementwiseThreads, kElementwiseMaxBlocks));
    FoldSplitsKernel<<<blocks, kElementwiseThreads, 0, stream>>>(t->partials, plan.splits, t->numel,
                                                                 t->out, t->dtype);
    cuda_check(cudaGetLastError(), op, "kernel launch");
  }
}

template <typename TX>
void backward_typed(const RoutedLoraParams& p, Args a, cudaStream_t stream) {
  constexpr const char* kOp = "routed_lora_backward";
  const int64_t N = p.num_tokens, E = p.num_experts, R = p.rank;
  const bool router = p.top_k > 0;
  const bool want_z = router && p.drouter != nullptr;

  // Column plans first: their partial sizes go into the one scratch allocation.
  ColumnTarget ta{p.da, p.a_dtype, nullptr, E * R * p.d_in, R * p.d_in, p.d_in, 1};
  ColumnTarget tz{p.drouter, p.router_dtype, nullptr, E * p.d_in, p.d_in, 0, 1};
  ColumnTarget tb{p.db, p.b_dtype, nullptr, E * R * p.d_out, int64_t(p.d_out) * R, 1, R};
  const bool input_cols = p.da != nullptr || want_z;
  ColumnPlan plan_x, plan_dy;
  if (input_cols) {
    plan_x = plan_columns(a, p.x, p.d_in, p.da != nullptr, want_z, a.drop, ta, tz);
  }
  if (p.db != nullptr) {
    plan_dy = plan_columns(a, p.dy, p.d_out, true, false, false, tb, ColumnTarget{});
  }

  const int64_t q_bytes = align_up(N * E * R * int64_t(sizeof(float)));
  const int64_t u_bytes = p.db != nullptr ? q_bytes : 0;
  const int64_t qz_bytes = router ? align_up(N * E * int64_t(sizeof(float))) : 0;
  const int64_t px_bytes = align_up(plan_x.partial_floats * int64_t(sizeof(float)));
  const int64_t pdy_bytes = align_up(plan_dy.partial_floats * int64_t(sizeof(float)));
  AsyncScratch scratch(q_bytes + u_bytes + qz_bytes + px_bytes + pdy_bytes, stream, kOp);
  char* base = scratch.get();
  a.q = reinterpret_cast<float*>(base);
  a.u = u_bytes > 0 ? reinterpret_cast<float*>(base + q_bytes) : nullptr;
  a.qz = router ? reinterpret_cast<float*>(base + q_bytes + u_bytes) : nullptr;
  float* px = reinterpret_cast<float*>(base + q_bytes + u_bytes + qz_bytes);
  float* pdy = reinterpret_cast<float*>(base + q_bytes + u_bytes + qz_bytes + px_bytes);

  TokenBackwardKernel<TX><<<token_blocks(N), kTokenThreads, 0, stream>>>(a);
  cuda_check(cudaGetLastError(), kOp, "kernel launch");
  if (input_cols) {
    plan_x.args.coef = a.q;
    plan_x.args.qz = want_z ? a.qz : nullptr;
    run_columns<TX>(plan_x, px, stream, kOp);
  }
  if (p.db != nullptr) {
    plan_dy.args.coef = a.u;
    run_columns<TX>(plan_dy, pdy, stream, kOp);
  }
  scratch.release();
}

}  // namespace

void routed_lora_forward_cuda(const RoutedLoraParams& p, int device, void* stream) {
  constexpr const char* kOp = "routed_lora_forward";
  if (p.num_tokens == 0) return;
  check_params(p, kOp);
  CudaDeviceGuard guard(device, kOp);
  const auto s = static_cast<cudaStream_t>(stream);
  const Args a = make_args(p);
  MELDKIT_DISPATCH_FLOAT(p.x_dtype, kOp, "x", TX, {
    TokenForwardKernel<TX><<<token_blocks(p.num_tokens), kTokenThreads, 0, s>>>(a);
  });
  cuda_check(cudaGetLastError(), kOp, "kernel launch");
}

void routed_lora_backward_cuda(const RoutedLoraParams& p, int device, void* stream) {
  constexpr const char* kOp = "routed_lora_backward";
  check_params(p, kOp);
  CudaDeviceGuard guard(device, kOp);
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.num_tokens == 0) {
    // Weight gradients of an empty batch are zero (all-zero bits in every float dtype).
    const int64_t E = p.num_experts, R = p.rank;
    struct {
      void* data;
      int64_t bytes;
    } zero[] = {
        {p.da, E * R * p.d_in * dtype_size(p.a_dtype)},
        {p.db, E * R * p.d_out * dtype_size(p.b_dtype)},
        {p.top_k > 0 ? p.drouter : nullptr, E * p.d_in * dtype_size(p.router_dtype)},
    };
    for (const auto& z : zero) {
      if (z.data != nullptr && z.bytes > 0) {
        cuda_check(cudaMemsetAsync(z.data, 0, size_t(z.bytes), s), kOp, "cudaMemsetAsync");
      }
    }
    return;
  }
  if (p.dx == nullptr && p.da == nullptr && p.db == nullptr &&
      (p.drouter == nullptr || p.top_k == 0) && p.dgates == nullptr) {
    return;  // nothing asked for
  }
  const Args a = make_args(p);
  MELDKIT_DISPATCH_FLOAT(p.x_dtype, kOp, "x", TX, { backward_typed<TX>(p, a, s); });
}

void dropout_apply_cuda(const DropoutApplyParams& p, int device, void* stream) {
  constexpr const char* kOp = "routed_lora_dropout";
  const int64_t numel = p.rows * p.cols;
  if (numel == 0) return;
  CudaDeviceGuard guard(device, kOp);
  const auto s = static_cast<cudaStream_t>(stream);
  const DropoutRule rule = dropout_rule(p.dropout);
  const uint32_t key = stream_key(p.seed, p.expert);
  const int blocks = int(std::min<int64_t>((numel + kElementwiseThreads - 1) / kElementwiseThreads,
                                           kElementwiseMaxBlocks));
  if (p.dtype == DType::kFloat64) {
    DropoutApplyKernel<double><<<blocks, kElementwiseThreads, 0, s>>>(
        static_cast<const double*>(p.src), static_cast<double*>(p.out), numel, key, rule);
  } else {
    DropoutApplyKernel<float><<<blocks, kElementwiseThreads, 0, s>>>(
        static_cast<const float*>(p.src), static_cast<float*>(p.out), numel, key, rule);
  }
  cuda_check(cudaGetLastError(), kOp, "kernel launch");
}

}  // namespace meldkit
