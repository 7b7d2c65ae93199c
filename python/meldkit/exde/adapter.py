"""ExDe stage 1: a text adapter for the temporal transformer blocks of Stable Video Diffusion.

Stable Video Diffusion's UNet (``UNetSpatioTemporalConditionModel``) has no text input; the paper
injects text into the temporal module with a light adapter (ExDe paper, stage 1):

* learnable per-frame queries Q ``[F, d_text]`` and one cross-attention over the given text
  embeddings ``[B, L, d_text]`` give one text token per frame, c ``[B, F, d_text]``, once per call;
* before every temporal transformer block, each frame's features x ``[B·F, S, C]`` are joined to
  that frame's text token and projected back: x ← W·[x ; c_f] + b with W ``[C, C + d_text]``;
* W starts as [I | 0] and b as 0, so the adapted UNet equals the base at initialisation (the
  release's projection starts from a random init), and :func:`adapter_parameters` puts the
  queries and the cross-attention in the optimizer too (the release never trains them).

The adapter lives outside the UNet (forward pre-hooks on its ``TemporalBasicTransformerBlock`` s),
so the UNet's own state dict is unchanged; save the adapter's with ``adapter.state_dict()``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from meldkit.exde.blending import ExDeError


class TemporalTextAdapter(nn.Module):
    """Queries, the query-to-text cross-attention and one projection per temporal block."""

    def __init__(
        self, block_dims: dict[str, int], text_dim: int, num_frames: int, num_heads: int = 8
    ) -> None:
        super().__init__()
        if text_dim % num_heads:
            raise ExDeError(f"text_dim {text_dim} is not a multiple of num_heads {num_heads}")
        self.text_dim, self.num_frames = text_dim, num_frames
        self.queries = nn.Parameter(torch.randn(num_frames, text_dim) / math.sqrt(text_dim))
        self.cross_attention = nn.MultiheadAttention(text_dim, num_heads, batch_first=True)
        self.block_names = list(block_dims)
        self.projections = nn.ModuleList()
        for name in self.block_names:
            c = block_dims[name]
            proj = nn.Linear(c + text_dim, c)
            with torch.no_grad():  # [I | 0], b = 0: the identity on x at initialisation
                proj.weight.zero_()
                proj.weight[:, :c].copy_(torch.eye(c))
                proj.bias.zero_()
            self.projections.append(proj)
        self._tokens: torch.Tensor | None = None
        self._handles: list[Any] = []

    def frame_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """One text token per frame ``[B, F, d_text]`` from text embeddings ``[B, L, d_text]``,
        in the adapter's dtype (the text is cast to the adapter's device and dtype: float32
        embeddings condition a bfloat16 or float16 UNet)."""
        text = text.to(self.queries.device, self.queries.dtype)
        q = self.queries.unsqueeze(0).expand(text.shape[0], -1, -1)
        tokens, _ = self.cross_attention(q, text, text, need_weights=False)
        return tokens

    @contextlib.contextmanager
    def text(self, embeddings: torch.Tensor) -> Iterator[None]:
        """Condition the UNet calls inside the block on ``embeddings`` ``[B, L, d_text]`` (a batch
        of 1 is broadcast to the call's batch, e.g. both halves of classifier-free guidance)."""
        if embeddings.dim() != 3 or embeddings.shape[-1] != self.text_dim:
            raise ExDeError(
                f"TemporalTextAdapter.text: expected [B, L, {self.text_dim}] embeddings, got "
                f"{list(embeddings.shape)}"
            )
        self._tokens = self.frame_tokens(embeddings)
        try:
            yield
        finally:
            self._tokens = None

    def _fuse(self, index: int, hidden: torch.Tensor, num_frames: int) -> torch.Tensor:
        tokens = self._tokens
        if tokens is None:
            return hidden  # no text given: the base UNet's computation
        if num_frames > self.num_frames:
            raise ExDeError(
                f"TemporalTextAdapter: {num_frames} frames but {self.num_frames} queries (make "
                f"the adapter with add_text_adapter(..., num_frames={num_frames}) or more, or "
                "generate fewer frames)"
            )
        bf, s, _c = hidden.shape
        b = bf // num_frames
        tok = tokens[:, :num_frames]
        if tok.shape[0] == 1 and b > 1:
            tok = tok.expand(b, -1, -1)
        if tok.shape[0] != b:
            raise ExDeError(f"TemporalTextAdapter: text batch {tok.shape[0]} for a UNet batch {b}")
        tok = tok.to(hidden.dtype).reshape(b * num_frames, 1, -1).expand(bf, s, -1)
        return self.projections[index](torch.cat([hidden, tok], dim=-1))


class _BlockHook:
    """The forward pre-hook of temporal block ``index``: fuses the adapter's text token into
    the block's ``hidden_states``. A module-level class, not a closure, so that the adapted UNet
    pickles (``torch.save(unet)``), the adapter with it."""

    def __init__(self, adapter: TemporalTextAdapter, index: int) -> None:
        self.adapter, self.index = adapter, index

    def __call__(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        num = kwargs["num_frames"] if "num_frames" in kwargs else args[1]
        fused = self.adapter._fuse(self.index, hidden, int(num))
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": fused}
            return args, kwargs
        return (fused, *args[1:]), kwargs


def _temporal_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention import TemporalBasicTransformerBlock

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, TemporalBasicTransformerBlock)]


