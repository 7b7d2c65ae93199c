"""ExDe (Tian et al., CVPR 2025): extrapolating and decoupling image-to-video diffusion models.

::

    from meldkit import exde

    more_motion = exde.extrapolate(base_unet, finetuned_unet, alpha=0.25)   # stage 2
    dyn, con = exde.decouple(base_unet, finetuned_unet, seed=0)             # stage 3, two models
    with exde.attach(pipe, base_unet, finetuned_unet, schedule=exde.switch(0.5), seed=0):
        frames = pipe(image).frames                                          # blended per step

See :mod:`meldkit.exde.blending`.
"""

from meldkit.exde.blending import (
    CON,
    DYN,
    Blender,
    DecoupleConfig,
    ExDeError,
    Schedule,
    attach,
    cosine,
    decouple,
    extrapolate,
    linear,
    paired,
    step_of,
    switch,
)

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
