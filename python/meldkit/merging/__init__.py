"""Model merging: mergekit-style configurations, a streaming merge engine, and the registry of
merge methods (each a configuration of one generalized routine)."""

from meldkit.merging.checkpoint import Checkpoint, CheckpointError
from meldkit.merging.config import ConfigError, MergeConfig, parse_config
from meldkit.merging.engine import MergeError, merge, merge_state_dicts
from meldkit.merging.methods import METHODS, MergeMethod, get_method

__all__ = [
    "METHODS",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "MergeConfig",
    "MergeError",
    "MergeMethod",
    "get_method",
    "merge",
    "merge_state_dicts",
    "parse_config",
]
