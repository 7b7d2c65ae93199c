// CUDA merge kernels: the fused task merge (16-byte loads of every model, one pass) and magnitude
// selection (three radix passes with shared-memory histograms).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "meldkit/cuda_utils.cuh"
#include "meldkit/merge.h"

namespace meldkit {
namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int64_t kMaxBlocks = kElementwiseMaxBlocks;

// Everything per model travels by value: pointers, weights, scales, thresholds, densities, keys.
struct TaskMergeArgs {
  const void* models[kMergeMaxModels];
  float weights[kMergeMaxModels];
  float scales[kMergeMaxModels];
  float thresholds[kMergeMaxModels];
  float densities[kMergeMaxModels];
  uint32_t keys[kMergeMaxModels];
  const void* base;
  void* out;
  int64_t numel;
  int num_models;
  Sparsify sparsify;
  Consensus consensus;
  bool normalize;
  float lambda;
};

// Models whose vectors a thread loads before it adds any of them: a loop that loaded one model,
// added it, then loaded the next kept one 16-byte load per thread in flight, too few to cover
// the memory's latency (the H200 ran task arithmetic at 22-32 % of its copy bandwidth).
constexpr int kMergeLoadsAhead = 4;

template <typename TIn, typename TOut, int VEC>
__device__ __forceinline__ void merge_elements(const TaskMergeArgs& a, int64_t e0) {
  using In = Packed<TIn, VEC>;
  const In b = *reinterpret_cast<const In*>(static_cast<const TIn*>(a.base) + e0);
  float bf[VEC];
  MergeAcc acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) bf[k] = widen(b.v[k]);
  for (int t0 = 0; t0 < a.num_models; t0 += kMergeLoadsAhead) {
    In x[kMergeLoadsAhead];
#pragma unroll
    for (int i = 0; i < kMergeLoadsAhead; ++i) {
      if (t0 + i < a.num_models) {
        x[i] = *reinterpret_cast<const In*>(static_cast<const TIn*>(a.models[t0 + i]) + e0);
      }
    }
#pragma unroll
    for (int i = 0; i < kMergeLoadsAhead; ++i) {
      const int t = t0 + i;
      if (t >= a.num_models) break;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {  // models in index order, as before: the same sums
        const float tau = widen(x[i].v[k]) - bf[k];
        const bool keep = merge_keep(a.sparsify, tau, a.thresholds[t], a.densities[t], a.keys[t],
                                     uint64_t(e0 + k));
        merge_add(acc[k], a.weights[t], a.scales[t], tau, keep);
      }
    }
  }
  Packed<TOut, VEC> o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    o.v[k] = Store<TOut>::from(
        merge_finish(bf[k], a.lambda, merge_delta(acc[k], a.consensus, a.normalize)));
  }
  *reinterpret_cast<Packed<TOut, VEC>*>(static_cast<TOut*>(a.out) + e0) = o;
}

template <typename TIn, typename TOut, int VEC>
__global__ void __launch_bounds__(kThreads) TaskMergeKernel(TaskMergeArgs a) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vec_end = a.numel / VEC * VEC;
  for (int64_t e = tid * VEC; e < vec_end; e += stride * VEC) merge_elements<TIn, TOut, VEC>(a, e);
  if constexpr (VEC > 1) {
    for (int64_t e = vec_end + tid; e < a.numel; e += stride) merge_elements<TIn, TOut, 1>(a, e);
  }
}

template <typename TIn, typename TOut>
void task_merge_typed(const TaskMergeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(TIn);
  bool vec_ok = is_aligned(a.base, 16) && is_aligned(a.out, int(sizeof(TOut)) * VEC);
  for (int t = 0; t < a.num_models; ++t) vec_ok = vec_ok && is_aligned(a.models[t], 16);
  const int vec = vec_ok ? VEC : 1;
  const int64_t work = std::max<int64_t>(a.numel / vec, 1);
  const int blocks = int(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec_ok) {
    TaskMergeKernel<TIn, TOut, VEC><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    TaskMergeKernel<TIn, TOut, 1><<<blocks, kThreads, 0, stream>>>(a);
  }
  cuda_check(cudaGetLastError(), "task_merge", "kernel launch");
}

// ---- L1 norms for rescaling ---------------------------------------------------------------------

