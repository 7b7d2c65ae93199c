"""ExDe stages 2 and 3 as parameter operations: extrapolation, decoupling, per-step blending.

Tian et al., "Extrapolating and Decoupling Image-to-Video Generation Models: Motion Modeling is
Easier Than You Think" (CVPR 2025), as its released code does it (the paper's stages 2 and 3),
with the task vector τ = θ_ft − θ_base of a fine-tuned denoiser:

* extrapolation: θ = θ_base − α·τ (α = 0.25): *away* from the fine-tune, which lowered the
  motion degree; a negative α goes the other way;
* decoupling: τ_deg = DARE(−α·τ) and τ_ctl = DARE(τ) with independent seeded masks (drop 0.7,
  rescaled by 1/0.3; 1-D tensors never dropped), θ_dyn = θ_base + 0.75·τ_deg and
  θ_con = θ_ft + 0.25·τ_ctl;
* injection over denoising time: θ(step) = θ_base + c_τ·τ + c_dyn·τ_deg + c_con·τ_ctl with the
  coefficients of a :class:`Schedule` (the release: θ_dyn for the high-noise first half, then
  θ_con).

Every blend is one native call over all tensors of a dtype (a :class:`meldkit.ops.BlendPlan` per
dtype; ``attach`` keeps its plans, so a re-blend does no per-tensor host work), the masks
regenerated from ``(seed, CRC-32 of the tensor name)``, never stored. Only θ_base and τ are kept
(and, in ``attach``, what they cannot rebuild of the weights the denoiser held on entry).
Only parameters are touched, never buffers (two plain state dicts cannot say which entries are
buffers: there, only the norm layers' running statistics are known as such; see :func:`paired`);
a tied parameter is blended once and stays tied.

Precision: :func:`extrapolate` and :func:`decouple` form τ and the blend in float32 and round
once to the model's dtype (in chunks of float32 copies); ``attach`` keeps θ_base and τ in the
denoiser's dtype, as the blend op reads them (τ formed in float32, then rounded once).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import operator
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meldkit._storage import storage_key
from meldkit.merging.engine import tensor_key
from meldkit.ops import BlendPlan
from meldkit.ops.blend_ref import blend_coefficients


class ExDeError(ValueError):
    """Models that do not match, or an unusable ExDe setting."""


# ---- selecting and pairing parameters ------------------------------------------------------------


def _patterns(value: Iterable[str] | str | None, name: str) -> list[re.Pattern]:
    """The name filter ``name`` (``include``/``exclude``: a regular expression or several)
    compiled, or an ExDeError naming it."""
    if value is None:
        return []
    if not isinstance(value, str) and not (
        isinstance(value, Iterable) and all(isinstance(p, str) for p in value)
    ):
        raise ExDeError(f"meldkit.exde: '{name}' must be a regex or a list of them, got {value!r}")
    patterns = []
    for p in [value] if isinstance(value, str) else value:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ExDeError(
                f"meldkit.exde: '{name}': {p!r} is not a regular expression ({e})"
            ) from None
    return patterns


# torch.compile wraps a module in an OptimizedModule whose parameter names carry this prefix.
_COMPILED = "_orig_mod."

# Without a module to ask, these state-dict entries are known buffers (the running statistics of
# torch's batch/instance norms), never parameters.
_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _unwrap(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``module``."""
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


def _buffer_names(*objs: Any) -> set[str] | None:
    """The buffer names of the modules among ``objs``; None when all are state dicts."""
    modules = [_unwrap(o) for o in objs if isinstance(o, nn.Module)]
    if not modules:
        return None
    return {n for m in modules for n, _ in m.named_buffers()}


