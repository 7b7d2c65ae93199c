"""The GOAT adapter configuration: every field validated on construction, serialisable as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from typing import Any

SCALING_PRESETS = ("paper", "official")
DROPOUT_MODES = ("per_expert", "shared")
INITS = ("goat", "lora", "pissa", "milora")
ALL_LINEAR = "all-linear"
AUTO = "auto"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class GoatConfig:
    """How :func:`meldkit.goat.wrap` turns ``nn.Linear`` layers into GOAT layers.

    Parameters
    ----------
    num_experts : int
        E, the number of low-rank experts per layer (≥ 1).
    top_k : int
        k, experts each token is routed to (1 ≤ k ≤ E). The paper's default is "2in8".
    rank : int
        r, the *total* LoRA rank of a layer, shared evenly by the experts: each expert has rank
        ``r_e = rank // num_experts``. Must be a positive multiple of ``num_experts``.
    alpha : float or None
        LoRA α, used only by ``scaling="official"`` (``s = α / r_e``). ``None`` means ``2·rank``,
        the value of every released GOAT script (giving s = 2E = 16 for E = 8).
    rho : float
        ρ > 0, the SVD init's damping: expert j starts at ``s·B_j A_j = (1/ρ) U_j Σ_j V_jᵀ``.
        The official code hard-codes 10.
    scaling : {"paper", "official"} or float
        The factor s multiplying every expert's output (see the module docs of
        :mod:`meldkit.goat`):

        - ``"paper"``: ``s = √(3·n·η / r_e)``, n = the layer's ``in_features`` (Theorem 3.5 of the
          paper; s therefore differs between layer shapes);
        - ``"official"``: ``s = α / r_e``, what the released code's ``goat`` init runs;
        - a positive float: that s for every layer.
    eta : float
        η > 0, the ratio (full fine-tuning learning rate) / (LoRA learning rate) in the paper's
        scaling formula; used only by ``scaling="paper"``. The paper uses 1 for ViT and RoBERTa,
        0.1 for LLaMA at lr 1e-4.
    init : {"goat", "lora", "pissa", "milora"}
        Expert initialisation (:mod:`meldkit.goat.init`): ``"goat"`` spreads the experts over
        the whole spectrum of the pretrained weight, ``"pissa"`` gives them its principal
        singular triplets, ``"milora"`` its minor ones (the three subtract their expected
        contribution from the frozen base), ``"lora"`` is plain LoRA (A Kaiming-uniform, B = 0,
        base untouched).
    target_modules : "all-linear" or sequence of str
        Which ``nn.Linear`` layers to adapt: module-name suffixes matched as PEFT does (``"q_proj"``
        matches ``model.layers.0.self_attn.q_proj``; a full name matches itself), or
        ``"all-linear"``: every ``nn.Linear`` except the output head of a Hugging Face model
        (``get_output_embeddings()``) and a classification head named ``score`` or
        ``classifier``, and, for the SVD inits, every layer with min(out_features,
        in_features) < ``rank`` (a MoE router gate, say; skipped with a warning naming them).
        GPT-2's ``Conv1D`` layers are not ``nn.Linear`` and are not adapted.
    modules_to_save : "auto" or sequence of str
        Modules trained in full next to the experts and stored in the adapter file (PEFT's
        ``modules_to_save``), by module-name suffix like ``target_modules``. ``"auto"`` (the
        default) takes the model's classification head when it has one at its top level
        (``score``, ``classifier`` or ``classification_head``, as Hugging Face's
        ``...ForSequenceClassification`` models name it) and it is not a target: a freshly
        initialised head must train, and an adapter without it would not reproduce the model.
        ``()`` trains and saves nothing but the experts and routers. A saved module is an
        ordinary one: ``model.to(torch.bfloat16)`` casts it (the experts and routers stay fp32),
        and it then trains in bf16 without an fp32 copy, small updates rounding away; for bf16
        training keep the model in fp32 under ``torch.autocast``.
    dropout : float
        Dropout probability on the experts' input (training mode only); 0 ≤ dropout < 1.
    dropout_mode : {"per_expert", "shared"}
        ``"per_expert"`` (the official code's behaviour, the default): an independent mask per
        expert. ``"shared"``: one mask for every expert of a layer, a fast path of meldkit's
        own (not the official code's): the experts' shrink and its backward are one GEMM each,
        as without dropout, instead of one per expert. Whether per-expert masks matter for
        accuracy is open (the paper does not say).
    aux_loss_coef : float
        Coefficient of the load-balancing loss returned by :func:`meldkit.goat.aux_loss`
        (≥ 0; the paper's 1e-3).
    per_expert_scaling : bool
        GOAT-s (the paper's App. E, Table 8): expert j of a layer gets its own factor
        s_j = s·√(σ_1/σ_j), σ_j the sum of the singular values of its SVD segment (expert 1 keeps
        s), instead of one s for all; the init divides each expert's singular values by its own
        s_j, so the starting point and the base adjustment stay the paper's. SVD inits only.
        The factors are stored with the adapter. Default False (GOAT).

    Raises
    ------
    ValueError
        Naming the first field whose value is invalid.
    """

    num_experts: int = 8
    top_k: int = 2
    rank: int = 32
    alpha: float | None = None
    rho: float = 10.0
    scaling: str | float = "paper"
    eta: float = 1.0
    init: str = "goat"
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    modules_to_save: str | tuple[str, ...] = AUTO
    dropout: float = 0.05
    aux_loss_coef: float = 1e-3
    per_expert_scaling: bool = False
    dropout_mode: str = "per_expert"

    def __post_init__(self) -> None:
        e = self.num_experts
        if not _is_int(e) or e < 1:
            raise ValueError(f"GoatConfig.num_experts: must be an int ≥ 1, got {e!r}")
        if not _is_int(self.top_k) or not 1 <= self.top_k <= e:
            raise ValueError(
                f"GoatConfig.top_k: must be an int with 1 ≤ top_k ≤ num_experts = {e}, "
                f"got {self.top_k!r}"
            )
        if not _is_int(self.rank) or self.rank < e or self.rank % e:
            raise ValueError(
                f"GoatConfig.rank: the total rank must be an int ≥ num_experts = {e} and "
                f"divisible by it (each expert gets rank // num_experts), got {self.rank!r}"
            )
        if self.alpha is not None and not (_is_real(self.alpha) and self.alpha > 0):
            raise ValueError(
                f"GoatConfig.alpha: must be a finite number > 0 or None, got {self.alpha!r}"
            )
        if self.alpha is not None and self.scaling != "official":
            warnings.warn(
                f"GoatConfig: alpha={self.alpha!r} is used only by scaling='official' (s = alpha "
                f"/ r_e); with scaling={self.scaling!r} it has no effect. For PEFT's LoRA scaling "
                "pass scaling='official' (or the number alpha / r_e)",
                UserWarning,
                stacklevel=3,
            )
        if not (_is_real(self.rho) and self.rho > 0):
            raise ValueError(f"GoatConfig.rho: must be a finite number > 0, got {self.rho!r}")
        if isinstance(self.scaling, str):
            if self.scaling not in SCALING_PRESETS:
                raise ValueError(
                    f"GoatConfig.scaling: must be one of {SCALING_PRESETS} or a number > 0, "
                    f"got {self.scaling!r}"
                )
        elif not (_is_real(self.scaling) and self.scaling > 0):
            raise ValueError(
                f"GoatConfig.scaling: must be one of {SCALING_PRESETS} or a finite number > 0, "
                f"got {self.scaling!r}"
            )
        if not (_is_real(self.eta) and self.eta > 0):
            raise ValueError(f"GoatConfig.eta: must be a finite number > 0, got {self.eta!r}")
        if self.init not in INITS:
            raise ValueError(f"GoatConfig.init: must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
        object.__setattr__(self, "modules_to_save", _check_saved(self.modules_to_save))
        if not (_is_real(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"GoatConfig.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(
                f"GoatConfig.dropout_mode: must be one of {DROPOUT_MODES}, got "
                f"{self.dropout_mode!r}"
            )
        if not isinstance(self.per_expert_scaling, bool):
            raise ValueError(
                f"GoatConfig.per_expert_scaling: must be True or False, got "
                f"{self.per_expert_scaling!r}"
            )
        if self.per_expert_scaling and self.init == "lora":
            raise ValueError(
                "GoatConfig.per_expert_scaling: GOAT-s scales each expert by its SVD segment's "
                "singular values, so it needs an SVD init ('goat', 'pissa' or 'milora'), not "
                "init='lora'"
            )
        if not (_is_real(self.aux_loss_coef) and self.aux_loss_coef >= 0):
            raise ValueError(
                f"GoatConfig.aux_loss_coef: must be a finite number ≥ 0, got {self.aux_loss_coef!r}"
            )

    @property
    def expert_rank(self) -> int:
        """r_e = rank // num_experts, the rank of each expert."""
        return self.rank // self.num_experts

    def scaling_for(self, in_features: int) -> float:
        """The factor s of a layer with ``in_features`` inputs (see ``scaling``)."""
        if self.scaling == "paper":
            return math.sqrt(3.0 * in_features * self.eta / self.expert_rank)
        if self.scaling == "official":
            alpha = 2.0 * self.rank if self.alpha is None else float(self.alpha)
            return alpha / self.expert_rank
        return float(self.scaling)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("target_modules", "modules_to_save"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GoatConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"GoatConfig: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> GoatConfig:
        return cls.from_dict(json.loads(text))


def _check_names(field: str, value: Any, keyword: str, *, empty_ok: bool) -> str | tuple[str, ...]:
    """``value`` of the module-name field ``field``: ``keyword`` or a list of module-name
    suffixes (non-empty unless ``empty_ok``), as a tuple."""
    if isinstance(value, str):
        if value == keyword:
            return value
        raise ValueError(
            f"GoatConfig.{field}: a string must be {keyword!r}; give module-name suffixes as a "
            f"list, e.g. [{value!r}]"
        )
    if not isinstance(value, Sequence) or not (value or empty_ok):
        kind = "a list" if empty_ok else "a non-empty list"
        raise ValueError(
            f"GoatConfig.{field}: must be {keyword!r} or {kind} of module-name suffixes, "
            f"got {value!r}"
        )
    bad = [t for t in value if not isinstance(t, str) or not t or t.startswith(".")]
    if bad:
        raise ValueError(f"GoatConfig.{field}: not module-name suffixes: {bad!r}")
    return tuple(value)


def _check_targets(targets: Any) -> str | tuple[str, ...]:
    return _check_names("target_modules", targets, ALL_LINEAR, empty_ok=False)


def _check_saved(modules: Any) -> str | tuple[str, ...]:
    return _check_names("modules_to_save", modules, AUTO, empty_ok=True)
