"""How much a video moves: to check that extrapolation moves motion the intended way."""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MotionDegree:
    """``value``: the mean motion between consecutive frames; ``method``: ``"farneback"`` (mean
    optical-flow magnitude in pixels per frame, OpenCV) or ``"frame_difference"`` (root mean
    square of the grey-level change between frames, in [0, 1] units)."""

    value: float
    method: str


def _is_pil_image(x) -> bool:
    image = sys.modules.get("PIL.Image")  # PIL made it only if it is imported
    return image is not None and isinstance(x, image.Image)


def _frames(frames) -> torch.Tensor:
    """``[F, H, W]`` grey levels in [0, 1] from ``[F, C, H, W]`` / ``[F, H, W, C]`` tensors or
    arrays, or a list of PIL images (diffusers' outputs; grey ``"L"`` images too). Integer
    (uint8) frames are 0-255 and are scaled by 1/255 whatever the container; float frames must
    be in [0, 1] (a ValueError for a finite maximum above 1.5, i.e. 0-255 floats). A batch
    ``[B, F, ...]`` must hold one video. A 3-D tensor or array (``[H, W, C]``, ``[C, H, W]``) is
    one image, not a video: a ValueError, as is a bare PIL image."""
    if _is_pil_image(frames):
        raise ValueError(
            f"motion_degree: expected at least 2 frames, got a single PIL image of size "
            f"{frames.size}: pass a video, e.g. a list of PIL images"
        )
    if isinstance(frames, (list, tuple)):
        import numpy as np

        frames = np.stack([np.asarray(f) for f in frames])
        if frames.ndim == 3:  # grey images ("L"): [F, H, W] → [F, H, W, 1]
            frames = frames[..., None]
    elif getattr(frames, "ndim", None) == 3:
        raise ValueError(
            "motion_degree: expected at least 2 frames ([F, C, H, W] or [F, H, W, C]), got a "
            f"single image of shape {list(frames.shape)} (no frame axis): pass a video; grey "
            "frames are [F, 1, H, W] or [F, H, W, 1]"
        )
    x = torch.as_tensor(frames).detach().cpu()
    if x.is_floating_point():
        x = x.float()
        # 1.5, not 1: float frames slightly past 1 (a decoder's overshoot) are still [0, 1].
        peak = float(x.max()) if x.numel() else 0.0
        if math.isfinite(peak) and peak > 1.5:
            raise ValueError(
                f"motion_degree: 'frames' are floats up to {peak:g}; float frames must be in "
                "[0, 1]: divide 0-255 frames by 255, or pass them as uint8"
            )
    else:
        x = x.float() / 255.0
    if x.dim() == 5 and x.shape[0] > 1:
        raise ValueError(
            f"motion_degree: 'frames' is a batch of {x.shape[0]} videos (shape "
            f"{list(x.shape)}): pass one video (frames[i])"
        )
    if x.dim() == 5:
        x = x[0]
    if x.dim() == 4 and x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.permute(0, 2, 3, 1)
    if x.dim() == 4:
        x = x[..., :3].mean(-1) if x.shape[-1] >= 3 else x[..., 0]
    if x.dim() != 3 or x.shape[0] < 2:
        raise ValueError(f"motion_degree: expected at least 2 frames, got shape {list(x.shape)}")
    return x


def motion_degree(frames, *, method: str = "auto") -> MotionDegree:
    """The motion degree of a video: mean Farnebäck optical-flow magnitude when OpenCV is
    installed (``method="auto"`` or ``"farneback"``), else the frame-difference energy
    (``"frame_difference"``); the result names which.

    ``frames`` is one video: ``[F, C, H, W]`` or ``[F, H, W, C]`` (or ``[1, F, ...]``) tensors
    or arrays, or a list of PIL images; uint8 frames are 0-255, float frames must be in [0, 1]
    (a ValueError for a maximum above 1.5). For a batch (``pipe(...).frames`` of several
    videos) pass one video, ``frames[i]``. A 3-D tensor or array is read as one image
    (``[H, W, C]`` or ``[C, H, W]``), never as frames, and raises a ValueError, as does a bare
    PIL image: a video needs at least 2 frames (grey frames: ``[F, 1, H, W]`` or
    ``[F, H, W, 1]``)."""
    x = _frames(frames)
    if method not in ("auto", "farneback", "frame_difference"):
        raise ValueError(f"motion_degree: unknown method {method!r}")
    if method in ("auto", "farneback"):
        try:
            import cv2
        except ImportError:
            if method == "farneback":
                raise ImportError("motion_degree: method='farneback' needs opencv-python") from None
        else:
            import numpy as np

            grey = (x.clamp(0, 1) * 255).to(torch.uint8).numpy()
            mags = []
            for a, b in itertools.pairwise(grey):
                flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
                mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
            return MotionDegree(sum(mags) / len(mags), "farneback")
    diff = (x[1:] - x[:-1]).square().mean().sqrt()
    return MotionDegree(float(diff), "frame_difference")


__all__ = ["MotionDegree", "motion_degree"]
