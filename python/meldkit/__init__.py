"""meldkit: fast kernels for model merging and parameter-efficient fine-tuning.

Ops live in :mod:`meldkit.ops`; :func:`info` reports what this build can run natively.
"""

from meldkit import ops
from meldkit._native import MeldkitFallbackWarning
from meldkit._version import __version__
from meldkit.info import info

__all__ = ["MeldkitFallbackWarning", "__version__", "info", "ops"]
