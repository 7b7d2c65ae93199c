// CUDA logit fusion (algorithm and contract: logit_fusion.h; the CPU twin: logit_fusion_cpu.cpp,
// whose state layout, masking rule, merge formula, epilogue and tie rule this file follows).
//
// Four kernels on the caller's stream, no host synchronisation (CUDA-graph capturable):
//   1. MaskKernel, elementwise over [B, V]: one byte per position, set where any of the T + 2
//      inputs is -inf. Every later kernel reads this byte instead of re-reading all T experts.
//   2. ChunkStatesKernel, one block per (row, vocabulary chunk, expert t), t fastest so the T
//      blocks sharing a chunk's z_L, z_S and mask run together and hit L2. The block computes the
//      online-softmax states of the n + 3 groups that involve t: L and S (weights d_t; L's and
//      S's max and sum come out bit-identical in all T blocks, since d_t does not enter them, and
//      block t = 0 writes them), expert t, and the n candidates z_L + alpha_j d_t. A chunk is
//      1 to 4 tiles of kThreads * kElems positions; each warp owns a contiguous kWarp * kElems
//      slice of a tile, each lane kElems positions of it held in registers. Per group a warp
//      takes the max of its slice first (butterfly, so every lane has it), then exps against that
//      max and butterfly sums, and lane 0 merges the result into the warp's state in shared
//      memory with the CPU's merge formula; this is the CPU's tile step with a 256-position
//      (kWarp * kElems) tile. At the end the block merges its warps' states in warp order and
//      writes the chunk state [B, chunks, Layout::size()] to scratch.
//   3. RowEpilogueKernel, one block per row: merges the chunk states in chunk order (a thread per
//      (group, weight) unit), then the CPU's epilogue: LSEs and targets (one thread, expert
//      order), a thread per candidate for its loss, and a block argmin under the CPU's total
//      order (loss with NaN as +inf, then alpha, then candidate index t * n + j).
//   4. FusedLogitsKernel (if logits are asked for), elementwise: -inf where masked, else
//      z_L + alpha*(z_{t*} - z_S) with alpha*/t* read from kernel 3's outputs in device memory.
// Every reduction has a fixed order (butterflies, warp order, chunk order) and there are no
// atomics, so results depend on the shapes only, never on scheduling. The chunk size depends on
// B, T and V only (bigger chunks once there are enough blocks, which bounds the scratch).
// Values that the CPU rounds one operation at a time (the candidate logits, merge rescales, the
// epilogue) use the _rn intrinsics so nvcc does not contract them into FMAs; exp is expf (within
// 2 ulp, as the CPU's polynomial is) with the CPU's cut: 0 below -87.3 and for NaN. The CPU's
// product runs over uniform grids (logit_fusion_cpu.cpp) are not used here: every candidate
// takes its own exp, which the GPU's special-function units make cheap (the measured calls were
// bound by per-call host work, not by the kernels); the results agree within the same tolerance.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "meldkit/cuda_utils.cuh"
#include "meldkit/logit_fusion.h"

