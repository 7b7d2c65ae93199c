// The per-step logit fusion solver of Dynamic Logit Fusion (Fan et al., NeurIPS 2024; spec:
// logit_fusion.md sections 1.3, 2.1 and 2.2).
//
// Per row b, with d_t = z_t - z_S and a grid alpha_1..alpha_n, a candidate c = (t, j) fuses
// s_c = z_L + alpha_j d_t. With K_c = LSE(s_c), K'_c = E_softmax(s_c)[d_t], m_t = E_P[d_t]:
//   F1_c = alpha_j K'_c - (K_c - LSE_L)           = KL(P~_c || P)
//   F2_c = (K_c - LSE_L) - alpha_j m_t            = KL(P || P~_c)
//   A_t  = E_{Q_t}[z_t - z_S] - (LSE_t - LSE_S)   = KL(Q_t || Q)
//   B_t  = E_Q[z_S - z_t] + (LSE_t - LSE_S)       = KL(Q || Q_t)
//   loss_c = (F1_c - mean_t A_t)^2 + (F2_c - mean_t B_t)^2
// and the row picks the smallest loss (ties: smaller alpha, then lower t) among the candidates
// `allowed` names (per-expert alpha ranges; excluded candidates get loss +inf). Every quantity is a
// log-sum-exp or an expectation under a softmax, so one streaming pass over V with online-softmax
// accumulators (running max, sum of exp, sum of exp * weight) gives them all. A vocabulary position
// where any input is -inf is masked out of every distribution; the fused logit there is -inf.
#pragma once

#include <cstdint>

#include "meldkit/dtype.h"
#include "meldkit/macros.h"

namespace meldkit {

// Grid points one call takes (their values travel by value to the CUDA kernels).
constexpr int kLogitFusionMaxAlphas = 64;
constexpr int kLogitFusionMaxExperts = 16;
// The CPU kernel's product runs over a uniform grid (logit_fusion_cpu.cpp): at most this many
// candidates follow each directly computed one, and only while run * |step| * max|d| over a
// 256-position tile stays within the span.
constexpr int kLogitFusionCpuMaxRun = 10;
constexpr float kLogitFusionCpuRunSpan = 16.f;

struct LogitFusionParams {
  int64_t rows = 0, vocab = 0;
  int num_experts = 0, num_alphas = 0;
  DType dtype = DType::kFloat32;
  const void* large = nullptr;    // [B, V]
  const void* small = nullptr;    // [B, V]
  const void* experts = nullptr;  // [T, B, V]
  double alphas[kLogitFusionMaxAlphas] = {};
  // Bit j of allowed[t]: candidate (t, alpha_j) takes part in the search (per-expert ranges).
  // The binding sets every bit when no ranges are given. An excluded candidate's loss is +inf.
  // A row with no allowed candidate at all (a chunk of a grid split into calls) gets alpha 0,
  // expert 0, like a fully masked row.
  uint64_t allowed[kLogitFusionMaxExperts] = {};
  // Outputs in the accumulation type (float, or double for float64 inputs).
  void* loss = nullptr;       // [B, T, n]
  void* alpha = nullptr;      // [B]
  int64_t* expert = nullptr;  // [B]
  void* logits = nullptr;     // [B, V] or null
};

// Online-softmax state of one distribution: max, sum of exp(s - max), sum of exp(s - max) * w.
template <typename Acc>
struct SoftmaxAcc {
  Acc max, sum, wsum;
};

void logit_fusion_cpu(const LogitFusionParams& p);
void logit_fusion_cuda(const LogitFusionParams& p, int device, void* stream);

}  // namespace meldkit
