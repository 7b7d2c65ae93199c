// CUDA blend (algorithm: blend.h): one grid-stride kernel launch per tensor on the caller's
// stream; products and sums use _rn intrinsics (no FMA), so the bits equal the CPU kernel's.
#include <algorithm>
#include <cstdint>

#include "meldkit/blend.h"
#include "meldkit/cuda_utils.cuh"
#include "meldkit/random.h"

namespace meldkit {
namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int64_t kMaxBlocks = kElementwiseMaxBlocks;

struct BlendArgs {
  void* out;
  const void* base;
  const void* tau;
  int64_t numel;
  uint32_t key1, key2;
  float g_table[4];
  float g_dense;
  float keep1, keep2;
  bool dense, draw1, draw2;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) blend_kernel(BlendArgs a) {
  T* out = static_cast<T*>(a.out);
  const T* base = static_cast<const T*>(a.base);
  const T* tau = static_cast<const T*>(a.tau);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < a.numel; e += stride) {
    float g = a.g_dense;
    if (!a.dense) {  // selects, not an indexed table: the table stays in registers
      const bool m1 = a.draw1 && uniform01(a.key1, uint64_t(e)) < a.keep1;
      const bool m2 = a.draw2 && uniform01(a.key2, uint64_t(e)) < a.keep2;
      g = m1 ? (m2 ? a.g_table[3] : a.g_table[1]) : (m2 ? a.g_table[2] : a.g_table[0]);
    }
    const float prod = __fmul_rn(widen(tau[e]), g);
    out[e] = Store<T>::from(__fadd_rn(widen(base[e]), prod));
  }
}

template <typename T>
void blend_typed(const BlendParams& p, cudaStream_t stream) {
  for (int i = 0; i < p.num_tensors; ++i) {
    const int64_t n = p.numels[i];
    if (n == 0) continue;
    BlendArgs a;
    a.out = p.outs[i];
    a.base = p.bases[i];
    a.tau = p.taus[i];
    a.numel = n;
    a.key1 = p.keys1[i];
    a.key2 = p.keys2[i];
    for (int k = 0; k < 4; ++k) a.g_table[k] = p.g_table[k];
    a.g_dense = p.g_dense;
    a.keep1 = p.keep1;
    a.keep2 = p.keep2;
    a.dense = p.dense[i] != 0;
    a.draw1 = p.draw1;
    a.draw2 = p.draw2;
    const int64_t blocks = std::min(kMaxBlocks, (n + kThreads - 1) / kThreads);
    blend_kernel<T><<<int(blocks), kThreads, 0, stream>>>(a);
    cuda_check(cudaGetLastError(), "blend", "kernel launch");
  }
}

}  // namespace

void blend_cuda(const BlendParams& p, int device, void* stream) {
  CudaDeviceGuard guard(device, "blend");
  const auto s = static_cast<cudaStream_t>(stream);
  MELDKIT_DISPATCH_FLOAT(p.dtype, "blend", "bases", T, { blend_typed<T>(p, s); });
}

}  // namespace meldkit