namespace meldkit {
namespace {

constexpr const char* kOp = "logit_fusion";
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;  // every kernel's block
constexpr int kWarps = kThreads / kWarp;
// Positions per lane per tile: registers hold kElems of z_L, z_S, z_t and d_t (48 registers in
// all with 8, no spills: 5 blocks per SM), and the per-group warp reductions cost about as much as
// 3 positions, so 8 keeps them near a quarter of the work while a tile (2048 positions) stays
// small enough that a 128k-vocabulary decode step still has 64 blocks per expert. A warp's slice
// is then 256 positions, the CPU's tile, at the same 256-aligned offsets.
constexpr int kElems = 8;
constexpr int kWarpSpan = kWarp * kElems;
constexpr int64_t kTile = int64_t(kThreads) * kElems;
constexpr int64_t kMaxTilesPerChunk = 4;
// Grids at least this large (about 2 waves of 4 blocks on 132 SMs) double their chunk instead.
constexpr int64_t kTargetBlocks = 1024;
constexpr int kMaxGroups = kLogitFusionMaxAlphas + 3;  // per expert: L, S, t, n candidates
constexpr int kMaxUnits = kLogitFusionMaxExperts * kMaxGroups;

// The CPU's state layout of one row or chunk (logit_fusion_cpu.cpp):
//   L: [max, sum, E_P-sums of d_t for each t]            2 + T
//   S: [max, sum, E_Q-sums of d_t for each t]            2 + T
//   t: [max, sum, E_{Q_t}-sum of d_t]                    3 per expert
//   c = (t, j): [max, sum, E_{P~_c}-sum of d_t]          3 per candidate
struct Layout {
  int T, n;
  MELDKIT_HD int l() const { return 0; }
  MELDKIT_HD int s() const { return 2 + T; }
  MELDKIT_HD int t(int i) const { return 2 * (2 + T) + 3 * i; }
  MELDKIT_HD int c(int i, int j) const { return 2 * (2 + T) + 3 * T + 3 * (i * n + j); }
  MELDKIT_HD int size() const { return 2 * (2 + T) + 3 * T + 3 * T * n; }
};

// Everything the kernels need, by value (the grid as float: float64 never reaches the device).
struct Args {
  int64_t rows, vocab;
  int64_t chunk;       // positions per chunk, a multiple of kTile
  int64_t num_chunks;  // per row
  int num_experts, num_alphas, state_size;
  const void* large;
  const void* small;
  const void* experts;
  float alphas[kLogitFusionMaxAlphas];       // rounded to float exactly as the CPU's Acc(alpha)
  uint64_t allowed[kLogitFusionMaxExperts];  // bit j of allowed[t]: candidate (t, j) is searched
  float* loss;
  float* alpha;
  int64_t* expert;
  float* logits;
  uint8_t* mask;   // scratch [B, V]
  float* partial;  // scratch [B, chunks, state_size]
};

// ---- device helpers ----------------------------------------------------------------------------

// exp(x) for x <= 0 (arguments are s - max) with the CPU's edges: 0 below -87.3 and for NaN
// (an s of NaN, or inf - inf); expf otherwise.
__device__ __forceinline__ float exp_nonpositive(float x) { return x > -87.3f ? expf(x) : 0.f; }

// The CPU's max rule: a NaN never wins, so a max of only NaN and -inf stays -inf.
__device__ __forceinline__ float max_keep(float m, float v) { return v > m ? v : m; }

__device__ __forceinline__ float warp_max(float v) {
  // xor butterfly: every lane ends with the same value (max is exact and commutative).
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max_keep(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: each step adds the same two values in every lane (addition commutes), so all
  // lanes end with the same bits.
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The CPU's merge_state with one weighted sum: a partial (m, sum, w) into the running (M, S, W).
// A max of -inf means "nothing yet". Products and sums rounded one by one, as the CPU does.
__device__ __forceinline__ void merge_state(float& M, float& S, float& W, float m, float sum,
                                            float w) {
  if (m == -INFINITY) return;
  if (M == -INFINITY) {
    M = m;
    S = sum;
    W = w;
  } else if (m > M) {
    const float f = exp_nonpositive(M - m);
    M = m;
    S = __fadd_rn(__fmul_rn(S, f), sum);
    W = __fadd_rn(__fmul_rn(W, f), w);
  } else {
    const float f = exp_nonpositive(m - M);
    S = __fadd_rn(S, __fmul_rn(sum, f));
    W = __fadd_rn(W, __fmul_rn(w, f));
  }
}

// One group over one warp's slice of a tile: values s and weights d (kElems per lane). The
// slice's max first, then exp sums against it, then lane 0 merges into the warp's state st
// [max, sum, wsum] in shared memory (only lane 0 ever touches it after initialisation). Every
// product e * d is taken, also where e is 0, so an infinite d gives NaN exactly as the CPU's dot.
__device__ __forceinline__ void warp_group(const float (&s)[kElems], const float (&d)[kElems],
                                           float* st, int lane) {
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < kElems; ++k) m = max_keep(m, s[k]);
  m = warp_max(m);
  if (m == -INFINITY) return;  // warp-uniform: every position masked (or NaN) for this group
  float sum = 0.f, wsum = 0.f;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    const float e = exp_nonpositive(s[k] - m);
    sum += e;
    wsum += e * d[k];
  }
  sum = warp_sum(sum);
  wsum = warp_sum(wsum);
  if (lane == 0) merge_state(st[0], st[1], st[2], m, sum, wsum);
}

// ---- 1. mask -----------------------------------------------------------------------------------

template <typename TIn>
__global__ void __launch_bounds__(kThreads) MaskKernel(Args a) {
  const int64_t total = a.rows * a.vocab;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const TIn* L = static_cast<const TIn*>(a.large);
  const TIn* S = static_cast<const TIn*>(a.small);
  const TIn* X = static_cast<const TIn*>(a.experts);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    bool masked = widen(L[i]) == -INFINITY || widen(S[i]) == -INFINITY;
    // experts[t, b, v] sits at t * B * V + (b * V + v).
    for (int t = 0; t < a.num_experts && !masked; ++t) {
      masked = widen(X[int64_t(t) * total + i]) == -INFINITY;
    }
    a.mask[i] = masked ? 1 : 0;
  }
}

// ---- 2. chunk states ---------------------------------------------------------------------------

template <typename TIn>
__global__ void __launch_bounds__(kThreads) ChunkStatesKernel(Args a) {
  // Per warp, per group: [max, sum, wsum]. Slots: 0 = L, 1 = S, 2 = expert t, 3 + j = (t, j).
  __shared__ float s_warp[kWarps][kMaxGroups][3];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int T = a.num_experts, n = a.num_alphas, G = n + 3;
  const int64_t item = int64_t(blockIdx.x) / T;  // row * num_chunks + chunk
  const int t = int(int64_t(blockIdx.x) % T);
  const int64_t row = item / a.num_chunks, chunk = item % a.num_chunks;
  const int64_t V = a.vocab;
  const int64_t v0 = chunk * a.chunk, v1 = min(V, v0 + a.chunk);
  const TIn* L = static_cast<const TIn*>(a.large) + row * V;
  const TIn* S = static_cast<const TIn*>(a.small) + row * V;
  const TIn* X = static_cast<const TIn*>(a.experts) + (int64_t(t) * a.rows + row) * V;
  const uint8_t* M = a.mask + row * V;

  float (*ws)[3] = s_warp[warp];
  for (int g = lane; g < G; g += kWarp) {
    ws[g][0] = -INFINITY;
    ws[g][1] = 0.f;
    ws[g][2] = 0.f;
  }
  __syncwarp();  // lane 0 reads the slots the other lanes initialised

  // Every warp runs the same number of tiles; warps touch only their own slots, so no block
  // barrier is needed until the cross-warp merge.
  for (int64_t tile = v0; tile < v1; tile += kTile) {
    const int64_t first = tile + int64_t(warp) * kWarpSpan + lane;  // coalesced per k
    float zl[kElems], zs[kElems], zt[kElems], d[kElems];
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
      const int64_t v = first + int64_t(k) * kWarp;
      // Masked and out-of-range positions: -inf in every distribution, d = 0 (the CPU's rule).
      zl[k] = zs[k] = zt[k] = -INFINITY;
      d[k] = 0.f;
      if (v < v1 && M[v] == 0) {
        zl[k] = widen(L[v]);
        zs[k] = widen(S[v]);
        zt[k] = widen(X[v]);
        d[k] = zt[k] - zs[k];
      }
    }
    // z_S and z_t first, so only z_L and d stay live through the candidate loop.
    warp_group(zs, d, ws[1], lane);
    warp_group(zt, d, ws[2], lane);
    warp_group(zl, d, ws[0], lane);
    for (int j = 0; j < n; ++j) {
      const float alpha = a.alphas[j];
      float s[kElems];
#pragma unroll
      for (int k = 0; k < kElems; ++k) s[k] = __fadd_rn(zl[k], __fmul_rn(alpha, d[k]));
      warp_group(s, d, ws[3 + j], lane);
    }
  }
  __syncthreads();

