// Routed low-rank experts: the fused forward and backward of an SVD-structured MoE-LoRA layer
// (GOAT; spec: goat.md sections 3.1, 3.2, 3.7 and 10).
//
// For token t (x_t of d_in features), E experts of rank R (A_e [R, d_in], B_e [d_out, R]) and a
// per-expert scale s_e:
//   router mode: z = W_z x_t, p = softmax(z), Omega = the top_k of p (ties: lower index),
//                g_e = p_e / sum_{Omega} p  for e in Omega, else 0
//   gate mode:   g_e = gates[t, e] (given)
//   h_e = A_e xd_e,  xd_e = x_t * keep_e * 1/(1 - dropout)   (keep_e: a counter-based mask)
//   y_t = sum_e (g_e s_e) * (B_e h_e)
// keep_e[t, j] = uniform01(stream_key(seed, e), t * d_in + j) < 1 - dropout, regenerated in the
// backward pass, never stored.
//
// Both passes work per token on the experts with g_e != 0 only (in router mode the k of E
// selected), so they cost O(k/E) of a dense MoE; gate mode keeps h for every expert because the
// gradient of a zero gate still needs it. Weight gradients are reduced over tokens with each
// thread owning a slice of feature columns, in token order: deterministic, no atomics.
#pragma once

#include <cstdint>

#include "meldkit/dtype.h"
#include "meldkit/macros.h"
#include "meldkit/random.h"

namespace meldkit {

// Largest E the kernels take (per-token state lives in fixed arrays).
constexpr int kRoutedLoraMaxExperts = 64;

struct RoutedLoraParams {
  int64_t num_tokens = 0;
  int d_in = 0, d_out = 0, num_experts = 0, rank = 0;
  int top_k = 0;         // 0: gate mode
  double dropout = 0.0;  // keep and scale are rounded from the double, as the reference does
  uint64_t seed = 0;
  // Acc = float (float32 for every float output below), or double when x is float64 (every
  // floating input is then float64 and so are probs, weights and h).
  const void* x = nullptr;  // [N, d_in] x_dtype
  DType x_dtype = DType::kFloat32;
  const void* lora_a = nullptr;  // [E, R, d_in]
  DType a_dtype = DType::kFloat32;
  const void* lora_b = nullptr;  // [E, d_out, R]
  DType b_dtype = DType::kFloat32;
  const float* scaling = nullptr;       // [E]
  const double* scaling_f64 = nullptr;  // [E], instead of `scaling` in the CPU float64 mode
  const void* router = nullptr;         // [E, d_in] (router mode)
  DType router_dtype = DType::kFloat32;
  const void* gates = nullptr;  // [N, E] (gate mode)
  DType gates_dtype = DType::kFloat32;

  // Forward outputs.
  void* y = nullptr;        // [N, d_out] x_dtype
  void* probs = nullptr;    // [N, E] Acc, router mode (may be null in gate mode)
  void* weights = nullptr;  // [N, E] Acc: the g actually applied
  void* h = nullptr;        // [N, E*R] Acc: A_e xd_e (0 for unselected experts in router mode)

  // Backward inputs (weights, probs and h as the forward wrote them).
  const void* dy = nullptr;      // [N, d_out] x_dtype
  const void* dprobs = nullptr;  // [N, E] Acc, optional
  // Backward outputs, each optional (null: not needed), overwritten.
  void* dx = nullptr;       // [N, d_in] x_dtype
  void* da = nullptr;       // like lora_a
  void* db = nullptr;       // like lora_b
  void* drouter = nullptr;  // like router
  void* dgates = nullptr;   // like gates
};

// The dropout mask's scale and keep probability, as float32 (the reference's values).
struct DropoutRule {
  float keep = 1.f, scale = 1.f;
  bool active = false;
};
inline DropoutRule dropout_rule(double p) {
  DropoutRule r;
  r.active = p > 0.0;
  if (r.active) {
    r.keep = float(1.0 - p);
    r.scale = float(1.0 / (1.0 - p));
  }
  return r;
}

MELDKIT_INLINE bool dropout_keep(uint32_t key, uint64_t element, float keep) {
  return uniform01(key, element) < keep;
}

// The factor a feature is multiplied by: scale if kept, else 0. A multiply, not a select, so a
// NaN in a dropped feature still propagates (as nn.Dropout's x * mask does).
MELDKIT_INLINE float dropout_factor(uint32_t key, uint64_t element, const DropoutRule& rule) {
  return dropout_keep(key, element, rule.keep) ? rule.scale : 0.f;
}

// out = src * dropout_factor(stream_key(seed, expert), t * cols + j) for src [rows, cols] in
// float32 or float64 (dtype), elementwise: expert `expert`'s dropout mask times 1/(1 - dropout),
// the per-token kernels' and the reference's masks. The GEMM path of routed_lora applies it to x
// (the shrink's input) and to the backward's dx contributions. out may be src.
struct DropoutApplyParams {
  const void* src = nullptr;
  void* out = nullptr;
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  double dropout = 0.0;
  uint64_t seed = 0;
  uint32_t expert = 0;
};
void dropout_apply_cpu(const DropoutApplyParams& p);
void dropout_apply_cuda(const DropoutApplyParams& p, int device, void* stream);

void routed_lora_forward_cpu(const RoutedLoraParams& p);
void routed_lora_backward_cpu(const RoutedLoraParams& p);
void routed_lora_forward_cuda(const RoutedLoraParams& p, int device, void* stream);
void routed_lora_backward_cuda(const RoutedLoraParams& p, int device, void* stream);

}  // namespace meldkit
