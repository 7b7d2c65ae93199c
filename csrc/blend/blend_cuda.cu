// CUDA blend (algorithm: blend.h): one launch over the plan's chunks on the caller's stream,
// whatever the number of tensors; each block walks chunks (grid-stride), finds the chunk's tensor
// by binary search in the device-side plan, derives the two mask keys from the seed and blends
// the chunk with 16-byte accesses when the tensor's three buffers allow (scalar otherwise and for
// the tail), in a loop specialised for the masks it draws (none, one, both). A masked blend is
// bound by the SM's integer pipe (three lowbias32 hashes per element), not by memory, so the loop
// keeps it lean: the element hash that does not depend on the stream is computed once for both
// masks; the hashes' constant operands are folded once per chunk (ChunkKeys); a draw is one
// unsigned compare of the hash with a limit (the CPU's integer threshold, uniform01_below: the
// same bits as u < keep, without the int-to-float conversion and the float compare); no flag is
// tested per element. Both masks, bf16: 23 integer-pipe instructions per element in sm_90 SASS.
// Products and sums use _rn intrinsics (no FMA), so the bits equal the CPU kernel's.
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
  uint32_t limit1, limit2;  // a draw keeps where the hash is <= limit (draw_limit)
  bool draw1, draw2;
  uint64_t seed;
};

// One 16-byte store (the compiler would split a union's store into pieces).
__device__ __forceinline__ void store16(void* p, uint4 w) {
  asm volatile("st.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
               : "memory");
}

// Which masks a chunk draws: none (g is one constant: the dense value, or g_table[0] when the
// masks that would be drawn have zero coefficients), the first, the second, or both. Chosen once
// per chunk, so the element loop carries no flag tests.
enum class Draw { kNone, kFirst, kSecond, kBoth };

// The hashes of a chunk, folded (fold16) where they are constant: mix32(a ^ b) is
// mix32_tail(fold16(a) ^ fold16(b)), so the constant operand's fold is done once per chunk and
// the element's stream-independent hash is folded once for both masks.
struct ChunkKeys {
  uint32_t fhigh;         // fold16(uniform01_high(begin)): the element index's high 32 bits
  uint32_t fkey1, fkey2;  // fold16 of the two masks' stream keys
};

// fold16(uniform01_inner(high, e)) of the element whose index has low 32 bits `lo`.
__device__ __forceinline__ uint32_t folded_inner(const ChunkKeys& k, uint32_t lo) {
  return fold16(mix32_tail(fold16(lo) ^ k.fhigh));
}

// uniform01_below(key, inner, thr) (u < keep, decided on the integer, as the CPU does) as one
// unsigned compare on the hash itself: h >> 8 < thr exactly when h <= thr * 256 - 1, for thr in
// [1, 2^24]; a mask with thr 0 never keeps, and its draw is dropped at launch (draw_limit).
__device__ __forceinline__ bool drawn(uint32_t fkey, uint32_t finner, uint32_t limit) {
  return mix32_tail(fkey ^ finner) <= limit;  // mix32(key ^ inner)
}

// g of one element (finner: folded_inner): selects, not an indexed table, so the table stays in
// registers.
template <Draw D>
__device__ __forceinline__ float blend_g(const BlendArgs& a, const ChunkKeys& k, uint32_t finner,
                                         float g_const) {
  if constexpr (D == Draw::kNone) {
    return g_const;
  } else if constexpr (D == Draw::kFirst) {
    return drawn(k.fkey1, finner, a.limit1) ? a.g_table[1] : a.g_table[0];
  } else if constexpr (D == Draw::kSecond) {
    return drawn(k.fkey2, finner, a.limit2) ? a.g_table[2] : a.g_table[0];
  } else {
    const bool m1 = drawn(k.fkey1, finner, a.limit1);
    const bool m2 = drawn(k.fkey2, finner, a.limit2);
    return m1 ? (m2 ? a.g_table[3] : a.g_table[1]) : (m2 ? a.g_table[2] : a.g_table[0]);
  }
}

// base + tau * g in float32 with _rn intrinsics, rounded once to T.
template <typename T>
__device__ __forceinline__ T blend_value(T base, T tau, float g) {
  return Store<T>::from(__fadd_rn(widen(base), __fmul_rn(widen(tau), g)));
}