  // Merge the warps in order and write this chunk's share of the layout.
  const Layout lay{T, n};
  float* out = a.partial + item * a.state_size;
  for (int g = threadIdx.x; g < G; g += kThreads) {
    float m = -INFINITY, sum = 0.f, w = 0.f;
    for (int i = 0; i < kWarps; ++i) {
      merge_state(m, sum, w, s_warp[i][g][0], s_warp[i][g][1], s_warp[i][g][2]);
    }
    if (g < 2) {
      const int at = g == 0 ? lay.l() : lay.s();
      if (t == 0) {  // the same bits in every expert's block; one writes them
        out[at] = m;
        out[at + 1] = sum;
      }
      out[at + 2 + t] = w;
    } else {
      const int at = g == 2 ? lay.t(t) : lay.c(t, g - 3);
      out[at] = m;
      out[at + 1] = sum;
      out[at + 2] = w;
    }
  }
}

// ---- 3. row epilogue ---------------------------------------------------------------------------

// A candidate for the argmin. idx < 0: none. Keys are never NaN (NaN losses rank as +inf).
struct Best {
  float key, alpha;
  int idx;
};

// Whether x comes strictly before y: smaller loss, then smaller alpha, then lower t * n + j (the
// CPU's scan in (t, j) order keeps the first of equal (loss, alpha)). A strict total order, so
// any reduction tree finds the same candidate.
__device__ __forceinline__ bool before(const Best& x, const Best& y) {
  if (x.idx < 0) return false;
  if (y.idx < 0) return true;
  if (x.key != y.key) return x.key < y.key;
  if (x.alpha != y.alpha) return x.alpha < y.alpha;
  return x.idx < y.idx;
}

