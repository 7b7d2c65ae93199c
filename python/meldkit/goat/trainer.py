"""``GoatTrainer``: the Hugging Face ``Trainer`` with GOAT's load-balancing loss added.

Imported lazily by :mod:`meldkit.goat` (``meldkit.goat.GoatTrainer``), so that meldkit does not
need transformers unless this class is used.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from typing import Any

import transformers
from torch import nn

from meldkit.goat.model import aux_loss

logger = logging.getLogger(__name__)


class GoatTrainerMixin:
    """Adds ``meldkit.goat.aux_loss(model)`` to the loss of a ``transformers.Trainer`` subclass
    during training (mix it in before the Trainer class: ``class T(GoatTrainerMixin, Trainer)``).

    The task loss is the Trainer's own (the model's ``loss`` output, label smoothing or
    ``compute_loss_func``). In evaluation (model in eval mode) the loss is the task loss only.
    When the Trainer does not divide the loss by the gradient-accumulation steps itself (the
    task loss is already normalised over the accumulated batch, ``num_items_in_batch``), the
    aux loss, a per-batch mean, is divided here instead.

    With activation (gradient) checkpointing enabled and no ``use_reentrant`` chosen in its
    kwargs, the Trainer is set to ``use_reentrant=False`` (logged): the reentrant variant runs
    the forward without autograd, so the aux loss could not reach the routers. A
    ``use_reentrant=True`` the user chose stays (fine with ``aux_loss_coef=0``).
    ``nn.DataParallel`` (what the Trainer uses with several GPUs in one process) is refused:
    its replicas would each keep their own router probabilities and the aux loss would see one
    replica's; launch with ``torchrun`` (DDP) instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _checkpoint_without_reentrance(self.args)

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
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1 and model.training:
            raise RuntimeError(
                f"GoatTrainer: the model runs under nn.DataParallel on {len(model.device_ids)} "
                "devices (several GPUs in one process), whose replicas each keep their own "
                "router probabilities: the aux loss would count one replica's tokens only. "
                "Launch with torchrun (DistributedDataParallel), or limit CUDA_VISIBLE_DEVICES "
                "to one GPU"
            )
        loss, outputs = parent(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            aux = aux_loss(model)
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                # Set by the training loop (the steps of the current accumulation window, fewer
                # at the end of an epoch); the configured number outside it.
                steps = getattr(self, "current_gradient_accumulation_steps", None)
                aux = aux / (steps or self.args.gradient_accumulation_steps)
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save (the wrapped model's state dict, which a checkpoint resumes
        from), plus the GOAT adapter as ``goat_adapter.safetensors`` in the same folder: the file
        to give :func:`meldkit.goat.load_adapter` with the base model. (``from_pretrained`` on
        the folder would not restore GOAT's layers: their names are not the base's.)"""
        super().save_model(output_dir, _internal_call)
        from meldkit.goat.io import _is_sharded, save_adapter

        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save or _is_sharded(self.model):  # FSDP: every rank gathers
            path = save_adapter(self.model, folder)
            if self.args.should_save:
                logger.info("GoatTrainer: GOAT adapter saved to %s", path)

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (``training_step``) for a loss it will not divide further."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        ) or (getattr(self, "compute_loss_func", None) is not None)


def _checkpoint_without_reentrance(args: Any) -> None:
    """``use_reentrant=False`` in ``args``' activation-checkpointing kwargs when checkpointing
    is enabled and the user did not choose (transformers 5 names them ``activation_*``, 4.x
    ``gradient_*``; 5.x keeps the old names as mirrors of the new)."""
    for flag, key in (
        ("activation_checkpointing", "activation_checkpointing_kwargs"),
        ("gradient_checkpointing", "gradient_checkpointing_kwargs"),
    ):
        if not hasattr(args, key):
            continue
        if not getattr(args, flag, False):
            return
        kwargs = getattr(args, key) or {}
        if isinstance(kwargs, str):  # JSON given on the command line
            kwargs = json.loads(kwargs)
        if "use_reentrant" in kwargs:
            return
        setattr(args, key, {**kwargs, "use_reentrant": False})
        if key == "activation_checkpointing_kwargs" and hasattr(
            args, "gradient_checkpointing_kwargs"
        ):
            args.gradient_checkpointing_kwargs = args.activation_checkpointing_kwargs
        logger.info(
            "GoatTrainer: activation checkpointing with use_reentrant=False (the reentrant "
            "variant would give the routers no gradient from the aux loss); pass "
            "use_reentrant in %s to choose",
            key,
        )
        return


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
