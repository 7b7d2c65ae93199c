"""Merge methods as data: every method is a named configuration of the generalized routine
(:func:`meldkit.ops.merge_ref.generalized_merge_ref`), or one of the few methods with their own
formula (linear, model_stock, slerp), each with the paper it comes from and mergekit's defaults.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    Attributes
    ----------
    name : str
        The ``merge_method`` value of a mergekit-style config.
    kind : str
        ``"generalized"`` (sparsify → weight → consensus → disjoint merge), or ``"linear"``,
        ``"model_stock"``, ``"slerp"`` for the methods with a formula of their own.
    sparsify : str
        Mask of each task vector: ``none``, ``magnitude`` (TIES trim), ``random`` (DARE),
        ``breadcrumbs``, ``della``.
    consensus : str
        Sign election: ``none``, ``sum`` (by mass), ``count``.
    normalize : bool
        Default of the ``normalize`` parameter (divide by the (agreeing) weights' sum).
    rescale : str
        Default rescaling of the sparsified vectors: ``none``, ``inverse_density`` or ``l1``.
    needs_base : bool
        Whether ``base_model`` is required.
    model_params : tuple of str
        Per-model parameters it accepts: mergekit's per-input (``NON_BASE``/``INPUT``)
        parameters of the method, which the top-level ``parameters`` may also give as defaults.
    global_params : tuple of str
        Top-level parameters it accepts: mergekit's shared parameters of the method.
    required : tuple of str
        Per-model parameters without a default, which every model must be given (for every
        tensor): mergekit declares ``weight`` without a default for the task-vector methods
        and linear, and stops with "Missing required parameter weight" where none is given.
    inert : tuple of str
        Accepted keys that change nothing, in meldkit as in mergekit: ``int8_mask`` (mergekit
        stores its sign masks as int8 to save memory; meldkit's kernels never hold a mask
        tensor), and for ``task_arithmetic`` ``density`` and ``rescale`` (mergekit accepts them,
        but the method sparsifies nothing).
    paper : str
        Where the method comes from.
    """

    name: str
    kind: str
    sparsify: str = "none"
    consensus: str = "none"
    normalize: bool = False
    rescale: str = "none"
    needs_base: bool = True
    model_params: tuple[str, ...] = ("weight", "density")
    global_params: tuple[str, ...] = ("normalize", "lambda", "rescale", "int8_mask")
    required: tuple[str, ...] = ("weight",)
    inert: tuple[str, ...] = ("int8_mask",)
    paper: str = ""

    def reads(self, name: str) -> bool:
        """Whether parameter ``name`` changes the merge (accepted and not inert)."""
        return name in (*self.model_params, *self.global_params) and name not in self.inert


_TA = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089"
_TIES = (
    "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, "
    "arXiv:2306.01708"
)
_DARE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099"
_CRUMBS = "Davari & Belilovsky, Model Breadcrumbs, arXiv:2312.06795"
_DELLA = "Deep et al., DELLA-Merging: Magnitude-Based Sampling, arXiv:2406.11617"

# The top-level parameters of the sign-electing methods: mergekit's, and meldkit's choice of
# election (by mass or by count).
_ELECTING = ("normalize", "lambda", "rescale", "int8_mask", "consensus")

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "task_arithmetic",
            "generalized",
            inert=("int8_mask", "density", "rescale"),
            paper=_TA,
        ),
        MergeMethod(
            "ties",
            "generalized",
            sparsify="magnitude",
            consensus="sum",
            global_params=_ELECTING,
            normalize=True,
            paper=_TIES,
        ),
        MergeMethod(
            "dare_linear",
            "generalized",
            sparsify="random",
            rescale="l1",
            paper=_DARE,
        ),
        MergeMethod(
            "dare_ties",
            "generalized",
            sparsify="random",
            consensus="sum",
            global_params=_ELECTING,
            rescale="l1",
            paper=_DARE,
        ),
        MergeMethod(
            "breadcrumbs",
            "generalized",
            sparsify="breadcrumbs",
            model_params=("weight", "density", "gamma"),
            paper=_CRUMBS,
        ),
        MergeMethod(
            "breadcrumbs_ties",
            "generalized",
            sparsify="breadcrumbs",
            consensus="sum",
            global_params=_ELECTING,
            model_params=("weight", "density", "gamma"),
            paper=_CRUMBS,
        ),
        MergeMethod(
            "della",
            "generalized",
            sparsify="della",
            consensus="sum",
            global_params=_ELECTING,
            normalize=True,
            rescale="l1",
            model_params=("weight", "density", "epsilon"),
            paper=_DELLA,
        ),
        MergeMethod(
            "della_linear",
            "generalized",
            sparsify="della",
            rescale="l1",
            model_params=("weight", "density", "epsilon"),
            paper=_DELLA,
        ),
        MergeMethod(
            "linear",
            "linear",
            normalize=True,
            needs_base=False,
            model_params=("weight",),
            global_params=("normalize",),
            inert=(),
            paper="Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482",
        ),
        MergeMethod(
            "model_stock",
            "model_stock",
            model_params=(),
            global_params=("filter_wise",),
            required=(),
            inert=(),
            paper="Jang et al., Model Stock: All we need is just a few fine-tuned models, "
            "arXiv:2403.19522",
        ),
        MergeMethod(
            "slerp",
            "slerp",
            model_params=(),
            global_params=("t",),
            required=(),
            inert=(),
            paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 "
            "(as mergekit applies it: Goddard et al., arXiv:2403.13257)",
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; ValueError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge_method {name!r}; known: {', '.join(sorted(METHODS))}"
        ) from None