def _params(
    obj: nn.Module | Mapping[str, torch.Tensor], what: str, buffers: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """The parameters of ``obj`` by name (``_orig_mod.`` of compiled modules stripped), a tied
    parameter under each of its names, as a state dict lists it. A state dict also holds
    buffers: its entries named in ``buffers`` (a module's buffer names) are left out, or, with no
    module to ask (``buffers`` None), the norm layers' running statistics."""
    if isinstance(obj, nn.Module):
        return dict(_unwrap(obj).named_parameters(remove_duplicate=False))
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            name = key.replace(_COMPILED, "")
            if not isinstance(value, torch.Tensor):
                continue
            if buffers is not None:
                if name in buffers:
                    continue
            elif name.rsplit(".", 1)[-1] in _NORM_STATS:
                continue
            out[name] = value
        return out
    raise TypeError(f"meldkit.exde: '{what}' must be an nn.Module or a state dict, got {type(obj)}")


def _storage(t: torch.Tensor) -> tuple | int:
    """:func:`meldkit._storage.storage_key`, or the tensor's identity where memory tells
    nothing."""
    key = storage_key(t)
    return id(t) if key is None else key


def _pairs(
    base: nn.Module | Mapping[str, torch.Tensor],
    finetuned: nn.Module | Mapping[str, torch.Tensor],
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    *,
    buffers: set[str] | None = None,
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, θ_base, θ_ft)`` of each selected floating parameter: see :func:`paired`."""
    if buffers is None:
        buffers = _buffer_names(base, finetuned)
    b, f = _params(base, "base", buffers), _params(finetuned, "finetuned", buffers)
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    tied: dict[tuple | int, list[str]] = {}  # the names of each tensor of the base, in order
    for name, t in b.items():
        if t.is_floating_point():
            tied.setdefault(_storage(t), []).append(name)
    out = []
    for names in tied.values():
        if inc and not any(p.search(n) for p in inc for n in names):
            continue
        if any(p.search(n) for p in exc for n in names):
            continue
        name, t = names[0], b[names[0]]
        found = [n for n in names if n in f]
        if not found:
            raise ExDeError(
                f"meldkit.exde: the fine-tuned model has no parameter {name!r}"
                + _prefix_hint(name, b, f)
            )
        ft = f[found[0]]
        if ft.shape != t.shape:
            raise ExDeError(
                f"meldkit.exde: {found[0]!r}: shape {list(ft.shape)} in the fine-tuned model, "
                f"{list(t.shape)} in the base"
            )
        if not ft.is_floating_point():
            raise ExDeError(
                f"meldkit.exde: {found[0]!r}: dtype {ft.dtype} in the fine-tuned model, a "
                f"floating {t.dtype} in the base (a fine-tune of another model?)"
            )
        for other in found[1:]:
            if _storage(f[other]) != _storage(ft) and not torch.equal(f[other], ft):
                raise ExDeError(
                    f"meldkit.exde: {found[0]!r} and {other!r} are one (tied) tensor in the base "
                    "but differ in the fine-tuned model"
                )
        out.append((name, t, ft))
    if not out:
        raise ExDeError("meldkit.exde: no parameter is selected (check include/exclude)")
    # A fine-tune's parameters that the base lacks (e.g. an adapter trained with it) have no τ:
    # say so rather than drop them unseen. Another name of a tensor the base has (a tied
    # parameter a saved base lists once) is no extra.
    known = {_storage(t) for n, t in f.items() if n in b}
    extra = [n for n, t in f.items() if n not in b and _storage(t) not in known]
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (", ..." if len(extra) > 5 else "")
        warnings.warn(
            f"meldkit.exde: the fine-tuned model has {len(extra)} parameter(s) the base lacks "
            f"({shown}): left out (τ covers the base's parameters only)",
            UserWarning,
            stacklevel=3,
        )
    return out


def _prefix_hint(name: str, b: Mapping[str, Any], f: Mapping[str, Any]) -> str:
    """For a ``name`` of the base ``b`` missing from the fine-tune ``f``: the key prefix that
    every key of one of the two carries and the other lacks (``unet.`` of a pipeline's state
    dict), as advice to strip it; "" when there is none."""
    candidates = [(k[: -len(name)], f, b, "fine-tuned model") for k in f if k.endswith("." + name)]
    candidates += [
        (name[: i + 1], b, f, "base") for i, c in enumerate(name) if c == "." and name[i + 1 :] in f
    ]
    for prefix, longer, shorter, which in candidates:
        if all(k.startswith(prefix) for k in longer):
            matched = sum(k[len(prefix) :] in shorter for k in longer)
            return (
                f"; every key of the {which} starts with {prefix!r} ({matched} of {len(longer)} "
                "match once it is stripped): strip it, e.g. "
                f"{{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}"
            )
    return ""


def paired(
    base: nn.Module | Mapping[str, torch.Tensor],
    finetuned: nn.Module | Mapping[str, torch.Tensor],
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    *,
    buffers: set[str] | None = None,
) -> list[str]:
    """Names of the floating parameters of ``base`` selected by the name filters (``re.search``:
    any ``include`` must match, no ``exclude`` may), checked against ``finetuned``.

    A tied parameter (one tensor under several names, e.g. an embedding shared with the output
    head; a state dict lists it under each) is listed once, under its first name; it is selected
    when an ``include`` matches any of its names and no ``exclude`` matches one, and the
    fine-tuned model may give it under any of them (the same values under each).

    Buffers are never selected: a state dict's entries that are buffers of ``buffers`` (names),
    else of whichever of ``base`` and ``finetuned`` is a module, are skipped; two state dicts
    alone skip the norm layers' running statistics (pass a module, or ``exclude``, for other
    buffers).

    Parameters of ``finetuned`` that ``base`` lacks (e.g. an adapter trained with the fine-tune)
    have no τ: they are left out with one UserWarning naming the first few and their count. A
    parameter of ``base`` missing from ``finetuned`` raises :class:`ExDeError`; when every key
    of one model carries a prefix the other's lack (``unet.`` of a pipeline's state dict), the
    message names it and how to strip it (it is never stripped silently)."""
    return [name for name, _, _ in _pairs(base, finetuned, include, exclude, buffers=buffers)]


def _finite(name: str, value: float) -> float:
    """``value`` as a float that float32 (where the blends run) holds finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ExDeError(f"meldkit.exde: '{name}' must be a finite number, got {value!r}")
    if abs(float(value)) > torch.finfo(torch.float32).max:
        raise ExDeError(
            f"meldkit.exde: '{name}' is {value!r}, beyond float32's range (the blends run in "
            "float32)"
        )
    return float(value)


def _apply(
    base: nn.Module | Mapping[str, torch.Tensor],
    names: list[str],
    compute: Callable[[list[torch.Tensor]], None],
) -> nn.Module | dict[str, torch.Tensor]:
    """A copy of ``base`` (module or dict, its tied tensors still tied) whose ``names``
    ``compute(outs)`` rewrites."""
    if isinstance(base, nn.Module):
        out = copy.deepcopy(base)
        params = dict(_unwrap(out).named_parameters(remove_duplicate=False))
        with torch.no_grad():
            compute([params[n].data for n in names])
        return out
    clones: dict[tuple | int, torch.Tensor] = {}
    out_dict = {}
    for k, v in base.items():
        if isinstance(v, torch.Tensor):
            key = _storage(v)
            if key not in clones:
                clones[key] = v.clone()
            v = clones[key]
        out_dict[k] = v
    keys = {k.replace(_COMPILED, ""): k for k in base}
    compute([out_dict[keys[n]] for n in names])
    return out_dict


_INDEXED = re.compile(r"'?\b(outs|bases|taus)\[(\d+)\]'?")


def _named(error: Exception, names: list[str]) -> Exception:
    """``error`` (of the blend op, which names tensors by index) naming the parameters."""
    message = _INDEXED.sub(lambda m: f"{m[1]} of parameter {names[int(m[2])]!r}", str(error))
    return type(error)(f"meldkit.exde: {message}")


