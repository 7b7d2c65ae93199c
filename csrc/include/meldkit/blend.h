// blend: per-step parameter blending of the merge family (ExDe, spec i2v.md section 7.1).
//
// For every tensor i of a model, from its base and task vector tau (fine-tuned - base):
//   out[e] = base[e] + tau[e] * g(e)                     (float32: one product, one sum)
//   g(e)   = g_dense                                      for dense tensors (1-D: never dropped)
//          = g_table[m1(e) | m2(e) << 1]                  otherwise
//   m_k(e) = uniform01(stream_key(seed, stream_k[i]), e) < keep_k
//                                                         (DARE masks, regenerated, never stored)
// The host precomputes the float32 table g = {a, a + b, a + c, (a + b) + c} and the dense value
// a + b * keep1 + c * keep2 (each step rounded to float32, as the reference does). A mask whose
// coefficient is zero is not drawn.
//
// Work layout (the same on the CPU and on CUDA): every tensor is cut into chunks of kBlendChunk
// elements; a plan lists one BlendRow per tensor with the index of its first chunk, so chunk c
// belongs to the last row whose first_chunk <= c (binary search). The rows are built once per
// set of tensors (bindings: blend_plan) and kept by the caller (in device memory on CUDA); each
// blend is then one call, one kernel launch on CUDA, whatever the number of tensors.
#pragma once

#include <cstdint>

#include "meldkit/dtype.h"
#include "meldkit/macros.h"

namespace meldkit {

// Elements per chunk; a chunk never crosses a multiple of 2^32 (uniform01_high stays valid).
constexpr int64_t kBlendChunk = int64_t(1) << 14;

// One tensor of a plan: eight int64 words, the layout of the plan table [num_tensors, 8].
struct BlendRow {
  int64_t out;          // address of the output (written)
  int64_t base;         // address of the base (may equal out: read before write, per element)
  int64_t tau;          // address of the task vector
  int64_t numel;        // elements
  int64_t first_chunk;  // index of this tensor's first chunk
  int64_t stream1;      // mask streams (uint32) of mask 1 and mask 2
  int64_t stream2;
  int64_t dense;  // 1 = no masks (g_dense)
};
static_assert(sizeof(BlendRow) == 8 * sizeof(int64_t), "BlendRow is the [N, 8] int64 table");
constexpr int kBlendRowWords = 8;

// The row that owns chunk c: the last row with first_chunk <= c (rows without elements share
// their successor's first_chunk and are skipped that way).
MELDKIT_INLINE int blend_find_row(const BlendRow* rows, int num_rows, int64_t c) {
  int lo = 0, hi = num_rows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (rows[mid].first_chunk <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

struct BlendParams {
  const BlendRow* rows = nullptr;  // [num_tensors]: host memory (CPU), device memory (CUDA)
  int num_tensors = 0;
  int64_t num_chunks = 0;  // total over all rows
  DType dtype = DType::kFloat32;
  float g_table[4] = {0.f, 0.f, 0.f, 0.f};
  float g_dense = 0.f;
  float keep1 = 1.f, keep2 = 1.f;
  bool draw1 = false, draw2 = false;  // whether mask k matters (its coefficient is nonzero)
  uint64_t seed = 0;
};

void blend_cpu(const BlendParams& p);
// Launches one kernel on `stream` (no host synchronisation).
void blend_cuda(const BlendParams& p, int device, void* stream);

}  // namespace meldkit
