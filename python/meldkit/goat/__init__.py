"""GOAT: SVD-structured mixture-of-LoRA-experts fine-tuning (Fan et al., "Make LoRA Great Again:
Boosting LoRA with Adaptive Singular Values and Mixture-of-Experts Optimization Alignment",
ICML 2025, arXiv 2502.16894).

Every adapted ``nn.Linear`` (weight W0 ∈ R^{m×n}) becomes a :class:`GoatLinear`::

    y = W̃0 x + b + Σ_{e∈Ω(x)} w_e(x) · s · B_e A_e dropout_e(x)

with E experts of rank d = r/E (A_e ∈ R^{d×n}, B_e ∈ R^{m×d}), a bias-free router
z = W_z x, p = softmax(z), Ω = the top k of p (ties to the lower index) and w = p renormalised
over Ω. The experts start from E segments spread over the whole singular spectrum of W0, scaled
so that s·B_e A_e = (1/ρ)·U_e Σ_e V_eᵀ, and the frozen base becomes
W̃0 = W0 − (s/E) Σ_e B_e A_e, so the layer equals W0 x in expectation over routing
(:mod:`meldkit.goat.init`). The experts run through the fused op :func:`meldkit.ops.routed_lora`.

Usage::

    import meldkit.goat as goat

    model = goat.wrap(model, goat.GoatConfig(rank=32, target_modules=["q_proj", "v_proj"]))
    loss = task_loss(model(batch)) + goat.aux_loss(model)      # aux_loss: coef · Σ layers
    ...
    goat.save_adapter(model, "adapter.safetensors")
    fresh = goat.load_adapter(load_base_model(), "adapter.safetensors")   # bit-exact
    base = goat.unwrap(fresh)                                  # original nn.Linear layers back

**The scaling factor s: paper vs released code.** The paper (Theorem 3.5) derives
``s = √(3·n·η / d)``, n = in_features, d = the per-expert rank, η = (full fine-tuning lr) / (LoRA
lr): the s that makes a low-rank expert's equivalent gradient match a full-rank expert's. It
therefore depends on the layer's input size (for RoBERTa-large, n = 1024, d = 4, η = 1: s ≈ 27.7;
55.4 for the 4096-wide down-projection). The released code's ``goat`` init instead uses
``s = α / d`` with the scripts' α = 2r, i.e. s = 2E = 16 for every layer and every setting.
``GoatConfig(scaling="paper")`` (the default) uses the formula, ``scaling="official"`` reproduces
the released scripts (``alpha`` defaults to 2·rank), and a number sets s directly. The SVD init
divides the singular values by s·ρ, so at initialisation s·B A is the same either way; s
changes the effective learning rate of the experts (the equivalent gradient is proportional to
s), which is why the two presets train differently.

**GOAT-s** (the paper's App. E, Table 8), ``GoatConfig(per_expert_scaling=True)``: expert j of a
layer gets its own s_j = s·√(σ_1/σ_j), σ_j the sum of the singular values of its SVD segment
(expert 1 keeps s); the init divides each expert's singular values by its own s_j, so the
starting point and the base adjustment are GOAT's, while experts on weaker parts of the spectrum
learn faster. The paper reports it on par with GOAT (average 71.02 against 71.12 over NLG,
NLU, image classification and commonsense reasoning). The factors are a buffer of each layer,
saved in the adapter file.

Training: only the experts and routers are trainable (fp32 master weights whatever the base
dtype, also after ``model.to(torch.bfloat16)``, which casts the base only; the model's other
parameters are frozen). Under autocast a GOAT layer returns the autocast dtype, as the
``nn.Linear`` it replaces, from an fp32 sum of the base's and the experts' outputs. In
training mode each layer draws a fresh dropout seed from torch's default CPU generator on every
forward, so ``torch.manual_seed`` reproduces a run; activation checkpointing
(``torch.utils.checkpoint``, whose default ``preserve_rng_state=True`` restores that generator
before recomputing) replays the same masks.
With the Hugging Face ``Trainer``, use ``meldkit.goat.GoatTrainer`` (a ``Trainer`` whose
training loss adds :func:`aux_loss`; ``GoatTrainerMixin`` for another Trainer subclass).
Checkpoint with ``use_reentrant=False``: the reentrant variant runs the forward without autograd,
so :func:`aux_loss` could not reach the routers and raises (unless ``aux_loss_coef=0``);
``GoatTrainer`` picks ``use_reentrant=False`` when checkpointing is on and the user chose
nothing. Everything a layer holds is an ordinary parameter or a constant, so DDP and FSDP
replicate it like any module (each replica computes its own aux loss from its own tokens);
under FSDP call :func:`save_adapter` on every rank (it gathers the shards; rank 0 writes).
``nn.DataParallel`` on several devices is refused in training: its replicas share each layer's
record of router probabilities, so the aux loss would be one replica's; use DDP.
"""

from meldkit.goat.config import GoatConfig
from meldkit.goat.io import AdapterError, load_adapter, read_adapter, save_adapter
from meldkit.goat.layer import GoatLinear
from meldkit.goat.model import aux_loss, config_of, goat_layers, unwrap, wrap

__all__ = [
    "AdapterError",
    "GoatConfig",
    "GoatLinear",
    "GoatTrainer",
    "GoatTrainerMixin",
    "aux_loss",
    "config_of",
    "goat_layers",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "unwrap",
    "wrap",
]


def __getattr__(name: str):
    # GoatTrainer subclasses transformers.Trainer: import transformers only when it is asked for.
    if name in ("GoatTrainer", "GoatTrainerMixin"):
        from meldkit.goat import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'meldkit.goat' has no attribute {name!r}")
