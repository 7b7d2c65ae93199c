"""Weak-to-strong decoding by logit fusion: DLF and proxy-tuning for Hugging Face causal LMs.

**Dynamic Logit Fusion** (DLF; Fan, Lu, Wei, Tian, Qu, Chen, Cheng, "On Giant's Shoulders:
Effortless Weak to Strong by Dynamic Logits Fusion", NeurIPS 2024, arXiv 2406.15480) steers a large
base model with small fine-tuned experts without touching the large model's weights. At every
decoding step, with raw logits M_L (large base), M_S (small base) and M_t (small expert t), it
samples from

    P̃ = softmax(M_L + α·(M_t − M_S))

and picks α (on the grid 0.0, 0.1, …, 2.0) and the one active expert t per row and step so that
the large model's shift mirrors the small model's fine-tuning shift in both KL directions:

    min_{t,α} (KL(P̃‖P) − mean_t KL(Q_t‖Q))² + (KL(P‖P̃) − mean_t KL(Q‖Q_t))²

with P = softmax(M_L), Q = softmax(M_S), Q_t = softmax(M_t). The per-step solver is
:func:`meldkit.ops.logit_fusion`; this package runs the models around it.

**Proxy-tuning** (Liu, Han, Wang, Tsvetkov, Choi, Smith, "Tuning Language Models by Proxy", COLM
2024, arXiv 2401.08565) is the fixed-α special case, α = 1: :func:`proxy_tuning`, or
``generate(..., mode="static", alpha=1.0)``. With several experts, static mode adds all their
shifts (M_L + α·Σ_t (M_t − M_S), as DExperts); ``alpha=0`` decodes with the large model alone.

**Contrastive decoding** (Li, Holtzman, Fried, Liang, Eisner, Hashimoto, Zettlemoyer, Lewis,
ACL 2023) contrasts a large expert with a small amateur: :func:`contrastive_decoding`, or
``generate(expert, amateur, [], ..., mode="contrastive")``: log p_expert − log p_amateur over the
tokens the expert finds plausible (p ≥ 0.1·max p). **Classifier-free guidance** is static mode
with one model as large, small base and expert, the condition as the expert's prompt
(``expert_prompts``) and the guidance scale as ``alpha``.

Two entry points:

* :func:`generate`: an own decoding loop. Each model is prefilled once and keeps its own KV cache;
  each step feeds only the new token; prompts are batched with left padding; rows stop on EOS or
  stop strings; the result carries the texts, ids and the per-step (α, expert) trace.
* :class:`DynamicLogitFusionProcessor`: a ``transformers`` ``LogitsProcessor`` for callers of
  ``large.generate(...)`` (greedy or sampling, ``num_beams=1`` only).

Experts are full small models or LoRA adapters of one ``peft.PeftModel`` small base (the base and
all adapters then run as one mixed adapter batch: the small base is loaded once). An expert may
also be the small base itself with a task prompt (``expert_prompts``: the paper's in-context
learning variant). All models must share one tokenizer; models whose embeddings carry extra padded
rows are sliced to ``len(tokenizer)``; a model with fewer logits than the tokenizer has tokens is
refused. Models may sit on different devices: logits are gathered where the large model's come
out. Temperature and top-p act only on the fused logits, at sampling time.
"""

from meldkit.dlf.fusion import contrastive_logits, fuse_logits, fusion_diagnostics
from meldkit.dlf.generate import DLFOutput, contrastive_decoding, generate, proxy_tuning
from meldkit.dlf.processor import DynamicLogitFusionProcessor

__all__ = [
    "DLFOutput",
    "DynamicLogitFusionProcessor",
    "contrastive_decoding",
    "contrastive_logits",
    "fuse_logits",
    "fusion_diagnostics",
    "generate",
    "proxy_tuning",
]
