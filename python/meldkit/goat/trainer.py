"""``GoatTrainer``: the Hugging Face ``Trainer`` with GOAT's load-balancing loss added.

Imported lazily by :mod:`meldkit.goat` (``meldkit.goat.GoatTrainer``), so that meldkit does not
need transformers unless this class is used.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import transformers
from torch import nn

from meldkit.goat.model import aux_loss


class GoatTrainerMixin:
    """Adds ``meldkit.goat.aux_loss(model)`` to the loss of a ``transformers.Trainer`` subclass
    during training (mix it in before the Trainer class: ``class T(GoatTrainerMixin, Trainer)``).

    The task loss is the Trainer's own (the model's ``loss`` output, label smoothing or
    ``compute_loss_func``). In evaluation (model in eval mode) the loss is the task loss only.
    When the Trainer does not divide the loss by the gradient-accumulation steps itself (the
    task loss is already normalised over the accumulated batch, ``num_items_in_batch``), the
    aux loss, a per-batch mean, is divided here instead.
    """

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        parent = super().compute_loss
        if _accepts(getattr(parent, "__func__", parent), "num_items_in_batch"):
            kwargs["num_items_in_batch"] = num_items_in_batch  # transformers >= 4.46
        loss, outputs = parent(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            aux = aux_loss(model)
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                aux = aux / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (``training_step``) for a loss it will not divide further."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        ) or (getattr(self, "compute_loss_func", None) is not None)


@functools.lru_cache(maxsize=64)
def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or ``**kwargs``); once per function,
    not per training step."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class GoatTrainer(GoatTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose training loss is the task loss plus
    ``meldkit.goat.aux_loss(model)`` (see :class:`GoatTrainerMixin`)."""


__all__ = ["GoatTrainer", "GoatTrainerMixin"]