class _Plans:
    """One :class:`meldkit.ops.BlendPlan` per (device, dtype) group of the tensors: the op wants
    one dtype per call, and a denoiser may mix them (diffusers keeps some modules in float32
    in a float16 model). Errors name the parameter."""

    def __init__(self, outs, bases, taus, names: list[str]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(bases):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.plans = []
        for idx in groups.values():
            sub = [names[i] for i in idx]
            try:
                plan = BlendPlan(
                    [outs[i] for i in idx],
                    [bases[i] for i in idx],
                    [taus[i] for i in idx],
                    tensor_keys=[tensor_key(n) for n in sub],
                )
            except (TypeError, ValueError, RuntimeError) as e:
                raise _named(e, sub) from e
            self.plans.append((plan, sub))

    def __call__(self, coeffs, *, keep=(1.0, 1.0), seed=0) -> None:
        for plan, sub in self.plans:
            try:
                plan(coeffs, keep=keep, seed=seed)
            except (TypeError, ValueError, RuntimeError) as e:
                raise _named(e, sub) from e


# extrapolate and decouple blend at most this many elements at a time, so that their float32
# copies of θ_base and τ stay small beside a bfloat16/float16 model.
_CHUNK = 1 << 24


def _blend_once(
    outs: list[torch.Tensor],
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]],
    coeffs: tuple[float, float, float],
    *,
    keep: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
) -> None:
    """``outs[i] ← θ_base + τ·g`` for ``pairs[i] = (name, θ_base, θ_ft)`` (g of
    :func:`meldkit.ops.blend_tensors`), with τ = θ_ft − θ_base formed in float32 (float64 where
    an input is) and the blend summed in float32, rounded once to the dtype of ``outs[i]``.

    The blend op reads τ in θ_base's dtype: taking τ from bfloat16/float16 tensors as they are
    would round it before the blend (a second rounding), so both are widened first, a chunk of
    at most ``_CHUNK`` elements at a time."""
    start = 0
    while start < len(pairs):
        stop, size = start, 0
        while stop < len(pairs) and (stop == start or size + pairs[stop][1].numel() <= _CHUNK):
            size += pairs[stop][1].numel()
            stop += 1
        bases, taus, targets = [], [], []
        for (_, b, f), out in zip(pairs[start:stop], outs[start:stop], strict=True):
            wide = torch.promote_types(torch.promote_types(b.dtype, f.dtype), torch.float32)
            b = b.detach().to(wide)
            bases.append(b)
            taus.append(f.detach().to(b.device, wide) - b)
            targets.append(out if out.dtype == wide else torch.empty_like(out, dtype=wide))
        names = [name for name, _, _ in pairs[start:stop]]
        _Plans(targets, bases, taus, names)(coeffs, keep=keep, seed=seed)
        with torch.no_grad():
            for target, out in zip(targets, outs[start:stop], strict=True):
                if target is not out:
                    out.copy_(target)
        start = stop


# ---- stage 2: extrapolation ----------------------------------------------------------------------