// One warp per (chunk, model), the CPU's order (merge.h, task_l1_cpu): lane l sums the chunk's
// elements l, l + 32, ... in index order in double, lane 0 adds the 32 lane sums in lane order,
// and partials[(chunk * N + t) * 2 + {0, 1}] get the chunk's sums of |tau| and of its kept part;
// the host adds the chunks in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    TaskL1Kernel(TaskMergeArgs a, int64_t num_chunks, double* partials) {
  static_assert(kL1Lanes == 32 && kThreads % 32 == 0, "one warp lane per L1 lane");
  const int lane = int(threadIdx.x) & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  const int64_t work = num_chunks * a.num_models;
  const T* base = static_cast<const T*>(a.base);
  // w is the same for every lane of a warp: the shuffles below see full warps.
  for (int64_t w = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; w < work; w += warps) {
    const int64_t c = w / a.num_models;
    const int t = int(w % a.num_models);
    const T* x = static_cast<const T*>(a.models[t]);
    const int64_t end = (c + 1) * kL1Chunk < a.numel ? (c + 1) * kL1Chunk : a.numel;
    double all = 0.0, kept = 0.0;
    for (int64_t e = c * kL1Chunk + lane; e < end; e += 32) {
      const float tau = widen(x[e]) - widen(base[e]);
      const bool keep =
          merge_keep(a.sparsify, tau, a.thresholds[t], a.densities[t], a.keys[t], uint64_t(e));
      all += fabsf(tau);
      kept += keep ? fabsf(tau) : 0.f;
    }
    double sum_all = 0.0, sum_kept = 0.0;
    for (int l = 0; l < 32; ++l) {
      sum_all += __shfl_sync(0xffffffffu, all, l);
      sum_kept += __shfl_sync(0xffffffffu, kept, l);
    }
    if (lane == 0) {
      partials[2 * w] = sum_all;
      partials[2 * w + 1] = sum_kept;
    }
  }
}

// ---- magnitude selection ----------------------------------------------------------------------

constexpr int kDigitBits[3] = {11, 11, 10};
constexpr int kDigitShift[3] = {21, 10, 0};
constexpr int kHistBins = 2048;

// One histogram increment per lane whose `active` is set, aggregated over the warp: the lanes
// that share a bin add once, with their count. The top digit of |tau| (sign, exponent, two
// mantissa bits) puts most elements of a tensor in a few dozen bins, where one shared-memory
// atomic per element serialised the warps on the same addresses. Every lane of the warp calls it.
__device__ __forceinline__ void warp_hist_add(unsigned int* hist, uint32_t bin, bool active) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700  // no __match_any_sync before Volta
  if (active) atomicAdd(&hist[bin], 1u);
#else
  const unsigned int lanes = __ballot_sync(0xffffffffu, active);
  if (active) {
    const unsigned int peers = __match_any_sync(lanes, bin);
    if (int(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], unsigned(__popc(peers)));
  }
#endif
}

