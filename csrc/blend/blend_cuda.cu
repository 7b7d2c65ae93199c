// CUDA blend (algorithm: blend.h): one launch over the plan's chunks on the caller's stream,
// whatever the number of tensors; each block walks chunks (grid-stride), finds the chunk's tensor
// by binary search in the device-side plan, derives the two mask keys from the seed and blends
// the chunk. Products and sums use _rn intrinsics (no FMA), so the bits equal the CPU kernel's.
#include <algorithm>
#include <cstdint>

#include "meldkit/blend.h"
#include "meldkit/cuda_utils.cuh"
#include "meldkit/random.h"

namespace meldkit {
namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;  // beyond this, blocks loop over chunks

struct BlendArgs {
  const BlendRow* rows;
  int num_rows;
  int64_t num_chunks;
  float g_table[4];
  float g_dense;
  float keep1, keep2;
  bool draw1, draw2;
  uint64_t seed;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) blend_kernel(BlendArgs a) {
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const BlendRow r = a.rows[blend_find_row(a.rows, a.num_rows, c)];  // same for the block
    T* out = reinterpret_cast<T*>(r.out);
    const T* base = reinterpret_cast<const T*>(r.base);
    const T* tau = reinterpret_cast<const T*>(r.tau);
    const int64_t begin = (c - r.first_chunk) * kBlendChunk;
    const int64_t end = min(r.numel, begin + kBlendChunk);
    const bool dense = r.dense != 0;
    const uint32_t key1 = stream_key(a.seed, uint32_t(r.stream1));
    const uint32_t key2 = stream_key(a.seed, uint32_t(r.stream2));
    for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
      float g = a.g_dense;
      if (!dense) {  // selects, not an indexed table: the table stays in registers
        const bool m1 = a.draw1 && uniform01(key1, uint64_t(e)) < a.keep1;
        const bool m2 = a.draw2 && uniform01(key2, uint64_t(e)) < a.keep2;
        g = m1 ? (m2 ? a.g_table[3] : a.g_table[1]) : (m2 ? a.g_table[2] : a.g_table[0]);
      }
      const float prod = __fmul_rn(widen(tau[e]), g);
      out[e] = Store<T>::from(__fadd_rn(widen(base[e]), prod));
    }
  }
}

}  // namespace

void blend_cuda(const BlendParams& p, int device, void* stream) {
  if (p.num_chunks == 0) return;
  CudaDeviceGuard guard(device, "blend");
  const auto s = static_cast<cudaStream_t>(stream);
  BlendArgs a;
  a.rows = p.rows;
  a.num_rows = p.num_tensors;
  a.num_chunks = p.num_chunks;
  for (int k = 0; k < 4; ++k) a.g_table[k] = p.g_table[k];
  a.g_dense = p.g_dense;
  a.keep1 = p.keep1;
  a.keep2 = p.keep2;
  a.draw1 = p.draw1;
  a.draw2 = p.draw2;
  a.seed = p.seed;
  const int blocks = int(std::min(kMaxBlocks, p.num_chunks));
  MELDKIT_DISPATCH_FLOAT(p.dtype, "blend", "bases", T, {
    blend_kernel<T><<<blocks, kThreads, 0, s>>>(a);
    cuda_check(cudaGetLastError(), "blend", "kernel launch");
  });
}

}  // namespace meldkit
