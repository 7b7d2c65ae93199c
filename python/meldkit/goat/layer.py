"""``GoatLinear``: a frozen ``nn.Linear`` plus E routed low-rank experts (GOAT paper Eq. 9–12)."""

from __future__ import annotations

import torch
from torch import nn

from meldkit.goat.config import GoatConfig
from meldkit.ops.routed_lora import routed_lora
from meldkit.ops.routed_lora_ref import top_k_ref

# Dropout seeds are drawn from [0, SEED_BOUND) of torch's default CPU generator.
SEED_BOUND = 2**62


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread: a forward then is activation
    checkpointing recomputing the layer, whose probabilities the aux loss has already used.
    False inside torch.compile (which recomputes inside its own graphs, not through Python)."""
    if torch.compiler.is_compiling():
        return False
    # Private, but what torch.utils.checkpoint itself uses to tell a recomputation; a torch
    # without it counts recomputed calls again (the aux loss then counts such layers twice).
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _narrower_than_fp32(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


class GoatLinear(nn.Module):
    """A GOAT layer: ``y = W̃0 x + b + Σ_e w_e(x) · s · B_e A_e dropout_e(x)``.

    Built by :func:`meldkit.goat.wrap`; holds the original ``nn.Linear`` as ``base_layer``
    (frozen, its weight adjusted to W̃0 by the SVD inits) and the trainable fp32 expert and
    router weights. The experts run through :func:`meldkit.ops.routed_lora`: router logits
    z = W_z x, p = softmax(z) in fp32, the top-k experts (ties to the lower index) weighted by
    p renormalised over the k.

    Parameters
    ----------
    base_layer : nn.Linear
        The layer to adapt, weight W̃0 ``[m, n]``, optional bias ``[m]``.
    config : GoatConfig
        Gives s (``config.scaling_for(n)``), k, the dropout and the aux-loss coefficient.
    lora_a : Tensor [E, d, n]
        A_1 … A_E (copied into a parameter of the same dtype, normally fp32).
    lora_b : Tensor [E, m, d]
        B_1 … B_E.
    router_weight : Tensor [E, n]
        W_z, the bias-free router.
    scaling : Tensor [E], optional
        Per-expert factors s_j (GOAT-s, ``config.per_expert_scaling``), kept as a buffer that
        moves with the layer (not in its ``state_dict``: adapter files store it); default
        ``config.scaling_for(n)``.

    Attributes
    ----------
    lora_a, lora_b : nn.Parameter
        ``[E, d, n]`` and ``[E, m, d]``.
    router : nn.Linear
        ``nn.Linear(n, E, bias=False)``.
    scaling : float or Tensor [E]
        s, applied to every expert, or GOAT-s's fp32 s_j per expert.
    alignment : tuple of (Tensor [r, n], Tensor [m, r]) or None
        ``(delta_a, delta_b)`` with ``W̃0 = W0 − delta_b @ delta_a`` (fp32, CPU), the factors
        the SVD inits subtracted from the base; None when the base is untouched.
    base_dtype : torch.dtype or None
        The dtype the SVD init rounded W̃0 to (the base weight's when it was wrapped; saved in
        adapter files, whatever the base is cast to later); None when the base is untouched.
    original_weight : Tensor or None
        A CPU copy of W0 kept for a bit-exact :func:`meldkit.goat.unwrap`, or None.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        config: GoatConfig,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        router_weight: torch.Tensor,
        scaling: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        n_experts, rank, d_in = lora_a.shape
        d_out = base_layer.out_features
        if d_in != base_layer.in_features or tuple(lora_b.shape) != (n_experts, d_out, rank):
            raise ValueError(
                f"GoatLinear: expert shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do "
                f"not fit nn.Linear({base_layer.in_features}, {d_out})"
            )
        if tuple(router_weight.shape) != (n_experts, d_in):
            raise ValueError(
                f"GoatLinear: router weight {tuple(router_weight.shape)}, expected "
                f"{(n_experts, d_in)}"
            )
        self.base_layer = base_layer
        self.lora_a = nn.Parameter(lora_a.detach().clone())
        self.lora_b = nn.Parameter(lora_b.detach().clone())
        self.router = nn.utils.skip_init(  # no init: no draw from the generator
            nn.Linear,
            d_in,
            n_experts,
            bias=False,
            device=router_weight.device,
            dtype=router_weight.dtype,
        )
        with torch.no_grad():
            self.router.weight.copy_(router_weight)
        self.config = config
        if scaling is None:
            self.scaling = config.scaling_for(d_in)
        else:
            if tuple(scaling.shape) != (n_experts,) or not scaling.is_floating_point():
                raise ValueError(
                    f"GoatLinear: per-expert scaling must be a floating [{n_experts}] tensor, "
                    f"got {scaling.dtype} {tuple(scaling.shape)}"
                )
            if not bool(torch.isfinite(scaling).all()) or not bool((scaling > 0).all()):
                raise ValueError("GoatLinear: per-expert scaling must be finite and > 0")
            self.register_buffer(
                "scaling",
                scaling.detach().to(device=lora_a.device, dtype=torch.float32).clone(),
                persistent=False,
            )
        self.top_k = config.top_k
        self.dropout = config.dropout
        # Restored by unwrap (wrap freezes the base).
        self.base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        self.alignment: tuple[torch.Tensor, torch.Tensor] | None = None
        self.base_dtype: torch.dtype | None = None
        self.original_weight: torch.Tensor | None = None
        # Router probabilities [N, E] of every call since the model's forward began (cleared by
        # the hooks that wrap puts on the model; see meldkit.goat.model.ForwardScope); a layer
        # without a scope, or called outside the model's forward, keeps its last call only.
        self.scope = None
        self._probs: list[torch.Tensor] = []

    def __getstate__(self) -> dict:
        # The probabilities carry autograd graphs, which deepcopy and pickle refuse; they only
        # matter until the next forward, so a copy starts without them.
        state = self.__dict__.copy()
        state["_probs"] = []
        return state

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (what ``.to()``, ``.cuda()``, ``.bfloat16()``, ``.half()`` run),
        keeping the experts, the router and GOAT-s's factors fp32: ``model.to(bf16)`` casts the
        base, not the trained weights, whose fp32 master copies the optimizer updates (as
        PEFT's ``autocast_adapter_dtype``). They still move to ``fn``'s device, and a cast to a
        dtype at least as wide as fp32 (``.double()``) applies to them too."""
        # What fn does to an fp32 tensor tells a cast below fp32 from a move or a wider cast.
        probe = fn(torch.empty(0, dtype=torch.float32, device=self.lora_a.device))
        if not _narrower_than_fp32(probe.dtype):
            return super()._apply(fn, recurse)
        slots = [(self._parameters, "lora_a"), (self._parameters, "lora_b")]
        slots += [(self.router._parameters, "weight"), (self._buffers, "scaling")]
        held = [(slot, name, slot[name]) for slot, name in slots if slot.get(name) is not None]
        for slot, name, _ in held:  # hidden from nn.Module._apply, which skips None entries
            slot[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for slot, name, tensor in held:
                slot[name] = tensor
        with torch.no_grad():
            for _, _, tensor in held:
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(probe.device)
                    if tensor.grad is not None:
                        tensor.grad = tensor.grad.to(probe.device)
            if self._buffers.get("scaling") is not None:
                self._buffers["scaling"] = self._buffers["scaling"].to(probe.device)
        return self

    @property
    def num_experts(self) -> int:
        return self.lora_a.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight ``[m, n]`` (W̃0 after an SVD init), for model code that reads
        a linear layer's ``weight`` (T5's feed-forward reads ``wo.weight.dtype``), as PEFT's
        layers offer it. Not a parameter of this layer: ``base_layer.weight`` is."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias ``[m]``, or None."""
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., n]`` → ``[..., m]`` in ``x.dtype`` (under autocast, in the dtype the base
        layer returns, autocast's for an ``nn.Linear``: what the base alone would give).

        The experts see ``x`` cast to the expert weights' dtype (fp32, as the official code
        casts them); their output is added to the base layer's before one rounding to the
        output dtype. In training mode with dropout > 0 every call draws a fresh mask seed from
        torch's default CPU generator, so ``torch.manual_seed`` makes training reproducible.
        The seed is a one-element tensor the layer never reads, so under ``torch.compile`` the
        draw is part of the graph (no graph break per layer). Inductor draws it with its own
        generator, seeded from torch's: compiled runs are reproducible too, with other masks
        than eager's unless ``torch._inductor.config.fallback_random`` is set. A graph
        captured by hand with ``torch.cuda.graph`` would replay one seed's masks at every step
        (the draw is a CPU op, outside the capture): capture in eval mode, or with dropout 0.
        ``torch.compile``'s CUDA-graph modes run the op with dropout outside their graphs
        (``routed_lora``'s notes).

        Training under ``nn.DataParallel`` with several devices raises ``RuntimeError`` (its
        replicas would share one record of router probabilities: the aux loss would be one
        replica's); DistributedDataParallel is the way.

        A plain ``nn.Linear`` base (no hooks, weights in ``x.dtype``, autocast off) runs inside
        the op (``routed_lora(..., base_weight=, base_bias=)``): the same sum, without the two
        elementwise additions of the layer's output and of dx. Any other base (a subclass, a
        hooked or sharded layer, autocast) is called as a module and its output added.
        """
        if self.training and getattr(self, "_is_replica", False):
            raise RuntimeError(
                "GoatLinear: training under nn.DataParallel on several devices is not "
                "supported: its replicas share this layer's record of router probabilities, so "
                "meldkit.goat.aux_loss would count one replica's tokens only; use "
                "DistributedDataParallel (torchrun), or one device (eval mode runs)"
            )
        if type(self.router) is not nn.Linear:
            raise RuntimeError(
                f"GoatLinear: its router is a {type(self.router).__module__}."
                f"{type(self.router).__qualname__}, not the nn.Linear GOAT made: the layer reads "
                "the router's weight directly, so another adapter on it (PEFT's LoRA on "
                "'router') would change nothing. Leave GOAT's routers out of other adapters' "
                "target_modules (GOAT trains them)"
            )
        training_dropout = self.training and self.dropout > 0
        # A one-element tensor, never read here: under torch.compile the draw stays in the graph.
        seed = torch.randint(0, SEED_BOUND, (1,)) if training_dropout else None
        kwargs = dict(
            router_weight=self.router.weight,
            top_k=self.top_k,
            dropout=self.dropout if training_dropout else 0.0,
            seed=seed,
            shared_dropout=training_dropout and self.config.dropout_mode == "shared",
        )
        base = self.base_layer
        if self._base_runs_in_the_op(x):
            y, probs = routed_lora(
                x,
                self.lora_a,
                self.lora_b,
                self.scaling,
                base_weight=base.weight,
                base_bias=base.bias,
                **kwargs,
            )
        else:
            delta, probs = routed_lora(
                x.to(self.lora_a.dtype), self.lora_a, self.lora_b, self.scaling, **kwargs
            )
            base_y = base(x)
            # Under autocast, the dtype the base (an nn.Linear: autocast's) returns, as a plain
            # nn.Linear would; otherwise x's. The sum is fp32 either way, rounded once.
            autocast = torch.is_autocast_enabled(x.device.type)
            y = (base_y + delta).to(base_y.dtype if autocast else x.dtype)
        if not _in_backward():  # not activation checkpointing's recomputation
            if self.scope is None or not self.scope.active:
                self._probs.clear()  # called on its own: its last call
            self._probs.append(probs)
        return y

    def _base_runs_in_the_op(self, x: torch.Tensor) -> bool:
        """Whether calling the base layer as a module would do exactly ``F.linear(x, W, b)``:
        a plain ``nn.Linear`` without hooks or a replaced ``forward`` (accelerate's offloading
        wraps ``forward`` to bring its weights in), in ``x``'s dtype and device, autocast off,
        and not float64 (the op accumulates in fp32: a float64 base keeps its precision)."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and "forward" not in base.__dict__
            and x.dtype == base.weight.dtype
            and x.dtype != torch.float64  # the op's base product accumulates in fp32
            and (base.bias is None or base.bias.dtype == x.dtype)
            and x.device == base.weight.device
            and not torch.is_autocast_enabled(x.device.type)
        )

    def balance_loss(self) -> torch.Tensor:
        """Load-balancing loss of the current forward, official normalisation (the GOAT code's)::

            L = Σ_calls E · Σ_i (c_i / T) · (Σ_t p_i(t) / T)

        summed over the calls of this layer since the model's forward began (one call unless
        the model runs the layer twice; a standalone layer counts its last call), with T the
        tokens of the call (padding included), c_i how many of them selected expert i among
        their top k (same rule as the router: ties to the lower index; not differentiable) and
        p(t) the router's full softmax (differentiable). Per call this is k times the paper's
        Σ_i f_i P_i. A scalar fp32 tensor; 0 for a call without tokens.

        Raises
        ------
        RuntimeError
            When the layer has not run since the model's forward began (no forward yet, or the
            model skipped it); or when grad mode is on, the router trains and a call ran in
            training mode without autograd (under ``torch.no_grad``, or as the first pass of
            reentrant activation checkpointing, which recomputes the layer only during the
            backward): the loss would silently give the router no gradient.
        """
        if not self.has_run:
            raise RuntimeError(
                "GoatLinear.balance_loss: no forward pass has run this layer (none yet, or the "
                "model's last forward skipped it)"
            )
        return sum(self._call_loss(probs) for probs in self._probs)

    @property
    def has_run(self) -> bool:
        """Whether the layer ran since the model's forward began (it has a balance loss)."""
        return bool(self._probs)

    def _call_loss(self, probs: torch.Tensor) -> torch.Tensor:
        if (
            self.training
            and torch.is_grad_enabled()
            and self.router.weight.requires_grad
            and not probs.requires_grad
        ):
            raise RuntimeError(
                "GoatLinear.balance_loss: the last forward ran without autograd (torch.no_grad, "
                "or reentrant activation checkpointing), so the aux loss would give the router "
                "no gradient; checkpoint with use_reentrant=False (Hugging Face: "
                "gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
        n_tokens, n_experts = probs.shape
        if n_tokens == 0:
            return probs.sum()
        selected = top_k_ref(probs.detach(), self.top_k)
        # one_hot + sum rather than bincount: deterministic on CUDA as well.
        counts = nn.functional.one_hot(selected, n_experts).sum((0, 1)).to(probs.dtype)
        return n_experts * torch.sum(counts / n_tokens * probs.sum(0) / n_tokens)

    def _scaling_repr(self) -> str:
        if isinstance(self.scaling, torch.Tensor):
            return "[" + ", ".join(f"{v:.4g}" for v in self.scaling.tolist()) + "]"
        return f"{self.scaling:.4g}"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, expert_rank={self.lora_a.shape[1]}, "
            f"top_k={self.top_k}, scaling={self._scaling_repr()}, dropout={self.dropout}"
        )