// Histogram of the digit at `shift` among elements whose bits match `prefix` under `mask`; the
// first pass also counts NaNs into counters[kHistBins]. VEC elements per lane and step (16-byte
// loads where the tensors allow): every warp steps through whole 32-lane groups, so the lanes of
// a warp run the same number of steps (the warp-wide calls above need all 32), lanes past the
// end inactive; the last n % VEC elements go to the first warp of the grid's first block (of
// its row, for the per-model kernel). The block's histogram is in shared memory, added to
// `counters` at the end.
template <typename T, int VEC>
__device__ __forceinline__ void radix_histogram_block(const T* a, const T* b, int64_t n, int shift,
                                                      uint32_t digit_mask, uint32_t prefix,
                                                      uint32_t prefix_mask, bool count_nans,
                                                      unsigned long long* counters) {
  using In = Packed<T, VEC>;
  __shared__ unsigned int hist[kHistBins];
  __shared__ unsigned int nans;
  for (int i = threadIdx.x; i < kHistBins; i += blockDim.x) hist[i] = 0;
  if (threadIdx.x == 0) nans = 0;
  __syncthreads();
  const int lane = int(threadIdx.x & 31);
  unsigned int my_nans = 0;
  const auto add = [&](uint32_t bits, bool in_range) {
    my_nans += (count_nans && in_range && bits > 0x7f800000u) ? 1u : 0u;
    warp_hist_add(hist, (bits >> shift) & digit_mask, in_range && (bits & prefix_mask) == prefix);
  };
  const int64_t groups = n / VEC;  // whole vectors
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g0 = int64_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u); g0 < groups;
       g0 += stride) {
    const int64_t g = g0 + lane;
    const bool in_range = g < groups;
    In x{}, y{};
    if (in_range) {
      x = reinterpret_cast<const In*>(a)[g];
      if (b) y = reinterpret_cast<const In*>(b)[g];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      add(magnitude_bits(widen(x.v[k]), b ? widen(y.v[k]) : 0.f), in_range);
  }
  if (VEC > 1 && blockIdx.x == 0 && threadIdx.x < 32) {  // the tail, fewer than VEC elements
    const int64_t e = groups * VEC + lane;
    const bool in_range = e < n;
    const uint32_t bits = in_range ? magnitude_bits(widen(a[e]), b ? widen(b[e]) : 0.f) : 0u;
    add(bits, in_range);
  }
  if (my_nans) atomicAdd(&nans, my_nans);
  __syncthreads();
  for (int i = threadIdx.x; i < kHistBins; i += blockDim.x) {
    if (hist[i]) atomicAdd(&counters[i], (unsigned long long)hist[i]);
  }
  if (threadIdx.x == 0 && nans) atomicAdd(&counters[kHistBins], (unsigned long long)nans);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    RadixHistogramKernel(const T* a, const T* b, int64_t n, int shift, uint32_t digit_mask,
                         uint32_t prefix, uint32_t prefix_mask, bool count_nans,
                         unsigned long long* counters) {
  radix_histogram_block<T, VEC>(a, b, n, shift, digit_mask, prefix, prefix_mask, count_nans,
                                counters);
}

// The models of one tensor (TIES's per-model thresholds), each pass for all of them in one
// launch: row blockIdx.y histograms model y against the base with that model's prefix, into
// counters[y * kMagnitudeSelectCudaWorkspace ...].
struct ModelHistArgs {
  const void* models[kMergeMaxModels];
  uint32_t prefix[kMergeMaxModels];
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    RadixHistogramModelsKernel(ModelHistArgs m, const T* base, int64_t n, int shift,
                               uint32_t digit_mask, uint32_t prefix_mask, bool count_nans,
                               unsigned long long* counters) {
  const int y = int(blockIdx.y);
  radix_histogram_block<T, VEC>(static_cast<const T*>(m.models[y]), base, n, shift, digit_mask,
                                m.prefix[y], prefix_mask, count_nans,
                                counters + int64_t(y) * kMagnitudeSelectCudaWorkspace);
}

// Copies `words` counters to the host once the stream's work is done (one synchronisation).
void read_counters(unsigned long long* host, const unsigned long long* counters, size_t words,
                   cudaStream_t stream) {
  cuda_check(cudaMemcpyAsync(host, counters, words * sizeof(unsigned long long),
                             cudaMemcpyDeviceToHost, stream),
             "magnitude_select", "histogram read-back");
  cuda_check(cudaStreamSynchronize(stream), "magnitude_select", "stream synchronize");
}

// One radix pass's digit, shifted into place, from its histogram (and NaN count, pass 0); `k`
// becomes the rank within that digit. `k_asked` names the selection in the error.
uint32_t pick_digit(const unsigned long long* hist, int pass, int64_t* k, int64_t k_asked) {
  if (pass == 0 && hist[kHistBins] > 0) {
    throw_value_error("magnitude_select: the task vectors contain NaN");
  }
  uint32_t digit = 0;
  if (!radix_pick(hist, 1 << kDigitBits[pass], *k, &digit, k)) {
    throw_value_error("magnitude_select: k = " + std::to_string(k_asked) +
                      " exceeds the element count");
  }
  return digit << kDigitShift[pass];
}

template <typename T>
uint32_t magnitude_select_typed(const MagnitudeSelectParams& p, unsigned long long* counters,
                                cudaStream_t stream) {
  unsigned long long host[kHistBins + 1];
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t k = p.k;
  for (int pass = 0; pass < 3; ++pass) {
    const int bins = 1 << kDigitBits[pass];
    cuda_check(cudaMemsetAsync(counters, 0, sizeof(host), stream), "magnitude_select", "memset");
    for (int i = 0; i < p.num_tensors; ++i) {
      const int64_t n = p.numels[i];
      if (n == 0) continue;
      const T* a = static_cast<const T*>(p.a[i]);
      const T* b = p.b ? static_cast<const T*>(p.b[i]) : nullptr;
      constexpr int kVec = 16 / int(sizeof(T));
      const bool vec = is_aligned(a, 16) && (b == nullptr || is_aligned(b, 16));
      const int64_t lanes = vec ? n / kVec : n;
      const int blocks = int(std::clamp<int64_t>((lanes + kThreads - 1) / kThreads, 1, 1024));
      if (vec) {
        RadixHistogramKernel<T, kVec>
            <<<blocks, kThreads, 0, stream>>>(a, b, n, kDigitShift[pass], uint32_t(bins - 1),
                                              prefix, prefix_mask, pass == 0, counters);
      } else {
        RadixHistogramKernel<T, 1>
            <<<blocks, kThreads, 0, stream>>>(a, b, n, kDigitShift[pass], uint32_t(bins - 1),
                                              prefix, prefix_mask, pass == 0, counters);
      }
      cuda_check(cudaGetLastError(), "magnitude_select", "kernel launch");
    }
    read_counters(host, counters, kHistBins + 1, stream);
    prefix |= pick_digit(host, pass, &k, p.k);
    prefix_mask |= uint32_t(bins - 1) << kDigitShift[pass];
  }
  return prefix;
}

template <typename T>
void magnitude_select_models_typed(const void* base, const void* const* models, int num_models,
                                   int64_t numel, const int64_t* ks, uint32_t* bits,
                                   unsigned long long* counters, cudaStream_t stream) {
  constexpr int kVec = 16 / int(sizeof(T));
  const T* b = static_cast<const T*>(base);
  bool vec = is_aligned(base, 16);
  for (int t = 0; t < num_models; ++t) vec = vec && is_aligned(models[t], 16);
  const int64_t lanes = vec ? numel / kVec : numel;
  // Blocks per model: about the same total as one model's launch had.
  const int64_t per_model = std::max<int64_t>(1024 / num_models, 64);
  const int blocks = int(std::clamp<int64_t>((lanes + kThreads - 1) / kThreads, 1, per_model));
  const size_t words = size_t(num_models) * kMagnitudeSelectCudaWorkspace;
  std::vector<unsigned long long> host(words);
  ModelHistArgs m{};
  std::vector<int64_t> k(ks, ks + num_models);
  for (int t = 0; t < num_models; ++t) m.models[t] = models[t];
  uint32_t prefix_mask = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int bins = 1 << kDigitBits[pass];
    cuda_check(cudaMemsetAsync(counters, 0, words * sizeof(unsigned long long), stream),
               "magnitude_select", "memset");
    const dim3 grid{unsigned(blocks), unsigned(num_models), 1u};
    if (vec) {
      RadixHistogramModelsKernel<T, kVec><<<grid, kThreads, 0, stream>>>(
          m, b, numel, kDigitShift[pass], uint32_t(bins - 1), prefix_mask, pass == 0, counters);
    } else {
      RadixHistogramModelsKernel<T, 1><<<grid, kThreads, 0, stream>>>(
          m, b, numel, kDigitShift[pass], uint32_t(bins - 1), prefix_mask, pass == 0, counters);
    }
    cuda_check(cudaGetLastError(), "magnitude_select", "kernel launch");
    read_counters(host.data(), counters, words, stream);
    for (int t = 0; t < num_models; ++t) {
      const unsigned long long* h = host.data() + size_t(t) * kMagnitudeSelectCudaWorkspace;
      m.prefix[t] |= pick_digit(h, pass, &k[size_t(t)], ks[t]);
    }
    prefix_mask |= uint32_t(bins - 1) << kDigitShift[pass];
  }
  for (int t = 0; t < num_models; ++t) bits[t] = m.prefix[t];
}

TaskMergeArgs make_args(const TaskMergeParams& p) {
  if (p.num_models > kMergeMaxModels) {
    throw_value_error("task_merge: at most " + std::to_string(kMergeMaxModels) + " models");
  }
  TaskMergeArgs a{};
  for (int t = 0; t < p.num_models; ++t) {
    a.models[t] = p.models[t];
    a.weights[t] = p.weights ? p.weights[t] : 1.f;
    a.scales[t] = p.scales ? p.scales[t] : 1.f;
    a.thresholds[t] = p.thresholds ? p.thresholds[t] : 0.f;
    a.densities[t] = p.densities ? p.densities[t] : 1.f;
    a.keys[t] = p.streams ? stream_key(p.seed, p.streams[t]) : 0u;
  }
  a.base = p.base;
  a.out = p.out;
  a.numel = p.numel;
  a.num_models = p.num_models;
  a.sparsify = p.sparsify;
  a.consensus = p.consensus;
  a.normalize = p.normalize;
  a.lambda = p.lambda;
  return a;
}

}  // namespace