// LSE(x) - LSE(y) as (max - max) + (log sum - log sum): a logit offset shared by the models
// cancels in the maxima exactly instead of in the rounded sums (the CPU twin's lse_diff).
__device__ __forceinline__ float lse_diff(const float* x, const float* y) {
  return __fadd_rn(__fsub_rn(x[0], y[0]), __fsub_rn(logf(x[1]), logf(y[1])));
}

__global__ void __launch_bounds__(kThreads) RowEpilogueKernel(Args a) {
  // Merged units: [0, T) L with weight d_t, [T, 2T) S with d_t, [2T, 3T) expert t, then the
  // candidates t * n + j. L's (and S's) max and sum are the same in each of its T units.
  __shared__ float s_unit[kMaxUnits][3];
  __shared__ float s_target[2];  // mean_t A_t, mean_t B_t
  __shared__ Best s_best[kWarps];
  const int T = a.num_experts, n = a.num_alphas, TN = T * n, U = T * (n + 3);
  const int64_t row = blockIdx.x;
  const Layout lay{T, n};
  const float* part = a.partial + row * a.num_chunks * a.state_size;
  for (int u = threadIdx.x; u < U; u += kThreads) {
    int at, wat;
    if (u < T) {
      at = lay.l();
      wat = at + 2 + u;
    } else if (u < 2 * T) {
      at = lay.s();
      wat = at + 2 + (u - T);
    } else if (u < 3 * T) {
      at = lay.t(u - 2 * T);
      wat = at + 2;
    } else {
      const int i = u - 3 * T;
      at = lay.c(i / n, i % n);
      wat = at + 2;
    }
    float m = -INFINITY, sum = 0.f, w = 0.f;
    for (int64_t c = 0; c < a.num_chunks; ++c) {
      const float* q = part + c * a.state_size;
      merge_state(m, sum, w, q[at], q[at + 1], q[wat]);
    }
    s_unit[u][0] = m;
    s_unit[u][1] = sum;
    s_unit[u][2] = w;
  }
  __syncthreads();

  float* loss = a.loss + row * TN;
  // Every position masked (block-uniform): loss 0, +inf outside the ranges, as on the CPU.
  if (s_unit[0][0] == -INFINITY) {
    for (int i = threadIdx.x; i < TN; i += kThreads) {
      loss[i] = ((a.allowed[i / n] >> (i % n)) & 1ull) != 0 ? 0.f : INFINITY;
    }
    if (threadIdx.x == 0) {
      a.alpha[row] = 0.f;
      a.expert[row] = 0;
    }
    return;
  }
  if (threadIdx.x == 0) {
    // The targets, summed in expert order as the CPU does.
    float mean_a = 0.f, mean_b = 0.f;
    for (int t = 0; t < T; ++t) {
      const float* e = s_unit[2 * T + t];
      const float* st = s_unit[T + t];
      const float d_ts = lse_diff(e, s_unit[T]);
      mean_a += e[2] / e[1] - d_ts;
      mean_b += -st[2] / st[1] + d_ts;
    }
    s_target[0] = mean_a / float(T);
    s_target[1] = mean_b / float(T);
  }
  __syncthreads();

  const float mean_a = s_target[0], mean_b = s_target[1];
  Best best{0.f, 0.f, -1};
  for (int i = threadIdx.x; i < TN; i += kThreads) {
    const int t = i / n, j = i % n;
    if (((a.allowed[t] >> j) & 1ull) == 0) {  // outside expert t's range
      loss[i] = INFINITY;
      continue;
    }
    const float* c = s_unit[3 * T + i];
    const float* lt = s_unit[t];
    const float al = a.alphas[j];
    const float m_t = lt[2] / lt[1];
    const float k = lse_diff(c, s_unit[0]);
    const float f1 = __fsub_rn(__fmul_rn(al, c[2] / c[1]), k);
    const float f2 = __fsub_rn(k, __fmul_rn(al, m_t));
    const float x = f1 - mean_a, y = f2 - mean_b;
    const float l = __fadd_rn(__fmul_rn(x, x), __fmul_rn(y, y));
    loss[i] = l;
    const Best cand{l == l ? l : INFINITY, al, i};
    if (before(cand, best)) best = cand;
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const Best other{__shfl_down_sync(kFullMask, best.key, o),
                     __shfl_down_sync(kFullMask, best.alpha, o),
                     __shfl_down_sync(kFullMask, best.idx, o)};
    if (before(other, best)) best = other;
  }
  if (lane == 0) s_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (before(s_best[w], best)) best = s_best[w];
    }
    // No allowed candidate (idx -1): alpha 0, expert 0, as the CPU.
    a.alpha[row] = best.idx < 0 ? 0.f : best.alpha;
    a.expert[row] = best.idx < 0 ? 0 : best.idx / n;
  }
}

