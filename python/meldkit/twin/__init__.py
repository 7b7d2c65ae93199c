"""Twin-Merging (Lu et al., NeurIPS 2024): a shared expert, compressed exclusive knowledge per
task, and a router that merges them per input.

::

    from meldkit import twin

    experts = twin.build(base, {"banking": m1, "clinc": m2, "news": m3})   # θ_s and SVD factors
    model = twin.TwinModel(base, experts)                                  # routed inference
    twin.train_router(model, train_texts, val_texts, tokenizer=tok)        # held-out selection
    logits = model(**batch).logits
    twin.save(model, "out/")  ;  model = twin.load("out/", base)

See :func:`build` for the disentanglement and :class:`TwinModel` for inference. The generative
variant over LoRA adapters of a causal LM: :func:`build_lora` and :class:`TwinLoraModel`.
"""

from meldkit.twin.build import DEFAULT_EXCLUDE, TwinError, TwinExperts, build
from meldkit.twin.io import load, save
from meldkit.twin.layers import TwinEmbedding, TwinLayerNorm, TwinLinear
from meldkit.twin.lora import (
    LoraAdapter,
    TwinLoraExperts,
    TwinLoraLinear,
    TwinLoraModel,
    align_adapters,
    build_lora,
    last_token_hidden,
    read_adapter,
)
from meldkit.twin.model import (
    RouterTraining,
    TwinModel,
    TwinRouter,
    mean_pooled_last_hidden,
    text_features,
    train_router,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "LoraAdapter",
    "RouterTraining",
    "TwinEmbedding",
    "TwinError",
    "TwinExperts",
    "TwinLayerNorm",
    "TwinLinear",
    "TwinLoraExperts",
    "TwinLoraLinear",
    "TwinLoraModel",
    "TwinModel",
    "TwinRouter",
    "align_adapters",
    "build",
    "build_lora",
    "last_token_hidden",
    "load",
    "mean_pooled_last_hidden",
    "read_adapter",
    "save",
    "text_features",
    "train_router",
]