void task_merge_cuda(const TaskMergeParams& p, int device, void* stream) {
  if (p.numel == 0) return;
  const TaskMergeArgs a = make_args(p);
  CudaDeviceGuard guard(device, "task_merge");
  const auto s = static_cast<cudaStream_t>(stream);
  MELDKIT_DISPATCH_FLOAT(p.in_dtype, "task_merge", "models", TIn, {
    MELDKIT_DISPATCH_FLOAT(p.out_dtype, "task_merge", "out", TOut,
                           { task_merge_typed<TIn, TOut>(a, s); });
  });
}

void task_l1_cuda(const TaskMergeParams& p, double* partials, double* norms, int device,
                  void* stream) {
  const TaskMergeArgs a = make_args(p);
  std::fill(norms, norms + 2 * p.num_models, 0.0);
  if (p.numel == 0) return;
  CudaDeviceGuard guard(device, "task_l1");
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t num_chunks = (p.numel + kL1Chunk - 1) / kL1Chunk;
  const int64_t warps = num_chunks * p.num_models;
  const int64_t per_block = kThreads / 32;
  const int blocks = int(std::min<int64_t>((warps + per_block - 1) / per_block, kMaxBlocks));
  MELDKIT_DISPATCH_FLOAT(p.in_dtype, "task_l1", "models", T,
                         { TaskL1Kernel<T><<<blocks, kThreads, 0, s>>>(a, num_chunks, partials); });
  cuda_check(cudaGetLastError(), "task_l1", "kernel launch");
  std::vector<double> host(size_t(task_l1_cuda_partials(p.numel, p.num_models)));
  cuda_check(cudaMemcpyAsync(host.data(), partials, host.size() * sizeof(double),
                             cudaMemcpyDeviceToHost, s),
             "task_l1", "read-back");
  cuda_check(cudaStreamSynchronize(s), "task_l1", "stream synchronize");
  for (int64_t c = 0; c < num_chunks; ++c) {
    for (int i = 0; i < 2 * p.num_models; ++i) norms[i] += host[size_t(c * 2 * p.num_models + i)];
  }
}