// ---- 4. fused logits ---------------------------------------------------------------------------

template <typename TIn>
__global__ void __launch_bounds__(kThreads) FusedLogitsKernel(Args a) {
  const int64_t V = a.vocab, total = a.rows * V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const TIn* L = static_cast<const TIn*>(a.large);
  const TIn* S = static_cast<const TIn*>(a.small);
  const TIn* X = static_cast<const TIn*>(a.experts);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    float out = -INFINITY;
    if (a.mask[i] == 0) {
      const int64_t row = i / V;
      const float alpha = a.alpha[row];
      const int64_t t = a.expert[row];
      const float zs = widen(S[i]);
      const float zt = widen(X[t * total + i]);
      out = __fadd_rn(widen(L[i]), __fmul_rn(alpha, zt - zs));
    }
    a.logits[i] = out;
  }
}

// ---- host --------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int elementwise_blocks(int64_t total) {
  return int(std::min<int64_t>(ceil_div(total, kThreads), kElementwiseMaxBlocks));
}

template <typename TIn>
void run(const Args& a, cudaStream_t stream) {
  const int64_t total = a.rows * a.vocab;
  MaskKernel<TIn><<<elementwise_blocks(total), kThreads, 0, stream>>>(a);
  cuda_check(cudaGetLastError(), kOp, "kernel launch");
  const int64_t blocks = a.rows * a.num_chunks * a.num_experts;
  ChunkStatesKernel<TIn><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  cuda_check(cudaGetLastError(), kOp, "kernel launch");
  RowEpilogueKernel<<<unsigned(a.rows), kThreads, 0, stream>>>(a);
  cuda_check(cudaGetLastError(), kOp, "kernel launch");
  if (a.logits != nullptr) {
    FusedLogitsKernel<TIn><<<elementwise_blocks(total), kThreads, 0, stream>>>(a);
    cuda_check(cudaGetLastError(), kOp, "kernel launch");
  }
}

}  // namespace

