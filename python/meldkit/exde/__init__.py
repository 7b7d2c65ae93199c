"""ExDe (Tian et al., CVPR 2025): extrapolating and decoupling image-to-video diffusion models.

::

    from meldkit import exde

    more_motion = exde.extrapolate(base_unet, finetuned_unet, alpha=0.25)   # stage 2
    dyn, con = exde.decouple(base_unet, finetuned_unet, seed=0)             # stage 3, two models
    with exde.attach(pipe, base_unet, finetuned_unet, schedule=exde.switch(0.5), seed=0):
        frames = pipe(image).frames                                          # blended per step

    adapter = exde.add_text_adapter(pipe.unet, text_dim=1024)               # stage 1
    exde.motion_degree(frames)                                               # check the effect

See :mod:`meldkit.exde.blending`, :mod:`meldkit.exde.adapter` and :mod:`meldkit.exde.motion`.
"""

from meldkit.exde.adapter import (
    TemporalTextAdapter,
    adapter_parameters,
    add_text_adapter,
    remove_text_adapter,
    training_step,
)
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
    sigma_of,
    sigma_switch,
    step_of,
    switch,
)
from meldkit.exde.motion import MotionDegree, motion_degree

__all__ = [
    "CON",
    "DYN",
    "Blender",
    "DecoupleConfig",
    "ExDeError",
    "MotionDegree",
    "Schedule",
    "TemporalTextAdapter",
    "adapter_parameters",
    "add_text_adapter",
    "attach",
    "cosine",
    "decouple",
    "extrapolate",
    "linear",
    "motion_degree",
    "paired",
    "remove_text_adapter",
    "sigma_of",
    "sigma_switch",
    "step_of",
    "switch",
    "training_step",
]