def add_text_adapter(
    unet: nn.Module, text_dim: int, *, num_frames: int | None = None, num_heads: int = 8
) -> TemporalTextAdapter:
    """Attach a :class:`TemporalTextAdapter` to every temporal transformer block of ``unet``
    (``UNetSpatioTemporalConditionModel``) and return it (on the UNet's device and dtype).

    ``num_frames`` is the most frames the adapter conditions (one learned query per frame);
    default: the UNet's ``config.num_frames`` (14 for Stable Video Diffusion, 25 for SVD-XT,
    the pipeline's default frame count), or 14 where its config has none. (Adapters made
    before this default followed the UNet have 14 queries: to load such a state dict on
    SVD-XT, pass ``num_frames=14``.)

    Call the UNet inside ``with adapter.text(embeddings):`` to condition it on text; outside, or
    at initialisation, the UNet computes exactly what it did before.

    The UNet's hooks hold the adapter, so the adapted UNet pickles (``torch.save(unet)``) and
    deep-copies with a copy of it: save or copy the two together
    (``torch.save({"unet": unet, "adapter": adapter}, path)``) to keep the adapter that
    conditions the copied UNet.
    """
    blocks = _temporal_blocks(unet)
    if not blocks:
        raise ExDeError("add_text_adapter: the UNet has no TemporalBasicTransformerBlock")
    if num_frames is None:
        configured = getattr(getattr(unet, "config", None), "num_frames", None)
        num_frames = configured if isinstance(configured, int) and configured > 0 else 14
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ExDeError(f"add_text_adapter: 'num_frames' must be an int ≥ 1, got {num_frames!r}")
    dims = {name: block.norm1.normalized_shape[0] for name, block in blocks}
    p = next(unet.parameters())
    adapter = TemporalTextAdapter(dims, text_dim, num_frames, num_heads).to(p.device, p.dtype)
    for index, (_, block) in enumerate(blocks):
        hook = _BlockHook(adapter, index)
        adapter._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return adapter


def remove_text_adapter(adapter: TemporalTextAdapter) -> None:
    """Detach the adapter's hooks from the UNet."""
    for h in adapter._handles:
        h.remove()
    adapter._handles.clear()


def adapter_parameters(unet: nn.Module, adapter: TemporalTextAdapter) -> list[nn.Parameter]:
    """What stage 1 trains: every adapter parameter (queries and cross-attention included) and
    the UNet's temporal layers (names containing ``temporal``, ``time_pos_embed``,
    ``time_mixer``)."""
    keys = ("temporal", "time_pos_embed", "time_mixer")
    unet_params = [p for n, p in unet.named_parameters() if any(k in n for k in keys)]
    return list(adapter.parameters()) + unet_params


def training_step(
    unet: nn.Module,
    adapter: TemporalTextAdapter,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    p_mean: float = 0.7,
    p_std: float = 1.6,
    generator: torch.Generator | None = None,
) -> float:
    """One denoising-loss step of Stable Video Diffusion's EDM objective with text.

    ``batch``: ``latents`` ``[B, F, 4, h, w]`` (the video, VAE-encoded and scaled),
    ``image_latents`` ``[B, 4, h, w]`` (the conditioning frame's latents), ``image_embeddings``
    ``[B, 1, D]`` (CLIP image embedding), ``added_time_ids`` ``[B, 3]`` (fps, motion bucket,
    noise augmentation) and ``text`` ``[B, L, d_text]``. Draws log σ ~ N(p_mean, p_std²) per
    video, denoises with the v-prediction preconditioning (c_in = 1/√(σ²+1), c_skip = 1/(σ²+1),
    c_out = −σ/√(σ²+1), UNet timestep 0.25·ln σ) and minimises the EDM-weighted squared error.
    Returns the loss.

    Trains what ``optimizer`` holds (:func:`adapter_parameters`: the adapter and the temporal
    layers); the other parameters of ``unet`` and ``adapter`` get no gradient (they are frozen
    for the step, their ``requires_grad`` restored after it), so no ``.grad`` piles up on them.
    """
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = [
        p
        for p in itertools.chain(unet.parameters(), adapter.parameters())
        if p.requires_grad and id(p) not in trained
    ]
    try:
        for p in frozen:
            p.requires_grad_(False)
        return _denoising_step(unet, adapter, optimizer, batch, p_mean, p_std, generator)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _denoising_step(unet, adapter, optimizer, batch, p_mean, p_std, generator) -> float:
    lat = batch["latents"]
    b, f = lat.shape[:2]
    dev, dt = lat.device, lat.dtype
    log_sigma = torch.randn(b, generator=generator, device="cpu").to(dev) * p_std + p_mean
    sigma = log_sigma.exp().to(dt).view(b, 1, 1, 1, 1)
    noise = torch.randn(lat.shape, generator=generator, device="cpu").to(dev, dt)
    noisy = lat + sigma * noise
    c_in = 1 / (sigma**2 + 1).sqrt()
    cond = batch["image_latents"].unsqueeze(1).expand(-1, f, -1, -1, -1)
    model_in = torch.cat([c_in * noisy, cond], dim=2)
    with adapter.text(batch["text"]):
        out = unet(
            model_in,
            0.25 * log_sigma.to(dt),
            encoder_hidden_states=batch["image_embeddings"],
            added_time_ids=batch["added_time_ids"],
            return_dict=False,
        )[0]
    c_skip = 1 / (sigma**2 + 1)
    c_out = -sigma / (sigma**2 + 1).sqrt()
    denoised = c_skip * noisy + c_out * out
    weight = (1 + sigma**2) / sigma**2
    loss = (weight * (denoised.float() - lat.float()) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


__all__ = [
    "TemporalTextAdapter",
    "adapter_parameters",
    "add_text_adapter",
    "remove_text_adapter",
    "training_step",
]