void magnitude_select_models_cuda(const void* base, const void* const* models, int num_models,
                                  int64_t numel, DType dtype, const int64_t* ks, uint32_t* bits,
                                  unsigned long long* workspace, int device, void* stream) {
  if (num_models <= 0) return;
  if (num_models > kMergeMaxModels) {
    throw_value_error("magnitude_select: at most " + std::to_string(kMergeMaxModels) + " models");
  }
  for (int t = 0; t < num_models; ++t) {
    if (ks[t] < 1 || ks[t] > numel) {
      throw_value_error("magnitude_select: k = " + std::to_string(ks[t]) + " is not in [1, " +
                        std::to_string(numel) + "]");
    }
  }
  CudaDeviceGuard guard(device, "magnitude_select");
  MELDKIT_DISPATCH_FLOAT(dtype, "magnitude_select", "models", T, {
    magnitude_select_models_typed<T>(base, models, num_models, numel, ks, bits, workspace,
                                     static_cast<cudaStream_t>(stream));
  });
}

uint32_t magnitude_select_cuda(const MagnitudeSelectParams& p, unsigned long long* workspace,
                               int device, void* stream) {
  CudaDeviceGuard guard(device, "magnitude_select");
  uint32_t bits = 0;
  MELDKIT_DISPATCH_FLOAT(p.dtype, "magnitude_select", "a", T, {
    bits = magnitude_select_typed<T>(p, workspace, static_cast<cudaStream_t>(stream));
  });
  return bits;
}

}  // namespace meldkit
