// CUDA blend (algorithm: blend.h): one launch over the plan's chunks on the caller's stream,
// whatever the number of tensors; each block walks chunks (grid-stride), finds the chunk's tensor
// by binary search in the device-side plan, derives the two mask keys from the seed and blends
// the chunk with 16-byte accesses when the tensor's three buffers allow (scalar otherwise and for
// the tail). The element hash that does not depend on the stream is computed once for both
// masks. Products and sums use _rn intrinsics (no FMA), so the bits equal the CPU kernel's.
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

// One 16-byte store (the compiler would split a union's store into pieces).
__device__ __forceinline__ void store16(void* p, uint4 w) {
  asm volatile("st.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
               : "memory");
}

// One element: g from the masks (inner = the element's stream-independent hash, shared by both
// masks), then base + tau * g in float32 with _rn intrinsics.
template <typename T>
__device__ __forceinline__ T blend_one(const BlendArgs& a, bool dense, uint32_t key1, uint32_t key2,
                                       uint32_t high, uint64_t e, T base, T tau) {
  float g = a.g_dense;
  if (!dense) {  // selects, not an indexed table: the table stays in registers
    const uint32_t inner = uniform01_inner(high, e);
    const bool m1 = a.draw1 && uniform01_from_inner(key1, inner) < a.keep1;
    const bool m2 = a.draw2 && uniform01_from_inner(key2, inner) < a.keep2;
    g = m1 ? (m2 ? a.g_table[3] : a.g_table[1]) : (m2 ? a.g_table[2] : a.g_table[0]);
  }
  const float prod = __fmul_rn(widen(tau), g);
  return Store<T>::from(__fadd_rn(widen(base), prod));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) blend_kernel(BlendArgs a) {
  constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte access
  union Vec {  // 16 bytes: moved as one uint4 (vector load and store), used as kVec values
    uint4 raw;
    T v[kVec];
  };
  static_assert(kBlendChunk % kVec == 0, "chunks start on a vector boundary");
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
    const uint32_t high = uniform01_high(uint64_t(begin));  // a chunk never crosses 2^32
    int64_t scalar_from = begin;
    if (((r.out | r.base | r.tau) & 15) == 0) {  // 16-byte aligned: vector accesses
      const int64_t vend = begin + (end - begin) / kVec * kVec;
      for (int64_t v = begin + int64_t(threadIdx.x) * kVec; v < vend; v += kThreads * kVec) {
        Vec b, t, o;
        b.raw = *reinterpret_cast<const uint4*>(base + v);
        t.raw = *reinterpret_cast<const uint4*>(tau + v);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          o.v[j] = blend_one<T>(a, dense, key1, key2, high, uint64_t(v + j), b.v[j], t.v[j]);
        }
        store16(out + v, o.raw);
      }
      scalar_from = vend;
    }
    for (int64_t e = scalar_from + threadIdx.x; e < end; e += kThreads) {
      out[e] = blend_one<T>(a, dense, key1, key2, high, uint64_t(e), base[e], tau[e]);
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
