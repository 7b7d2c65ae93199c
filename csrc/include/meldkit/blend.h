// blend: per-step parameter blending of the merge family (ExDe, spec i2v.md section 7.1).
//
// For every tensor i of a model, from its base and task vector tau (fine-tuned - base):
//   out[e] = base[e] + tau[e] * g(e)                     (float32: one product, one sum)
//   g(e)   = g_dense                                      for dense tensors (1-D: never dropped)
//          = g_table[m1(e) | m2(e) << 1]                  otherwise
//   m_k(e) = uniform01(key_k[i], e) < keep_k              (DARE masks, regenerated, never stored)
// The host precomputes the float32 table g = {a, a + b, a + c, (a + b) + c} and the dense value
// a + b * keep1 + c * keep2 (each step rounded to float32, as the reference does). A mask whose
// coefficient is zero is not drawn.
#pragma once

#include <cstdint>

#include "meldkit/dtype.h"

namespace meldkit {

struct BlendParams {
  int num_tensors = 0;
  void* const* outs = nullptr;         // [num_tensors] host array; each [numel] of dtype
  const void* const* bases = nullptr;  // may equal outs (read before write, per element)
  const void* const* taus = nullptr;
  const int64_t* numels = nullptr;
  const uint32_t* keys1 = nullptr;  // stream keys of mask 1 and mask 2, per tensor
  const uint32_t* keys2 = nullptr;
  const uint8_t* dense = nullptr;  // per tensor: 1 = no masks (g_dense)
  DType dtype = DType::kFloat32;
  float g_table[4] = {0.f, 0.f, 0.f, 0.f};
  float g_dense = 0.f;
  float keep1 = 1.f, keep2 = 1.f;
  bool draw1 = false, draw2 = false;  // whether mask k matters (its coefficient is nonzero)
};

void blend_cpu(const BlendParams& p);
// Launches on `stream` (no host synchronisation); one kernel per tensor.
void blend_cuda(const BlendParams& p, int device, void* stream);

}  // namespace meldkit
