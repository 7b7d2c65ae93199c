// CUDA weighted_sum: one elementwise pass, 16-byte loads per input, fp32 accumulation in
// registers. Input pointers and weights travel by value in the kernel parameters, up to
// kWeightedSumMaxInputsPerLaunch per launch; more inputs run as several launches that carry the
// running sum in an fp32 workspace, so the result is rounded to the output dtype only once.
#include <algorithm>
#include <cstdint>

#include "meldkit/cuda_utils.cuh"
#include "meldkit/weighted_sum.h"

namespace meldkit {
namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int64_t kMaxBlocks = kElementwiseMaxBlocks;

struct WeightedSumChunk {
  const void* inputs[kWeightedSumMaxInputsPerLaunch];
  float weights[kWeightedSumMaxInputsPerLaunch];
  int num_inputs;
};

// Sum of the chunk's inputs over elements [base, base + VEC), plus the carried sum if any.
template <typename TIn, int VEC, bool kCarry>
__device__ __forceinline__ void accumulate(const WeightedSumChunk& c, const float* carry,
                                           int64_t base, float (&acc)[VEC]) {
  using In = Packed<TIn, VEC>;
  int first = 0;
  if constexpr (kCarry) {
    const auto a = *reinterpret_cast<const Packed<float, VEC>*>(carry + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = a.v[k];
  } else {
    const In x = *reinterpret_cast<const In*>(static_cast<const TIn*>(c.inputs[0]) + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = weighted_sum_first(c.weights[0], widen(x.v[k]));
    first = 1;
  }
#pragma unroll 4
  for (int i = first; i < c.num_inputs; ++i) {
    const In x = *reinterpret_cast<const In*>(static_cast<const TIn*>(c.inputs[i]) + base);
    const float w = c.weights[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = weighted_sum_step(acc[k], w, widen(x.v[k]));
  }
}

template <typename TDst, int VEC>
__device__ __forceinline__ void store(TDst* dst, int64_t base, const float (&acc)[VEC]) {
  Packed<TDst, VEC> o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) o.v[k] = Store<TDst>::from(acc[k]);
  *reinterpret_cast<Packed<TDst, VEC>*>(dst + base) = o;
}

// kCarry: add the running sum from `carry`; TDst: the output type, or float for the workspace.
// VEC = 1 serves misaligned tensors; with VEC > 1 the last numel % VEC elements go one per thread.
template <typename TIn, typename TDst, int VEC, bool kCarry>
__global__ void __launch_bounds__(kThreads)
    WeightedSumKernel(WeightedSumChunk chunk, int64_t numel, const float* carry, TDst* dst) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vec_end = numel / VEC * VEC;
  for (int64_t base = tid * VEC; base < vec_end; base += stride * VEC) {
    float acc[VEC];
    accumulate<TIn, VEC, kCarry>(chunk, carry, base, acc);
    store<TDst, VEC>(dst, base, acc);
  }
  if constexpr (VEC > 1) {
    for (int64_t e = vec_end + tid; e < numel; e += stride) {
      float acc[1];
      accumulate<TIn, 1, kCarry>(chunk, carry, e, acc);
      store<TDst, 1>(dst, e, acc);
    }
  }
}

template <typename TIn, typename TDst, int VEC>
void launch(const WeightedSumChunk& chunk, int64_t numel, const float* carry, TDst* dst,
            cudaStream_t stream) {
  const int64_t work = std::max<int64_t>(numel / VEC, 1);
  const int blocks = int(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (carry != nullptr) {
    WeightedSumKernel<TIn, TDst, VEC, true>
        <<<blocks, kThreads, 0, stream>>>(chunk, numel, carry, dst);
  } else {
    WeightedSumKernel<TIn, TDst, VEC, false>
        <<<blocks, kThreads, 0, stream>>>(chunk, numel, nullptr, dst);
  }
  cuda_check(cudaGetLastError(), "weighted_sum", "kernel launch");
}

// Picks 16-byte vectors when every pointer allows them, else scalar accesses.
template <typename TIn, typename TDst>
void launch_chunk(const WeightedSumChunk& chunk, int64_t numel, const float* carry, TDst* dst,
                  cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(TIn);
  bool vec_ok =
      is_aligned(dst, int(sizeof(TDst)) * VEC) && (carry == nullptr || is_aligned(carry, 4 * VEC));
  for (int i = 0; i < chunk.num_inputs; ++i) vec_ok = vec_ok && is_aligned(chunk.inputs[i], 16);
  if (vec_ok) {
    launch<TIn, TDst, VEC>(chunk, numel, carry, dst, stream);
  } else {
    launch<TIn, TDst, 1>(chunk, numel, carry, dst, stream);
  }
}

template <typename TIn, typename TOut>
void weighted_sum_chunks(const WeightedSumParams& p, cudaStream_t stream) {
  const int per = kWeightedSumMaxInputsPerLaunch;
  const int num_chunks = (p.num_inputs + per - 1) / per;
  if (num_chunks > 1 && p.workspace == nullptr) {
    throw_value_error("weighted_sum: argument 'workspace': required for more than " +
                      std::to_string(per) + " inputs on CUDA");
  }
  for (int c = 0; c < num_chunks; ++c) {
    WeightedSumChunk chunk{};
    chunk.num_inputs = std::min(per, p.num_inputs - c * per);
    for (int i = 0; i < chunk.num_inputs; ++i) {
      chunk.inputs[i] = p.inputs[c * per + i];
      chunk.weights[i] = p.weights[c * per + i];
    }
    const float* carry = c == 0 ? nullptr : p.workspace;
    if (c + 1 == num_chunks) {
      launch_chunk<TIn, TOut>(chunk, p.numel, carry, static_cast<TOut*>(p.out), stream);
    } else {
      launch_chunk<TIn, float>(chunk, p.numel, carry, p.workspace, stream);
    }
  }
}

}  // namespace

void weighted_sum_cuda(const WeightedSumParams& p, int device, void* stream) {
  if (p.numel == 0) return;
  CudaDeviceGuard guard(device, "weighted_sum");
  const auto s = static_cast<cudaStream_t>(stream);
  MELDKIT_DISPATCH_FLOAT(p.in_dtype, "weighted_sum", "tensors", TIn, {
    MELDKIT_DISPATCH_FLOAT(p.out_dtype, "weighted_sum", "out", TOut,
                           { weighted_sum_chunks<TIn, TOut>(p, s); });
  });
}

}  // namespace meldkit