void logit_fusion_cuda(const LogitFusionParams& p, int device, void* stream) {
  if (p.rows == 0) return;
  const int T = p.num_experts, n = p.num_alphas;
  if (T < 1 || T > kLogitFusionMaxExperts || n < 1 || n > kLogitFusionMaxAlphas || p.vocab < 1) {
    throw_value_error(std::string(kOp) + ": needs 1 to " + std::to_string(kLogitFusionMaxExperts) +
                      " experts, 1 to " + std::to_string(kLogitFusionMaxAlphas) +
                      " grid points and a non-empty vocabulary");
  }
  const int64_t B = p.rows, V = p.vocab;
  Args a{};
  a.rows = B;
  a.vocab = V;
  a.num_experts = T;
  a.num_alphas = n;
  a.state_size = Layout{T, n}.size();
  a.large = p.large;
  a.small = p.small;
  a.experts = p.experts;
  for (int j = 0; j < n; ++j) a.alphas[j] = float(p.alphas[j]);
  for (int t = 0; t < T; ++t) a.allowed[t] = p.allowed[t];
  a.loss = static_cast<float*>(p.loss);
  a.alpha = static_cast<float*>(p.alpha);
  a.expert = p.expert;
  a.logits = static_cast<float*>(p.logits);
  // Chunk size from the shapes only (so the rounding never depends on the device): one tile,
  // doubled while the grid would still have kTargetBlocks blocks. Larger chunks mean less scratch
  // and fewer states for the epilogue to merge; smaller ones more blocks for small batches.
  const int64_t tiles = ceil_div(V, kTile);
  int64_t tiles_per_chunk = 1;
  while (tiles_per_chunk < kMaxTilesPerChunk &&
         B * T * ceil_div(tiles, 2 * tiles_per_chunk) >= kTargetBlocks) {
    tiles_per_chunk *= 2;
  }
  a.chunk = tiles_per_chunk * kTile;
  a.num_chunks = ceil_div(V, a.chunk);
  if (B * a.num_chunks * T > int64_t(std::numeric_limits<int>::max())) {
    throw_value_error(std::string(kOp) + ": too many rows for one launch (" + std::to_string(B) +
                      ")");
  }

  CudaDeviceGuard guard(device, kOp);
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t mask_bytes = align_up(B * V);
  const int64_t partial_bytes = align_up(B * a.num_chunks * a.state_size * int64_t(sizeof(float)));
  AsyncScratch scratch(mask_bytes + partial_bytes, s, kOp);
  a.mask = reinterpret_cast<uint8_t*>(scratch.get());
  a.partial = reinterpret_cast<float*>(scratch.get() + mask_bytes);
  MELDKIT_DISPATCH_FLOAT(p.dtype, kOp, "large", TIn, { run<TIn>(a, s); });
  scratch.release();
}

}  // namespace meldkit
