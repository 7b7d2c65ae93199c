// weighted_sum: out = sum_i w_i * x_i over N same-shape tensors (the core of linear merging and
// task arithmetic). Storage fp32/bf16/fp16 (and fp64 on the CPU); accumulation in fp32 (fp64 for
// fp64 inputs); the output may have a different dtype than the inputs.
#pragma once

#include <cstdint>

#include "meldkit/dtype.h"
#include "meldkit/macros.h"

namespace meldkit {

struct WeightedSumParams {
  int64_t numel = 0;                    // elements per tensor; every tensor is contiguous
  int num_inputs = 0;                   // N >= 1
  const void* const* inputs = nullptr;  // [N] host array of data pointers, each [numel] of in_dtype
  const float* weights = nullptr;       // [N] host array of weights
  DType in_dtype = DType::kFloat32;
  void* out = nullptr;  // [numel] of out_dtype; may be exactly one of the inputs (same pointer)
  DType out_dtype = DType::kFloat32;
  // CUDA only: [numel] float32 scratch for the running sum when N exceeds what one launch takes
  // (weighted_sum_cuda_workspace_numel says how much); nullptr otherwise.
  float* workspace = nullptr;
};

// Inputs one launch of the CUDA kernel reads; they travel by value in the kernel's parameters.
constexpr int kWeightedSumMaxInputsPerLaunch = 32;

inline int64_t weighted_sum_cuda_workspace_numel(int num_inputs, int64_t numel) {
  return num_inputs > kWeightedSumMaxInputsPerLaunch ? numel : 0;
}

// The per-element arithmetic both backends run: acc <- acc + w * x, rounded after the product
// and after the sum (no fused multiply-add), so CPU and CUDA results agree bit for bit.
MELDKIT_INLINE float weighted_sum_step(float acc, float w, float x) {
  return add_rn(acc, mul_rn(w, x));
}
MELDKIT_INLINE double weighted_sum_step(double acc, float w, double x) {
  return acc + static_cast<double>(w) * x;
}
// The first term starts the sum without adding zero, which would turn -0 into +0.
MELDKIT_INLINE float weighted_sum_first(float w, float x) { return mul_rn(w, x); }
MELDKIT_INLINE double weighted_sum_first(float w, double x) { return static_cast<double>(w) * x; }

void weighted_sum_cpu(const WeightedSumParams& p);

// `stream` is a cudaStream_t; `device` the CUDA ordinal all pointers live on.
void weighted_sum_cuda(const WeightedSumParams& p, int device, void* stream);

}  // namespace meldkit
