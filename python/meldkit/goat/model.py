"""Putting GOAT layers into a model and taking them out: ``wrap``, ``unwrap``, ``aux_loss``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from meldkit.goat.config import ALL_LINEAR, AUTO, GoatConfig
from meldkit.goat.init import alignment_factors, base_delta, lora_experts, svd_experts
from meldkit.goat.layer import GoatLinear, _in_backward

# Names of classification heads that "all-linear" leaves alone (PEFT's SEQ_CLS_HEAD_NAMES, and
# BART's and similar models' ``classification_head``).
HEAD_NAMES = ("score", "classifier", "classification_head")
# Where wrap keeps every parameter's requires_grad flag from before it froze the model (unwrap
# puts them back).
_FLAGS = "_meldkit_goat_requires_grad"
# The modules trained in full and saved with the adapter (GoatConfig.modules_to_save), and CPU
# copies of their original parameters (keep_original) for unwrap.
_SAVED = "_meldkit_goat_modules_to_save"
_SAVED_ORIGINALS = "_meldkit_goat_saved_originals"
# Set on a model whose input-embedding hook (enable_input_require_grads) wrap put there.
_INPUT_GRADS = "_meldkit_goat_input_grads"
# On an nn.TransformerEncoder whose use_nested_tensor track_forwards turned off.
_NESTED = "_meldkit_goat_use_nested_tensor"


def goat_layers(model: nn.Module) -> Iterator[tuple[str, GoatLinear]]:
    """``(qualified name, layer)`` of every GOAT layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, GoatLinear):
            yield name, module


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


# The heads "all-linear" skipped before adapters recorded their modules_to_save (files
# without that metadata were selected with this list).
HEAD_NAMES_V1 = ("score", "classifier")


def _excluded_heads(model: nn.Module, head_names: tuple[str, ...] = HEAD_NAMES) -> list[str]:
    """Module-name prefixes that "all-linear" skips: the output embedding and classifier heads."""
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        if isinstance(out, nn.Module):
            heads.append(out)
    heads += [m for n in head_names if isinstance(m := getattr(model, n, None), nn.Module)]
    return [name for name, module in model.named_modules() if any(module is h for h in heads)]