// Elements [begin, end) of one tensor. The element counter of the hash is the index's low 32
// bits, lo + i with 32-bit adds (a chunk never crosses a multiple of 2^32, so `high` holds).
template <typename T, Draw D>
__device__ __forceinline__ void blend_chunk(const BlendArgs& a, const BlendRow& r, int64_t begin,
                                            int64_t end, const ChunkKeys& k, float g_const) {
  constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte access
  union Vec {  // 16 bytes: moved as one uint4 (vector load and store), used as kVec values
    uint4 raw;
    T v[kVec];
  };
  static_assert(kBlendChunk % kVec == 0, "chunks start on a vector boundary");
  T* out = reinterpret_cast<T*>(r.out);
  const T* base = reinterpret_cast<const T*>(r.base);
  const T* tau = reinterpret_cast<const T*>(r.tau);
  int64_t scalar_from = begin;
  if (((r.out | r.base | r.tau) & 15) == 0) {  // 16-byte aligned: vector accesses
    const int64_t vend = begin + (end - begin) / kVec * kVec;
    for (int64_t v = begin + int64_t(threadIdx.x) * kVec; v < vend; v += kThreads * kVec) {
      Vec b, t, o;
      b.raw = *reinterpret_cast<const uint4*>(base + v);
      t.raw = *reinterpret_cast<const uint4*>(tau + v);
      const uint32_t lo = uint32_t(v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t finner = D == Draw::kNone ? 0u : folded_inner(k, lo + uint32_t(j));
        o.v[j] = blend_value(b.v[j], t.v[j], blend_g<D>(a, k, finner, g_const));
      }
      store16(out + v, o.raw);
    }
    scalar_from = vend;
  }
  for (int64_t e = scalar_from + threadIdx.x; e < end; e += kThreads) {
    const uint32_t finner = D == Draw::kNone ? 0u : folded_inner(k, uint32_t(e));
    out[e] = blend_value(base[e], tau[e], blend_g<D>(a, k, finner, g_const));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) blend_kernel(BlendArgs a) {
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const BlendRow r = a.rows[blend_find_row(a.rows, a.num_rows, c)];  // same for the block
    const int64_t begin = (c - r.first_chunk) * kBlendChunk;
    const int64_t end = min(r.numel, begin + kBlendChunk);
    if (r.dense != 0 || !(a.draw1 || a.draw2)) {
      const float g = r.dense != 0 ? a.g_dense : a.g_table[0];
      blend_chunk<T, Draw::kNone>(a, r, begin, end, ChunkKeys{0u, 0u, 0u}, g);
      continue;
    }
    const ChunkKeys k{fold16(uniform01_high(uint64_t(begin))),  // a chunk never crosses 2^32
                      fold16(stream_key(a.seed, uint32_t(r.stream1))),
                      fold16(stream_key(a.seed, uint32_t(r.stream2)))};
    if (a.draw1 && a.draw2) {
      blend_chunk<T, Draw::kBoth>(a, r, begin, end, k, 0.f);
    } else if (a.draw1) {
      blend_chunk<T, Draw::kFirst>(a, r, begin, end, k, 0.f);
    } else {
      blend_chunk<T, Draw::kSecond>(a, r, begin, end, k, 0.f);
    }
  }
}

// Whether a mask is drawn, and its limit: a mask that never keeps (keep <= 0 or NaN: threshold
// 0) gives m = 0 everywhere, as an undrawn one does.
bool draw_limit(bool draw, float keep, uint32_t* limit) {
  const int32_t thr = uniform01_threshold(keep);
  *limit = uint32_t((uint64_t(thr) << 8) - 1);
  return draw && thr > 0;
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
  a.draw1 = draw_limit(p.draw1, p.keep1, &a.limit1);
  a.draw2 = draw_limit(p.draw2, p.keep2, &a.limit2);
  a.seed = p.seed;
  const int blocks = int(std::min(kMaxBlocks, p.num_chunks));
  MELDKIT_DISPATCH_FLOAT(p.dtype, "blend", "bases", T, {
    blend_kernel<T><<<blocks, kThreads, 0, s>>>(a);
    cuda_check(cudaGetLastError(), "blend", "kernel launch");
  });
}

}  // namespace meldkit