def extrapolate(
    base: nn.Module | Mapping[str, torch.Tensor],
    finetuned: nn.Module | Mapping[str, torch.Tensor],
    alpha: float = 0.25,
    *,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> nn.Module | dict[str, torch.Tensor]:
    """θ = θ_base − α·(θ_ft − θ_base): extrapolate *away* from the fine-tune (the release's sign;
    its fine-tune lowered the motion degree). A negative ``alpha`` extrapolates past the fine-tune
    instead. Parameters only (buffers are copied from ``base``; with two state dicts only the
    norm layers' running statistics are known to be buffers: pass a module for either, or
    ``exclude`` other buffers); ``include``/``exclude`` are name regexes (see :func:`paired`;
    tied parameters stay tied). Returns a copy of ``base`` (a module or a state dict, as
    given).

    τ and θ are computed in float32 whatever the dtypes of ``base`` and ``finetuned``, and each
    result is rounded once, to the dtype of ``base``'s tensor."""
    alpha = _finite("alpha", alpha)
    pairs = _pairs(base, finetuned, include, exclude)

    def compute(outs):
        _blend_once(outs, pairs, (-alpha, 0.0, 0.0))

    return _apply(base, [n for n, _, _ in pairs], compute)


# ---- stage 3: decoupling -------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoupleConfig:
    """ExDe's decoupling constants (the release's defaults): α of the degree vector, the DARE
    drop rate, the scales of θ_dyn's and θ_con's vectors, and the mask seed."""

    alpha: float = 0.25
    drop: float = 0.7
    dyn_scale: float = 0.75
    con_scale: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("alpha", "dyn_scale", "con_scale"):
            _finite(key, getattr(self, key))
        if not 0.0 <= _finite("drop", self.drop) < 1.0:
            raise ExDeError(f"meldkit.exde: 'drop' must be in [0, 1), got {self.drop}")
        # Any integer (NumPy's too, as blend_tensors takes them), kept as a Python int.
        seed = self.seed
        if (
            isinstance(seed, bool)
            or not isinstance(seed, numbers.Integral)
            or not (0 <= int(seed) < 2**64)
        ):
            raise ExDeError(f"meldkit.exde: 'seed' must be an int in [0, 2**64), got {seed!r}")
        object.__setattr__(self, "seed", int(seed))

    @property
    def keep(self) -> float:
        return 1.0 - self.drop

    def blend_coeffs(self, c_tau: float, c_dyn: float, c_con: float) -> tuple[float, float, float]:
        """``(a, b, c)`` of :func:`meldkit.ops.blend_tensors` for θ_base + c_τ·τ + c_dyn·τ_deg +
        c_con·τ_ctl, with τ_deg = DARE(−α·τ) on mask 1 and τ_ctl = DARE(τ) on mask 2."""
        return (c_tau, -self.alpha * c_dyn / self.keep, c_con / self.keep)


def decouple(
    base: nn.Module | Mapping[str, torch.Tensor],
    finetuned: nn.Module | Mapping[str, torch.Tensor],
    *,
    alpha: float = 0.25,
    drop: float = 0.7,
    dyn_scale: float = 0.75,
    con_scale: float = 0.25,
    seed: int = 0,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> tuple[nn.Module | dict[str, torch.Tensor], nn.Module | dict[str, torch.Tensor]]:
    """``(θ_dyn, θ_con)``: θ_dyn = θ_base + dyn_scale·DARE(−α·τ), θ_con = θ_ft + con_scale·DARE(τ).

    DARE drops each entry with probability ``drop`` and rescales the rest by 1/(1 − drop); the
    two masks are independent and reproducible from ``seed`` (keyed by tensor name, so the result
    does not depend on the order of the parameters or the device); 1-D tensors are never dropped.
    Returns copies of ``base`` (modules or state dicts, as given; tied parameters stay tied).
    Parameters only, as :func:`extrapolate` (with two state dicts, only the norm layers'
    running statistics are known to be buffers). ``seed``: any integer in [0, 2⁶⁴) (NumPy's
    too). τ and θ are computed in float32 and rounded once, to the dtype of ``base``'s tensor.

    The same masks drive :func:`attach`, so ``attach`` with the :func:`switch` schedule runs
    exactly these two models when the denoiser is float32; in bfloat16/float16 ``attach`` keeps τ
    in the denoiser's dtype (see :class:`Blender`), so a weight may differ from these by one
    rounding of τ.
    """
    cfg = DecoupleConfig(alpha, drop, dyn_scale, con_scale, seed)
    pairs = _pairs(base, finetuned, include, exclude)
    names = [n for n, _, _ in pairs]
    keep = (cfg.keep, cfg.keep)

    def run(coeffs):
        abc = cfg.blend_coeffs(*coeffs)

        def compute(outs):
            _blend_once(outs, pairs, abc, keep=keep, seed=seed)

        return _apply(base, names, compute)

    return run((0.0, cfg.dyn_scale, 0.0)), run((1.0, 0.0, cfg.con_scale))


# ---- schedules -----------------------------------------------------------------------------------


Coefficients = tuple[float, float, float]


class Schedule:
    """Maps a denoising step to ``(c_τ, c_dyn, c_con)``: θ = θ_base + c_τ·τ + c_dyn·dyn_scale·τ_deg
    + c_con·con_scale·τ_ctl. Call it as ``schedule(step, num_steps, timestep, sigma)``.

    ``step`` is the denoising step, counted from 0 (the first, noisiest), and ``num_steps`` the
    number of denoising steps (the pipeline's ``num_inference_steps``), not model evaluations:
    Heun's and KDPM2's two evaluations per step, PNDM's four in its Runge-Kutta warm-up, get one
    step, with that step's ``timestep`` and ``sigma`` (where the step starts) at each, so a step
    runs on one set of weights. ``sigma`` is the step's noise level: the scheduler's own
    ``sigmas`` entry where it has them (Euler, Heun, DPM-Solver with Karras sigmas, Stable Video
    Diffusion's EDM scheduler; flow-matching schedulers' sigmas in [0, 1]), else, for
    schedulers with a DDPM ``alphas_cumprod`` (DDIM, DDPM, PNDM, ...), √((1 − ᾱ_t)/ᾱ_t) at the
    step's timestep t (the same noise level in the Euler schedulers' convention); None when the
    scheduler has neither. θ_dyn is ``(0, 1, 0)`` and θ_con ``(1, 0, 1)``.

    Steps are positions in the scheduler's whole schedule, i.e. noise levels: an image-to-image
    call with ``strength`` s < 1 (or any pipeline that starts part-way) runs only steps from
    about (1 − s)·num_steps on, and ``num_steps`` stays the whole schedule's. So
    ``switch(0.5)`` with s ≤ 0.5 runs θ_con throughout, as the release's "t > 500" rule would:
    the high-noise steps that θ_dyn serves are skipped. For a split of the steps that do run,
    write a schedule on ``sigma`` (:class:`sigma_switch`) or on the steps from the first one
    seen.
    """

    def __call__(
        self, step: int, num_steps: int, timestep: float, sigma: float | None
    ) -> Coefficients:
        raise NotImplementedError


DYN: Coefficients = (0.0, 1.0, 0.0)
CON: Coefficients = (1.0, 0.0, 1.0)


@dataclass(frozen=True)
class switch(Schedule):
    """θ_dyn while ``step < at·num_steps`` (the high-noise part), then θ_con: the release's hard
    switch (``at=0.5``: with 50 steps, 25 and 25, as its "t > 500" rule gives)."""

    at: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= _finite("at", self.at) <= 1.0:
            raise ExDeError(f"meldkit.exde.switch: 'at' must be in [0, 1], got {self.at}")

    def __call__(self, step, num_steps, timestep, sigma):
        return DYN if step < self.at * num_steps else CON


@dataclass(frozen=True)
class sigma_switch(Schedule):
    """θ_dyn while the step's sigma is above ``at``, then θ_con: a switch by noise level rather
    than by step count, so it falls at the same point of the denoising process whatever the
    number of steps and the timestep spacing.

    The release's "t > 500" rule on DDPM timesteps is ``sigma_switch(σ_500)`` with
    σ_500 = √((1 − ᾱ_500)/ᾱ_500) from the training schedule's ``alphas_cumprod`` (1.618 for
    Stable Diffusion's scaled-linear betas 0.00085–0.012, 3.443 for DDPM's linear 1e-4–0.02).
    Needs a scheduler with sigmas or ``alphas_cumprod`` (:class:`Schedule`); raises
    :class:`ExDeError` otherwise.
    """

    at: float

    def __post_init__(self) -> None:
        if _finite("at", self.at) < 0.0:
            raise ExDeError(f"meldkit.exde.sigma_switch: 'at' must be ≥ 0, got {self.at}")

    def __call__(self, step, num_steps, timestep, sigma):
        if sigma is None:
            raise ExDeError(
                "meldkit.exde.sigma_switch: the scheduler has neither sigmas nor alphas_cumprod, "
                "so the step has no sigma; use switch(at=...) (a fraction of the steps)"
            )
        return DYN if sigma > self.at else CON


def _mix(w: float) -> Coefficients:
    return (w, 1.0 - w, w)


@dataclass(frozen=True)
class linear(Schedule):
    """From θ_dyn at the first step to θ_con at the last, linearly in the step index."""

    def __call__(self, step, num_steps, timestep, sigma):
        return _mix(step / max(num_steps - 1, 1))


@dataclass(frozen=True)
class cosine(Schedule):
    """From θ_dyn to θ_con along a half cosine: slow at both ends."""

    def __call__(self, step, num_steps, timestep, sigma):
        return _mix(0.5 - 0.5 * math.cos(math.pi * step / max(num_steps - 1, 1)))


def _coefficients(value: Any, source: str) -> Coefficients:
    """``value``, what ``source`` (a schedule, named for the message) returned, as
    ``(c_τ, c_dyn, c_con)`` floats, or an ExDeError: anything but 3 finite numbers (a tuple,
    list, array or tensor of them) within float32's range (where the blends run). A mapping
    (``{0: 0.0, 1: 1.0, 2: 0.0}`` iterates as its keys) or a set (no order) is no triple."""
    coeffs = None
    # A string iterates as characters ("101" is no triple), a dict as its keys, a set unordered.
    if not isinstance(value, (str, bytes, Mapping, AbstractSet)):
        try:
            coeffs = tuple(float(c) for c in value)
        except (TypeError, ValueError, RuntimeError):  # not iterable, not numbers, or not scalars
            coeffs = None
    if coeffs is None or len(coeffs) != 3 or not all(math.isfinite(c) for c in coeffs):
        shown = coeffs if coeffs is not None else value
        raise ExDeError(
            f"meldkit.exde: {source} returned {shown!r}, not 3 finite numbers (c_τ, c_dyn, c_con)"
        )
    if any(abs(c) > torch.finfo(torch.float32).max for c in coeffs):
        raise ExDeError(
            f"meldkit.exde: {source} returned {coeffs!r}, beyond float32's range (the blends run "
            "in float32)"
        )
    return coeffs


def _schedule_name(schedule: Callable[..., Coefficients]) -> str:
    """``switch(at=0.5)`` for a Schedule, a function's qualified name, else its repr."""
    if isinstance(schedule, Schedule):
        return repr(schedule)
    return getattr(schedule, "__qualname__", None) or repr(schedule)


def _as_schedule(schedule: Schedule | Callable[..., Coefficients]) -> Callable[..., Coefficients]:
    if not callable(schedule):
        raise TypeError(f"meldkit.exde: 'schedule' must be callable, got {type(schedule)}")
    return schedule


# ---- the per-step hook ---------------------------------------------------------------------------


def _denoiser(pipe: Any, name: str | None = None) -> nn.Module:
    if name is not None:
        module = getattr(pipe, name, None)
        if not isinstance(module, nn.Module):
            raise ExDeError(f"meldkit.exde.attach: the pipeline has no module {name!r}")
        return module
    if isinstance(getattr(pipe, "transformer_2", None), nn.Module):
        # Wan 2.2: `transformer` denoises the high-noise steps, `transformer_2` the low-noise
        # ones; each has its own weights, so one base/fine-tune pair cannot serve both.
        raise ExDeError(
            "meldkit.exde.attach: the pipeline has two denoisers, 'transformer' (high-noise "
            "steps) and 'transformer_2' (low-noise steps): pass denoiser='transformer' or "
            "denoiser='transformer_2' (nest two attach blocks, each with that denoiser's base "
            "and fine-tune, to blend both)"
        )
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise ExDeError("meldkit.exde.attach: the pipeline has no 'unet' or 'transformer' module")


def _timestep_value(timestep: Any) -> float:
    """The step's timestep from a denoiser's ``timestep`` argument: a scalar, one per batch row
    (CFG), or one per token, where image-to-video pipelines put 0 on the conditioning frame's
    tokens (LTX: ``t·(1 − conditioning_mask)``; Wan with ``expand_timesteps``): the maximum."""
    t = torch.as_tensor(timestep).detach().flatten()
    if t.numel() == 0:
        raise ExDeError("meldkit.exde: the denoiser was called without a timestep")
    return float(t.float().max())


def sigma_of(scheduler: Any, step: int, timestep: float) -> float | None:
    """The noise level at entry ``step`` of ``scheduler.timesteps`` (timestep ``timestep``),
    as the schedules receive it for the denoising step starting there (:class:`Schedule`):
    ``scheduler.sigmas[step]``, else
    √((1 − ᾱ_t)/ᾱ_t) from ``scheduler.alphas_cumprod`` at the nearest integer timestep t, else
    None."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > step:
        return float(sigmas[step])
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or len(alphas) == 0:
        return None
    index = min(max(round(float(timestep)), 0), len(alphas) - 1)
    a = float(alphas[index])
    return math.sqrt((1.0 - a) / a) if a > 0.0 else math.inf


def step_of(timesteps: torch.Tensor, timestep: Any) -> int:
    """The index of ``timestep`` in the scheduler's ``timesteps`` (the nearest value): works for
    integer DDPM timesteps and for continuous ones (Stable Video Diffusion's 0.25·ln σ).

    ``timestep`` may be a scalar or a tensor: one value per batch row, or one per token with 0 on
    conditioning tokens (LTX and Wan image-to-video); its maximum is the step's timestep."""
    t = _timestep_value(timestep)
    ts = timesteps.detach().float().cpu()
    return int((ts - t).abs().argmin())


def _steps_of_positions(scheduler: Any, count: int) -> list[int]:
    """The denoising step of each of the ``count`` entries of ``scheduler.timesteps``: one entry
    per model evaluation, and a step may take several.

    * PNDM: with Runge-Kutta warm-up (``prk_timesteps``), 4 evaluations per step for the first
      3 steps, then one; without (``skip_prk_steps``), the first step evaluates twice.
    * Other schedulers of ``order`` k > 1 (Heun, KDPM2, DPM-Solver SDE: timesteps t₀, t₁, t₁,
      t₂, t₂, …): k evaluations per step, the last step one.
    * Otherwise (DDIM, Euler, DPM-Solver multistep, UniPC, flow matching...): one each.
    """
    prk = getattr(scheduler, "prk_timesteps", None)
    plms = getattr(scheduler, "plms_timesteps", None)
    if prk is not None and plms is not None and len(prk) + len(plms) == count:
        if len(prk):
            warm = len(prk) // 4
            return [p // 4 for p in range(len(prk))] + [warm + j for j in range(len(plms))]
        return [max(p - 1, 0) for p in range(count)]
    order = getattr(scheduler, "order", 1)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        order = 1
    if getattr(scheduler, "num_inference_steps", None) == count:
        order = 1
    return [p // order for p in range(count)]


class _Steps:
    """The denoising steps of one ``scheduler.timesteps`` (kept while the scheduler keeps that
    tensor): which entry a model evaluation is, which step that entry belongs to, and where
    each step starts."""

    def __init__(self, scheduler: Any, timesteps: torch.Tensor) -> None:
        self.timesteps = timesteps
        self.values = timesteps.detach().float().cpu()
        self.step = _steps_of_positions(scheduler, len(self.values))
        self.num_steps = self.step[-1] + 1
        self.start: dict[int, int] = {}
        for position, step in enumerate(self.step):
            self.start.setdefault(step, position)

    def position(self, scheduler: Any, t: float) -> int:
        """The entry of ``timesteps`` being evaluated at timestep ``t``: the scheduler's own
        counter where it keeps one in range (``step_index``, PNDM's ``counter``), as repeated
        timesteps (Heun's t₁, t₁) are otherwise ambiguous; else the nearest timestep (before the
        scheduler's first step, or without a counter).

        The counter is the scheduler's own view: KDPM2 whose first timesteps coincide (Karras
        sigmas beyond the training range, all at t = 999) starts it at 1, not 0, and runs that
        way; the steps then follow it."""
        index = getattr(scheduler, "step_index", None)
        if index is None and hasattr(scheduler, "prk_timesteps"):
            index = getattr(scheduler, "counter", None)
        if isinstance(index, numbers.Integral) and not isinstance(index, bool):
            if 0 <= int(index) < len(self.values):
                return int(index)
        return int((self.values - t).abs().argmin())


class Blender:
    """θ_base and τ of a denoiser's selected parameters, and the blend into its live weights.

    ``names`` lists the blended parameters (a tied one once, under the denoiser's own first name
    for it), ``live`` the denoiser's parameters, ``base`` θ_base and ``tau`` τ = θ_ft − θ_base of
    each, on the parameter's device and in its dtype: the blend op reads θ_base and τ in the
    dtype it writes. τ is formed in float32 from the given base and fine-tune (a float32
    checkpoint beside a bfloat16 pipeline included) and rounded once; θ(step) = θ_base + τ·g is
    then summed in float32 and rounded once more. In bfloat16/float16 a weight may therefore
    differ by one rounding of τ from :func:`decouple`'s, which keeps τ in float32.

    :meth:`apply` re-blends when the coefficients change, or when something else wrote to the
    parameters since its last blend (``load_state_dict``, an in-place update: their version
    counters moved; reading them costs about 0.1 µs per tensor per call). Writes through
    ``param.data`` (``p.data.mul_(…)``) bypass the counters and go unseen: call
    :meth:`apply` with ``force=True``, or write to the parameter under ``torch.no_grad()``.

    :meth:`restore` writes back the weights the denoiser held when the Blender was made, bit for
    bit, whatever they were: θ_base, the fine-tune (a pipeline that holds the fine-tune, given
    as ``finetuned``), or anything else. Only what θ_base and τ cannot give back is kept
    (``snapshot_bytes``): nothing for a tensor equal to θ_base; for one equal to θ_base + τ
    (summed in float32, rounded to its dtype), the few elements where that sum does not round
    back to the held value (a τ rounded to bfloat16/float16, or cancellation in θ_ft − θ_base);
    a whole copy for any other tensor (or one where over a quarter of the elements differ).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        base: nn.Module | Mapping[str, torch.Tensor],
        finetuned: nn.Module | Mapping[str, torch.Tensor],
        config: DecoupleConfig,
        include=None,
        exclude=None,
    ) -> None:
        self.config = config
        denoiser = _unwrap(denoiser)
        # State dicts carry buffers too: the live denoiser says which names those are.
        buffers = _buffer_names(denoiser, base, finetuned)
        pairs = _pairs(base, finetuned, include, exclude, buffers=buffers)
        # A state dict names a tied parameter once per alias: map each to the one live tensor.
        live = dict(denoiser.named_parameters(remove_duplicate=False))
        first = {id(p): n for n, p in denoiser.named_parameters()}
        self.names: list[str] = []
        self.live: list[nn.Parameter] = []
        chosen: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
        for name, b, f in pairs:
            p = live.get(name)
            if p is None:
                raise ExDeError(f"meldkit.exde: the pipeline's denoiser has no parameter {name!r}")
            if id(p) in chosen:
                other, b0, f0 = chosen[id(p)]
                if not (torch.equal(b, b0) and torch.equal(f, f0)):
                    raise ExDeError(
                        f"meldkit.exde: {other!r} and {name!r} are one (tied) parameter of the "
                        "denoiser but differ in the base or the fine-tuned model"
                    )
                continue
            chosen[id(p)] = (name, b, f)
            self.names.append(first[id(p)])
            self.live.append(p)
        with torch.no_grad():
            self.base, self.tau = [], []
            for (_, b, f), p in zip(chosen.values(), self.live, strict=True):
                wide = torch.promote_types(torch.promote_types(b.dtype, f.dtype), torch.float32)
                b = b.detach().to(p.device, wide)
                self.tau.append((f.detach().to(p.device, wide) - b).to(p.dtype))
                self.base.append(b.to(p.dtype, copy=True))
        if not any(bool(t.any()) for t in self.tau):
            itself = isinstance(finetuned, nn.Module) and _unwrap(finetuned) is denoiser
            raise ExDeError(
                "meldkit.exde.attach: 'finetuned_unet' equals 'base_unet' in every blended "
                "parameter (τ = 0), so the blend would change nothing"
                + (
                    "; 'finetuned_unet' is the pipeline's denoiser, and 'base_unet' None means "
                    "its current weights: pass the base model as 'base_unet'"
                    if itself
                    else ""
                )
            )
        # What the denoiser holds now (before any blend), for restore().
        self._saved = [self._snapshot(i) for i in range(len(self.live))]
        self.snapshot_bytes = sum(_nbytes(saved) for saved in self._saved)
        # Validated and laid out once: each blend is then one native call (one CUDA launch) per
        # dtype of the denoiser's parameters.
        self.plan = _Plans(self.live, self.base, self.tau, self.names)
        self._layout = self._addresses()
        self.current: Coefficients | None = None
        self.blends = 0
        self._written: tuple[int, ...] | None = None

    def _addresses(self) -> tuple[int, ...]:
        return tuple(map(_DATA_PTR, self.live))

    def _follow(self) -> bool:
        """Re-plan after the parameters' storage moved (``param.data = …``, ``model.to(…)``,
        accelerate's ``enable_model_cpu_offload`` moving the denoiser between devices): θ_base
        and τ move to each parameter's new device. True when they had moved."""
        addresses = self._addresses()
        if addresses == self._layout:
            return False
        for i, (name, p) in enumerate(zip(self.names, self.live, strict=True)):
            if p.dtype != self.base[i].dtype or p.shape != self.base[i].shape:
                raise ExDeError(
                    f"meldkit.exde.attach: parameter {name!r} became {p.dtype} "
                    f"{list(p.shape)} inside the block (it was {self.base[i].dtype} "
                    f"{list(self.base[i].shape)}): convert the denoiser before attach"
                )
            if p.device.type == "meta":
                raise ExDeError(
                    f"meldkit.exde.attach: parameter {name!r} is on the meta device (offloaded "
                    "layer by layer, as enable_sequential_cpu_offload does): its weights cannot "
                    "be blended; use enable_model_cpu_offload or no offloading"
                )
            if p.device != self.base[i].device:
                self.base[i] = self.base[i].to(p.device)
                self.tau[i] = self.tau[i].to(p.device)
        self.plan = _Plans(self.live, self.base, self.tau, self.names)
        self._layout = addresses
        return True

    def _base_plus_tau(self, i: int) -> torch.Tensor:
        """θ_base + τ of parameter ``i``, summed in float32 (or wider) and rounded to its dtype:
        the held fine-tune, up to that rounding."""
        b, tau = self.base[i], self.tau[i]
        wide = torch.promote_types(b.dtype, torch.float32)
        return (b.to(wide) + tau.to(wide)).to(b.dtype)

    def _snapshot(self, i: int) -> tuple[str, Any]:
        """How to give parameter ``i``'s current value back: ``("base", None)``,
        ``("tuned", patch)`` (θ_base + τ with ``patch = (flat indices, values)`` or None) or
        ``("copy", tensor)``. Compared bit for bit (-0.0 is not 0.0; a NaN is kept)."""
        held = self.live[i].detach()
        if _bits_equal(held, self.base[i]):
            return ("base", None)
        tuned = self._base_plus_tau(i)
        differ = (_bits(held) != _bits(tuned)).reshape(-1)
        count = int(differ.sum())
        if count == 0:
            return ("tuned", None)
        if count <= held.numel() // 4:
            index = differ.nonzero().squeeze(1)
            if held.numel() <= torch.iinfo(torch.int32).max:
                index = index.int()
            return ("tuned", (index, held.reshape(-1)[index].clone()))
        return ("copy", held.clone())

    def _versions(self) -> tuple[int, ...] | None:
        """The parameters' version counters (None for inference-mode tensors, which keep none)."""
        try:
            return tuple(map(_VERSION, self.live))
        except RuntimeError:
            return None

    def apply(self, coeffs: Coefficients, *, force: bool = False) -> None:
        """Blend θ = θ_base + c_τ·τ + c_dyn·dyn_scale·τ_deg + c_con·con_scale·τ_ctl into the
        live parameters, for ``coeffs = (c_τ, c_dyn, c_con)``; nothing to do when they hold it
        (unless ``force``)."""
        self._apply(coeffs, "a schedule", force=force)

    def _apply(self, coeffs: Any, source: str, *, force: bool = False) -> None:
        """:meth:`apply` of what ``source`` (named in the errors: a schedule at a step) gave."""
        coeffs = _coefficients(coeffs, source)
        c_tau, c_dyn, c_con = coeffs
        cfg = self.config
        abc = cfg.blend_coeffs(c_tau, c_dyn * cfg.dyn_scale, c_con * cfg.con_scale)
        # Each in range, their sums (with the scales and 1/keep) may still overflow float32.
        table, dense = blend_coefficients(*abc, cfg.keep, cfg.keep)
        if not all(math.isfinite(g) for g in (*table, dense)):
            raise ExDeError(
                f"meldkit.exde: {source} returned {coeffs!r}, whose blend (θ_base + c_τ·τ + "
                "c_dyn·τ_deg + c_con·τ_ctl) overflows float32, where the blends run"
            )
        # Storage that moved holds what was moved into it: blend again to be sure.
        moved = self._follow()
        if not force and not moved and coeffs == self.current and self._versions() == self._written:
            return
        self.plan(abc, keep=(cfg.keep, cfg.keep), seed=cfg.seed)
        self.current = coeffs
        self._written = self._versions()
        self.blends += 1

    def restore(self) -> None:
        """Write back, bit for bit, the weights the live parameters held when the Blender was
        made (θ_base, the fine-tune or other weights; see the class notes)."""
        with torch.no_grad():
            for i, (p, (kind, saved)) in enumerate(zip(self.live, self._saved, strict=True)):
                if kind == "base":
                    value = self.base[i]
                elif kind == "copy":
                    value = saved
                else:
                    value = self._base_plus_tau(i)
                    if saved is not None:
                        index, values = saved
                        value.view(-1)[index.to(value.device)] = values.to(value.device)
                p.data.copy_(value)
        self.current = None


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr

# Integer types of each float width: comparing their views compares bits.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()])


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b.to(a.device)))


def _nbytes(saved: tuple[str, Any]) -> int:
    kind, value = saved
    if value is None:
        return 0
    tensors = value if kind == "tuned" else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)


# The parameters each open ``attach`` blends (by id: its Blender holds them, so the ids stay
# theirs): two blocks writing one parameter would each take the other's weights for its own.
_ATTACHED: dict[int, Blender] = {}
_ATTACHED_LOCK = threading.Lock()


def _claim(blender: Blender) -> None:
    with _ATTACHED_LOCK:
        for name, p in zip(blender.names, blender.live, strict=True):
            if id(p) in _ATTACHED:
                raise ExDeError(
                    f"meldkit.exde.attach: parameter {name!r} is already blended by an enclosing "
                    "attach: nested attach blocks on one denoiser must blend disjoint parameters "
                    "(give them disjoint 'include'/'exclude')"
                )
        for p in blender.live:
            _ATTACHED[id(p)] = blender


def _release(blender: Blender) -> None:
    with _ATTACHED_LOCK:
        for p in blender.live:
            if _ATTACHED.get(id(p)) is blender:
                del _ATTACHED[id(p)]


@contextlib.contextmanager
def attach(
    pipe: Any,
    base_unet: nn.Module | Mapping[str, torch.Tensor] | None,
    finetuned_unet: nn.Module | Mapping[str, torch.Tensor],
    *,
    schedule: Schedule | Callable[..., Coefficients] | None = None,
    alpha: float = 0.25,
    drop: float = 0.7,
    dyn_scale: float = 0.75,
    con_scale: float = 0.25,
    seed: int = 0,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    denoiser: str | None = None,
) -> Iterator[Blender]:
    """Blend ``pipe``'s denoiser per denoising step while the ``with`` block runs.

    A forward pre-hook on ``pipe.unet`` (or ``pipe.transformer``) reads the step's timestep (the
    pipeline's ``current_timestep`` when it keeps one, else the largest value of the call's
    ``timestep``: per-token timesteps are 0 on the conditioning frame), finds the evaluation in
    ``pipe.scheduler.timesteps`` (the scheduler's ``step_index`` where it keeps one, else the
    nearest timestep, so continuous timesteps such as Stable Video Diffusion's 0.25·ln σ work as
    well as integer ones) and its denoising step (:class:`Schedule`: multi-evaluation
    schedulers such as Heun, KDPM2 and PNDM included), asks ``schedule`` for the coefficients
    and re-blends the weights only when they change (CFG's extra calls and the steps of one
    phase cost nothing) or when something else wrote to them (a ``load_state_dict`` inside the
    block). Step 0 is blended before the first call. With ``strength`` (image-to-image), steps
    count in the whole schedule: see :class:`Schedule`.

    On exit, normally or by an exception, the hook is removed and the denoiser gets back,
    bit for bit, the weights it held on entry: θ_base when it held the base, the fine-tune when
    the pipeline holds the fine-tune (``attach(pipe, base, pipe.unet)``), any other weights
    likewise. Only what θ_base and τ cannot rebuild is kept meanwhile (``snapshot_bytes``; see
    :class:`Blender`): nothing for the base, a few patched elements for a fine-tune given as
    the pipeline's own denoiser, a copy of each tensor that is neither.

    The denoiser's storage may move inside the block (``param.data = …``, ``module.to(…)``,
    ``enable_model_cpu_offload``, which moves it to the GPU after this hook at its first call
    and back once the pipeline is done): the hook then re-plans, moves θ_base and τ to the
    parameters' device and blends again. Each move costs a transfer of θ_base and τ (2× the
    blended parameters' size) and one blend, and they stay on the device they last moved to.
    With model offloading the denoiser is still on the CPU when this hook runs at a call's first
    step and on the GPU from the second, so they move twice per pipeline call and are on the GPU
    while it denoises (offloading saves no GPU memory for them). A change of dtype inside the
    block, and weights left on the meta device (``enable_sequential_cpu_offload``), raise
    :class:`ExDeError`.

    Blocks may nest on one denoiser when they blend disjoint parameters (e.g.
    ``include="temporal"`` outside, ``exclude="temporal"`` inside), or on different denoisers
    (Wan 2.2's two); a block that would blend a parameter an open block blends raises. The
    weights are blended in the denoiser's dtype from θ_base and τ stored in it (see
    :class:`Blender`).

    Parameters
    ----------
    pipe : diffusers pipeline
        Any pipeline whose denoiser is ``pipe.unet`` or ``pipe.transformer`` (possibly
        ``torch.compile``'d) and whose scheduler has ``timesteps`` (set by the pipeline at each
        call).
    base_unet : nn.Module or state dict or None
        θ_base; None: the denoiser's current weights.
    finetuned_unet : nn.Module or state dict
        θ_ft (only τ = θ_ft − θ_base is kept; the caller may free it afterwards). May be the
        pipeline's own denoiser when it holds the fine-tune (then give ``base_unet``).
    schedule : Schedule or callable
        ``(step, num_steps, timestep, sigma) -> (c_τ, c_dyn, c_con)``; default :class:`switch`.
    alpha, drop, dyn_scale, con_scale, seed
        As :func:`decouple`.
    include, exclude : regexes
        Which parameters blend (e.g. ``include="temporal"``); default all (never buffers).
    denoiser : str, optional
        The pipeline attribute to hook; needed when there are two (Wan 2.2's ``transformer``
        for the high-noise steps and ``transformer_2`` for the low-noise ones).

    Yields
    ------
    Blender
        Its ``blends`` counts the re-blends; ``current`` holds the coefficients in use.

    Raises
    ------
    ExDeError
        Models that do not match the denoiser, an unusable setting, a parameter that an
        enclosing ``attach`` already blends, or a fine-tune equal to the base in every blended
        parameter (τ = 0: e.g. ``attach(pipe, None, pipe.unet)``, which would blend nothing);
        while the block runs, a schedule's return that is not 3 finite numbers (a dict or a set
        included) within float32's range, or whose blend overflows float32 (the message names
        the schedule and the step).
    """
    module = _denoiser(pipe, denoiser)
    cfg = DecoupleConfig(alpha, drop, dyn_scale, con_scale, seed)
    sched = _as_schedule(schedule if schedule is not None else switch())
    base = base_unet if base_unet is not None else module
    blender = Blender(module, base, finetuned_unet, cfg, include, exclude)
    _claim(blender)

    steps: list[_Steps | None] = [None]

    def hook(module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise ExDeError("meldkit.exde.attach: the denoiser was called without a timestep")
        timesteps = getattr(pipe.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            raise ExDeError("meldkit.exde.attach: the scheduler has no timesteps set")
        # The loop's own timestep when the pipeline keeps it (LTX, Wan, Flux...): it is in the
        # scheduler's units even where the denoiser gets a rescaled one (Flux's t / 1000).
        current = getattr(pipe, "_current_timestep", None)
        t = _timestep_value(current if current is not None else timestep)
        if steps[0] is None or steps[0].timesteps is not timesteps:
            steps[0] = _Steps(pipe.scheduler, timesteps)
        known = steps[0]
        step = known.step[known.position(pipe.scheduler, t)]
        # The step's own timestep and noise level (where it starts), the same for each of its
        # model evaluations (Heun's corrector included).
        start = known.start[step]
        t = float(known.values[start])
        sigma = sigma_of(pipe.scheduler, start, t)
        source = f"the schedule {_schedule_name(sched)} at step {step} of {known.num_steps}"
        blender._apply(sched(step, known.num_steps, t, sigma), source)
        return None

    # On the pipeline's module itself (a torch.compile wrapper included): a hook on the wrapped
    # module would be traced into the compiled graph.
    try:
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield blender
        finally:
            handle.remove()
            blender.restore()
    finally:
        _release(blender)


__all__ = [
    "CON",
    "DYN",
    "Blender",
    "DecoupleConfig",
    "ExDeError",
    "Schedule",
    "attach",
    "cosine",
    "decouple",
    "extrapolate",
    "linear",
    "paired",
    "step_of",
    "switch",
]