def _kind(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def find_targets(
    model: nn.Module,
    target_modules: str | tuple[str, ...],
    *,
    adjusts_base: bool = False,
    head_names: tuple[str, ...] = HEAD_NAMES,
    min_size: int = 0,
    warn_skipped: bool = True,
) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers that ``target_modules`` selects.

    ``adjusts_base``: the init will change the selected layers' weights (the SVD inits), so a
    weight that another module shares (tied input and output embeddings) is refused.
    ``head_names``: the top-level classification heads that "all-linear" leaves out.
    ``min_size``: "all-linear" skips layers with min(out_features, in_features) below it (the
    SVD inits need the rank; a MoE router gate ``nn.Linear(d, num_experts)`` is too small),
    with a warning naming them (unless not ``warn_skipped``); a list of targets keeps them
    (:func:`wrap` then refuses them).

    Raises
    ------
    ValueError
        When a selected module is not an ``nn.Linear`` (or is used by ``nn.MultiheadAttention``,
        which reads its weight directly), is shared under two names, shares its weight with
        another module while ``adjusts_base``, or when nothing matches.
    """
    shared: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        shared.setdefault(id(module), []).append(name)
    weight_names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        weight_names.setdefault(id(p), []).append(name)
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    excluded = _excluded_heads(model, head_names) if target_modules == ALL_LINEAR else []
    tuners = [
        name
        for name, module in model.named_modules()
        if name and any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__)
    ]
    found, too_small = [], []
    for name, module in model.named_modules():
        if not name:
            continue
        inside = [t for t in tuners if name.startswith(t + ".")]
        if inside and isinstance(module, nn.Linear):
            if target_modules != ALL_LINEAR and not _matches(name, target_modules):
                continue
            raise ValueError(
                f"meldkit.goat.wrap: {name!r} is inside the PEFT adapter layer {inside[-1]!r} "
                f"({_kind(model.get_submodule(inside[-1]))}); GOAT does not adapt "
                "another adapter's layers. Wrap the model before PEFT, or merge the PEFT "
                "adapter into it first (merge_and_unload)"
            )
        if target_modules == ALL_LINEAR:
            if not isinstance(module, nn.Linear) or id(module) in inside_mha:
                continue
            if any(name == h or name.startswith(h + ".") for h in excluded):
                continue
            if min(module.in_features, module.out_features) < min_size:
                too_small.append(f"{name} ({module.in_features}→{module.out_features})")
                continue
        elif not _matches(name, target_modules):
            continue
        elif not isinstance(module, nn.Linear) or id(module) in inside_mha:
            raise ValueError(
                f"meldkit.goat.wrap: target {name!r} is a {_kind(module)}; GOAT adapts "
                "torch.nn.Linear layers only (not GPT-2's Conv1D, nor a layer another adapter "
                "library already replaced; check target_modules)"
            )
        if len(shared[id(module)]) > 1:
            raise ValueError(
                f"meldkit.goat.wrap: target {name!r} is shared as {shared[id(module)]}; "
                "untie it or leave it out of target_modules"
            )
        ties = weight_names.get(id(module.weight), [])
        if adjusts_base and len(ties) > 1:
            others = [t for t in ties if t != f"{name}.weight"]
            raise ValueError(
                f"meldkit.goat.wrap: target {name!r} shares its weight with {others} (tied "
                "weights); the SVD init adjusts the base weight, which would change those too. "
                "Untie it (Hugging Face: tie_word_embeddings=False), leave it out of "
                "target_modules, or use init='lora'"
            )
        found.append(name)
    skipped = ""
    if too_small:
        skipped = (
            f"min(out_features, in_features) < rank = {min_size} for the init: "
            f"{', '.join(too_small[:8])}{' …' if len(too_small) > 8 else ''}"
        )
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"][:4]
        raise ValueError(
            f"meldkit.goat.wrap: target_modules={target_modules!r} matches no nn.Linear of the "
            f"model (some of its linear layers: {linear})"
            + (f"; skipped as too small, {skipped}" if skipped else "")
            + (
                f"; its Conv1D layers ({conv1d}, GPT-2's transformers.pytorch_utils.Conv1D) "
                "are not nn.Linear: GOAT adapts torch.nn.Linear layers only"
                if conv1d
                else ""
            )
        )
    if skipped and warn_skipped:
        message = f"meldkit.goat: 'all-linear' skips {len(too_small)} layers, {skipped}"
        warnings.warn(message, stacklevel=3)  # the caller of wrap
    if target_modules != ALL_LINEAR and warn_skipped:
        unmatched = [t for t in target_modules if not any(_matches(n, (t,)) for n in found)]
        if unmatched:
            warnings.warn(
                f"meldkit.goat: target_modules entries {unmatched} match no layer of the model "
                f"(the others select {len(found)}); check their spelling",
                stacklevel=3,  # the caller of wrap
            )
    return found


def min_target_size(config: GoatConfig) -> int:
    """The smallest min(out_features, in_features) that ``config``'s init can adapt: the rank
    for the SVD inits, 0 for ``"lora"``."""
    return 0 if config.init == "lora" else config.rank


def find_saved_modules(
    model: nn.Module, modules_to_save: str | tuple[str, ...], targets: list[str]
) -> list[str]:
    """Qualified names of the modules that ``modules_to_save`` selects (see
    :class:`GoatConfig`): for ``"auto"`` the top-level classification head, if any, that is not
    among ``targets``.

    Raises
    ------
    ValueError
        A listed suffix matches no module with parameters, or a selected module is (or holds,
        or lies inside) a GOAT target.
    """
    if modules_to_save == AUTO:
        found = [
            n
            for n in HEAD_NAMES
            if isinstance(getattr(model, n, None), nn.Module)
            and any(True for _ in getattr(model, n).parameters())
        ]
        return [n for n in found if not any(t == n or t.startswith(n + ".") for t in targets)]
    found = []
    for suffix in modules_to_save:
        names = [
            n
            for n, m in model.named_modules()
            if n and _matches(n, (suffix,)) and any(True for _ in m.parameters())
        ]
        if not names:
            raise ValueError(
                f"meldkit.goat.wrap: modules_to_save entry {suffix!r} matches no module with "
                "parameters"
            )
        found += [n for n in names if n not in found]
    for name in found:
        clash = [
            t for t in targets if t == name or t.startswith(name + ".") or name.startswith(t + ".")
        ]
        if clash:
            raise ValueError(
                f"meldkit.goat.wrap: {name!r} is in modules_to_save and overlaps the GOAT "
                f"targets {clash[:3]}: a module is either adapted or trained in full"
            )
    _warn_tied_saved(model, found)
    return found


def _warn_tied_saved(model: nn.Module, saved: list[str]) -> None:
    """Warn when a saved module's parameter is tied to a parameter outside the saved modules
    (a language model's head tied to its input embeddings): training it trains that one too."""
    inside: dict[int, str] = {}
    for name in saved:
        for pname, p in model.get_submodule(name).named_parameters():
            inside.setdefault(id(p), f"{name}.{pname}")
    ties = sorted(
        {
            f"{inside[id(p)]} is {qualified}"
            for qualified, p in model.named_parameters(remove_duplicate=False)
            if id(p) in inside
            and not any(qualified == s or qualified.startswith(s + ".") for s in saved)
        }
    )
    if ties:
        warnings.warn(
            f"meldkit.goat: modules_to_save share parameters with modules outside them ("
            f"{'; '.join(ties[:3])}: tied weights): training them trains those too, and the "
            "adapter holds the trained values",
            stacklevel=4,  # the caller of wrap
        )


def saved_modules(model: nn.Module) -> list[str]:
    """The names of the modules trained in full and saved with the adapter."""
    return list(getattr(model, _SAVED, ()))


def set_saved_modules(model: nn.Module, names: list[str], *, keep_original: bool) -> None:
    """Record ``names`` as the model's saved modules, keeping CPU copies of their parameters
    for :func:`unwrap` when ``keep_original``."""
    setattr(model, _SAVED, list(names))
    originals = {}
    if keep_original:
        for name in names:
            for pname, p in model.get_submodule(name).named_parameters():
                originals[f"{name}.{pname}"] = p.detach().to("cpu", copy=True)
    setattr(model, _SAVED_ORIGINALS, originals)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_weight(name: str, linear: nn.Linear) -> None:
    if not linear.weight.is_floating_point():
        raise ValueError(
            f"meldkit.goat.wrap: {name!r}: weight dtype {linear.weight.dtype} is not floating "
            "point (quantized layers are not supported)"
        )
    if linear.weight.device.type == "meta":
        raise ValueError(f"meldkit.goat.wrap: {name!r}: weight is on the meta device (not loaded)")


def shifted(
    weight: torch.Tensor, delta_a: torch.Tensor, delta_b: torch.Tensor, sign: int
) -> torch.Tensor:
    """``weight + sign · delta_b @ delta_a`` in fp32 (fp64 for an fp64 weight), rounded once to
    the weight's dtype; the product is :func:`base_delta`'s fixed-order one. A new tensor."""
    delta = base_delta(delta_a.to(weight.device), delta_b.to(weight.device))
    acc = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        return (weight.detach().to(acc) + sign * delta.to(acc)).to(weight.dtype)


def _shift_base(weight: torch.Tensor, delta_a: torch.Tensor, delta_b: torch.Tensor, sign: int):
    """``weight ← shifted(weight, delta_a, delta_b, sign)``, in place."""
    with torch.no_grad():
        weight.copy_(shifted(weight, delta_a, delta_b, sign))


def adjust_base(
    layer: GoatLinear,
    delta_a: torch.Tensor,
    delta_b: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> None:
    """Set the base weight to ``W0 − delta_b @ delta_a`` and remember the factors in
    ``layer.alignment`` (fp32, CPU) and the dtype the adjustment was rounded to in
    ``layer.base_dtype``.

    The sum is :func:`shifted`'s (fp32 arithmetic) on W0 taken in ``dtype`` (default: the
    weight's own), rounded once to ``dtype``, then cast to the weight's dtype: with the dtype
    :func:`wrap` adjusted the base in, :func:`meldkit.goat.load_adapter` rebuilds the trained
    model's base exactly from a fresh base of that dtype or a wider one (a model wrapped in
    bf16 and cast to fp32 afterwards), and from a narrower one within one rounding to it."""
    weight = layer.base_layer.weight
    dtype = dtype or weight.dtype
    with torch.no_grad():
        weight.copy_(shifted(weight.detach().to(dtype), delta_a, delta_b, -1))
    layer.alignment = (delta_a.detach().cpu(), delta_b.detach().cpu())
    layer.base_dtype = dtype


def build_layer(
    linear: nn.Linear,
    config: GoatConfig,
    *,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router_weight: torch.Tensor,
    alignment: tuple[torch.Tensor, torch.Tensor] | None,
    keep_original: bool,
    scaling: torch.Tensor | None = None,
    base_dtype: torch.dtype | None = None,
) -> GoatLinear:
    """A :class:`GoatLinear` around ``linear`` with the given weights; applies ``alignment`` to
    the base in ``base_dtype`` (default the weight's; :func:`adjust_base`), keeping a CPU copy of
    W0 first when ``keep_original`` (an unadjusted base needs none). The layer takes the
    replaced layer's train/eval mode: a model in eval mode (as ``from_pretrained`` returns it)
    stays in eval mode, its experts' dropout off."""
    layer = GoatLinear(linear, config, lora_a, lora_b, router_weight, scaling)
    layer.train(linear.training)
    if alignment is not None:
        if keep_original:
            layer.original_weight = linear.weight.detach().to("cpu", copy=True)
        adjust_base(layer, *alignment, dtype=base_dtype)
    return layer


class ForwardScope:
    """Tells the GOAT layers of one wrapped model when a new forward begins.

    :func:`track_forwards` puts a :class:`_Entry` pre-hook and :meth:`leave` (a forward hook that
    runs even when the forward raises) on the model and on the modules above the GOAT layers
    that a caller may run on their own: those not inside an ``nn.ModuleList``, ``nn.ModuleDict``
    or ``nn.Sequential`` (a backbone such as ``model.model``, CLIP's ``vision_model`` and
    ``text_model``, an encoder; not each decoder block). The outermost of them to start begins
    a new forward of the layers beneath it: they forget the router probabilities of earlier
    forwards, so :func:`aux_loss` sees this forward's calls only and no calls pile up. Towers
    run one after the other (``get_text_features``, then ``get_image_features``) each keep their
    own calls. A GOAT layer called outside all of them keeps its last call only. Activation
    checkpointing's recomputation during the backward is not a new forward.

    The scope holds one counter: the layers a hook clears travel with the hook, so copying one
    layer does not copy the model, and a layer's forward reads no counter that changes from
    step to step (``torch.compile`` would recompile on it).
    """

    def __init__(self) -> None:
        self.depth = 0

    def enter(self, layers: list[GoatLinear]) -> None:
        if _in_backward():
            return
        if self.depth == 0:
            for layer in layers:
                layer._probs.clear()
        self.depth += 1

    def leave(self, module: nn.Module, args: tuple, output) -> None:
        if _in_backward():
            return
        self.depth = max(self.depth - 1, 0)

    @property
    def active(self) -> bool:
        """Whether a forward of the model or of a hooked module above the layers is running."""
        return self.depth > 0


class _Entry:
    """The forward pre-hook of one module above GOAT layers: begins a forward of ``layers``."""

    def __init__(self, scope: ForwardScope, layers: list[GoatLinear]) -> None:
        self.scope = scope
        self.layers = layers

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.scope.enter(self.layers)


def _is_scope_hook(hook) -> bool:
    return isinstance(hook, _Entry) or isinstance(getattr(hook, "__self__", None), ForwardScope)


def track_forwards(model: nn.Module) -> None:
    """Put a :class:`ForwardScope` on ``model``: its GOAT layers keep every call's router
    probabilities from the start of a forward of the model (or of a module above them that
    may be called on its own) until the next one. Replaces the scope an earlier call put there."""
    untrack_forwards(model)
    named = list(goat_layers(model))
    scope = ForwardScope()
    hooked: dict[str, list[GoatLinear]] = {}
    for name, layer in named:
        parts = name.split(".")
        for i in range(len(parts)):  # the root, then each module above the layer
            above = ".".join(parts[:i])
            module = model.get_submodule(above)
            if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                break  # no forward; its children are called by its owner, not on their own
            hooked.setdefault(above, []).append(layer)
            if isinstance(module, nn.Sequential):
                break  # its children are called by its forward
        # PyTorch's encoder layers get the hooks wherever they sit: in eval mode their fused
        # fast path reads linear1/linear2.weight directly (the base alone, without the experts)
        # unless a module inside the layer has hooks.
        for i in range(len(parts)):
            above = ".".join(parts[:i])
            if isinstance(model.get_submodule(above), nn.TransformerEncoderLayer):
                if layer not in hooked.setdefault(above, []):
                    hooked[above].append(layer)
    for name, layers in hooked.items():
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_Entry(scope, layers))
        module.register_forward_hook(scope.leave, always_call=True)
        if isinstance(module, nn.TransformerEncoder) and getattr(
            module, "use_nested_tensor", False
        ):
            # Its eval fast path hands its layers nested tensors, meant for the fused layer
            # kernel that the hooks above turn off; the layers' own forward cannot take them.
            module.use_nested_tensor = False
            module.__dict__[_NESTED] = True
    for _, layer in named:
        layer.scope = scope
        layer._probs.clear()


def untrack_forwards(model: nn.Module) -> None:
    """Remove every :class:`ForwardScope` hook from ``model``'s modules and detach its GOAT
    layers from their scope."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if _is_scope_hook(hook)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        if isinstance(module, GoatLinear):
            module.scope = None
        if module.__dict__.pop(_NESTED, False):
            module.use_nested_tensor = True


def remember_requires_grad(model: nn.Module) -> None:
    """Keep every parameter's ``requires_grad`` flag (by name, before any layer is replaced) on
    the model, for :func:`unwrap` to restore."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    setattr(model, _FLAGS, flags)


def hook_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad on a Hugging Face model under
    transformers 4.x (``enable_input_require_grads``), as transformers 5 does when activation
    checkpointing is enabled and 4.x only for its own PEFT adapters. Reentrant checkpointing
    (4.x's default) backpropagates into a block only when the block's input requires grad; with
    every base weight frozen it does not, and the experts of every checkpointed layer would get
    no gradient. The hook changes no value; :func:`unwrap` removes it. Nothing is done under
    transformers 5, for non-Hugging Face models, or when the model already has the hook."""
    enable = getattr(model, "enable_input_require_grads", None)
    if not callable(enable) or getattr(model, "main_input_name", None) != "input_ids":
        return
    if _live_input_grads_hook(model):
        return  # the user's own, or transformers' (it is theirs to remove)
    try:
        import transformers
    except ImportError:
        return
    if int(transformers.__version__.split(".")[0]) >= 5:
        return
    try:
        enable()
    except NotImplementedError:  # a model without input embeddings
        return
    model.__dict__[_INPUT_GRADS] = True


def unhook_input_grads(model: nn.Module) -> None:
    """Remove the hook :func:`hook_input_grads` put on ``model``, if it did."""
    if model.__dict__.pop(_INPUT_GRADS, False):
        model.disable_input_require_grads()
        model.__dict__.pop("_require_grads_hook", None)  # 4.x keeps the removed handle


def _live_input_grads_hook(model: nn.Module) -> bool:
    """Whether ``enable_input_require_grads``' hook is on the model (transformers 4.x leaves
    the removed handle in place after ``disable_input_require_grads``)."""
    handle = getattr(model, "_require_grads_hook", None)
    hooks = getattr(handle, "hooks_dict_ref", lambda: None)()
    return hooks is not None and getattr(handle, "id", None) in hooks


def freeze_base(model: nn.Module) -> None:
    """``requires_grad = False`` on every parameter but the GOAT experts and routers and the
    parameters of the saved modules (``modules_to_save``)."""
    trainable: set[int] = set()
    for _, layer in goat_layers(model):
        trainable |= {id(layer.lora_a), id(layer.lora_b), id(layer.router.weight)}
    for name in saved_modules(model):
        trainable |= {id(p) for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def wrap(
    model: nn.Module, config: GoatConfig, *, keep_original: bool = True, progress: bool = True
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by GOAT layers, in place.

    For each target W0 ``[m, n]`` (n = in_features) with s = ``config.scaling_for(n)`` (with
    ``config.per_expert_scaling``, GOAT-s's s_j per expert, from W0's spectrum, in place of s):

    - experts A ``[E, d, n]``, B ``[E, m, d]`` (fp32, on the weight's device) from
      ``config.init`` (:mod:`meldkit.goat.init`); for the SVD inits the base weight becomes
      ``W̃0 = W0 − (s/E) Σ_j B_j A_j`` (fp32 arithmetic, rounded once to the base dtype);
    - a router ``nn.Linear(n, E, bias=False)`` in fp32 with PyTorch's default init
      (Kaiming-uniform, a = √5), drawn from the default generator;
    - every parameter of the model except the experts, the routers and the modules of
      ``config.modules_to_save`` (by default a sequence-classification head) is frozen;
    - under transformers 4.x, a Hugging Face model's input embeddings get transformers'
      ``enable_input_require_grads`` hook, so that reentrant activation checkpointing (4.x's
      default) still backpropagates into the experts (:func:`hook_input_grads`).

    Parameters
    ----------
    model : nn.Module
        Any PyTorch or Hugging Face model; modified in place.
    config : GoatConfig
        Which layers and how (see :class:`GoatConfig`).
    keep_original : bool
        Keep a CPU copy of every W0 that the init adjusts (SVD inits), and of the parameters of
        the ``modules_to_save``, so that :func:`unwrap` restores them bit-exactly.
        This costs host memory (not accelerator memory) equal to the adapted weights, about the
        model's size for ``"all-linear"``. Without it, :func:`unwrap` adds the stored
        adjustment back: within the rounding errors of W̃0 and of that sum in the base dtype,
        not bit-exact.
    progress : bool
        Show a progress bar (tqdm, on stderr) over the target layers: the SVD inits factor
        every target weight, seconds for a 135M-parameter model with ``"all-linear"``,
        minutes for a 7B one.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    TypeError
        ``config`` is not a :class:`GoatConfig`.
    ValueError
        Nothing matches ``config.target_modules``, a target is not a floating-point
        ``nn.Linear``, a listed target is too small for an SVD init (min(m, n) < rank;
        ``"all-linear"`` skips such layers with a warning naming them), or the model already
        has GOAT layers.
    """
    if not isinstance(config, GoatConfig):
        raise TypeError(f"meldkit.goat.wrap: config must be a GoatConfig, got {type(config)}")
    if any(True for _ in goat_layers(model)):
        raise ValueError("meldkit.goat.wrap: the model already has GOAT layers (unwrap it first)")
    names = find_targets(
        model,
        config.target_modules,
        adjusts_base=config.init != "lora",
        min_size=min_target_size(config),
    )
    saved = find_saved_modules(model, config.modules_to_save, names)
    e, d = config.num_experts, config.expert_rank
    for name in names:
        linear = model.get_submodule(name)
        _check_weight(name, linear)
        if config.init != "lora" and min(linear.weight.shape) < config.rank:
            raise ValueError(
                f"meldkit.goat.wrap: {name!r}: init {config.init!r} needs min(out_features, "
                f"in_features) ≥ rank = {config.rank}, got nn.Linear({linear.in_features}, "
                f"{linear.out_features})"
            )
    remember_requires_grad(model)
    set_saved_modules(model, saved, keep_original=keep_original)
    bar = None
    if progress:
        from meldkit._progress import progress_bar

        bar = progress_bar(total=len(names), desc="goat wrap", unit="layer")
    try:
        for name in names:
            linear = model.get_submodule(name)
            device = linear.weight.device
            s = config.scaling_for(linear.in_features)
            if config.init == "lora":
                lora_a, lora_b = lora_experts(
                    linear.in_features,
                    linear.out_features,
                    num_experts=e,
                    expert_rank=d,
                    device=device,
                )
                alignment = None
            else:
                lora_a, lora_b, s = svd_experts(
                    linear.weight,
                    init=config.init,
                    num_experts=e,
                    expert_rank=d,
                    scaling=s,
                    rho=config.rho,
                    per_expert_scaling=config.per_expert_scaling,
                )
                alignment = alignment_factors(lora_a, lora_b, s / e)
            # fp32 whatever torch's default dtype: the router, as the experts, trains in fp32.
            router = nn.Linear(
                linear.in_features, e, bias=False, device=device, dtype=torch.float32
            )
            layer = build_layer(
                linear,
                config,
                lora_a=lora_a,
                lora_b=lora_b,
                router_weight=router.weight.detach(),
                alignment=alignment,
                keep_original=keep_original,
                scaling=s if isinstance(s, torch.Tensor) else None,
            )
            replace_module(model, name, layer)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    freeze_base(model)
    track_forwards(model)
    hook_input_grads(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original ``nn.Linear`` layers back, in place, with their original weights.

    Bit-exact when the model was wrapped (or loaded) with ``keep_original=True``; otherwise W0
    is recomputed as ``W̃0 + delta_b @ delta_a`` in fp32 and rounded once to the base dtype
    (close to, not exactly, the original).
    Every parameter's ``requires_grad`` flag goes back to what it was before :func:`wrap` (or
    :func:`meldkit.goat.load_adapter`) froze the model, and the hooks they put on the model are
    removed. The ``modules_to_save`` get their original parameters back when they were kept
    (``keep_original``); otherwise they keep the trained ones.

    Returns
    -------
    nn.Module
        ``model``, without GOAT layers.
    """
    layers = list(goat_layers(model))
    if not layers:
        raise ValueError("meldkit.goat.unwrap: the model has no GOAT layers")
    untrack_forwards(model)
    unhook_input_grads(model)
    for name, layer in layers:
        base = layer.base_layer
        if layer.original_weight is not None:
            with torch.no_grad():
                base.weight.copy_(layer.original_weight)
        elif layer.alignment is not None:
            _shift_base(base.weight, *layer.alignment, +1)
        for pname, p in base.named_parameters():
            p.requires_grad_(layer.base_requires_grad.get(pname, True))
        replace_module(model, name, base)
    originals = model.__dict__.pop(_SAVED_ORIGINALS, None) or {}
    model.__dict__.pop(_SAVED, None)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname in originals:
                p.copy_(originals[pname])
    flags = model.__dict__.pop(_FLAGS, None)
    if flags is not None:
        for pname, p in model.named_parameters():
            if pname in flags:
                p.requires_grad_(flags[pname])
    return model


def aux_loss(model: nn.Module) -> torch.Tensor:
    """``aux_loss_coef · Σ_layers L_layer``, the load-balancing loss of the model's last forward.

    Each layer's ``L = E · Σ_i (c_i/T) · (Σ_t p_i(t)/T)`` is the official code's normalisation
    (k times the paper's Switch-style Σ_i f_i P_i; see :meth:`GoatLinear.balance_loss`);
    gradients flow through the router probabilities p only. Only the calls of the last forward
    count (:func:`wrap` puts hooks on the model and on the submodules a caller may run on their
    own, such as a backbone or one tower of a two-tower model, that clear the earlier calls of
    the layers beneath them; see :class:`ForwardScope`): a layer that forward skipped
    (LayerDrop, a branch not taken) adds nothing, a layer it ran twice adds one term per call,
    and towers run one after the other each add their own. Add it to the task loss before
    ``backward()``. Under DDP each rank computes it from its own batch (the routing statistics
    are not all-reduced), so the averaged gradients are the mean of the ranks' losses, not
    the loss of one process on the whole batch.

    Returns
    -------
    Tensor
        A scalar fp32 tensor.

    Raises
    ------
    ValueError
        The model has no GOAT layers.
    RuntimeError
        No forward pass has run a GOAT layer since wrapping, or a training-mode call ran without
        autograd while grad mode is on now (reentrant activation checkpointing; see
        :meth:`GoatLinear.balance_loss`) and ``aux_loss_coef`` is not 0 (with 0 the result is
        a zero tensor, whatever the checkpointing).
    """
    layers = [layer for _, layer in goat_layers(model)]
    if not layers:
        raise ValueError("meldkit.goat.aux_loss: the model has no GOAT layers")
    ran = [layer for layer in layers if layer.has_run]
    if not ran:
        raise RuntimeError(
            "meldkit.goat.aux_loss: no forward pass has run any GOAT layer of the model yet"
        )
    weighted = [layer for layer in ran if layer.config.aux_loss_coef != 0]
    if (
        not weighted
    ):  # coefficient 0: nothing to compute (and no autograd needed, any checkpointing)
        return torch.zeros((), dtype=torch.float32, device=ran[0].lora_a.device)
    return sum(layer.config.aux_loss_coef * layer.balance_loss() for layer in weighted)


def config_of(model: nn.Module) -> GoatConfig:
    """The :class:`GoatConfig` the model's GOAT layers were built with.

    Raises
    ------
    ValueError
        The model has no GOAT layers, or layers built with different configurations.
    """
    configs = {layer.config for _, layer in goat_layers(model)}
    if not configs:
        raise ValueError("meldkit.goat: the model has no GOAT layers")
    if len(configs) > 1:
        raise ValueError(f"meldkit.goat: the model's GOAT layers have {len(configs)} configs")
    return configs.pop()
