"""Model merging: the registry of merge methods (each a configuration of one generalized routine).

The streaming engine and the ``meldkit merge`` command build on this registry.
"""

from meldkit.merging.methods import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "get_method"]
