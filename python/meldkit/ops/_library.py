"""``torch.library.custom_op`` with an explicit schema, on every torch meldkit supports.

The ops' schemas are written out instead of inferred from their type hints: torch 2.4 infers
schemas only from ``typing.List``/``Optional`` objects, not from postponed (string) annotations,
``list[...]`` or ``X | None``. ``tests/test_ops_schema.py`` checks that each
written schema is the one a newer torch infers from the function's hints, so the two cannot
drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

# ``custom_op(tags=...)`` arrived after torch 2.4, which gets the ops without their tags.
_TAKES_TAGS = "tags" in inspect.signature(torch.library.custom_op).parameters


def custom_op(
    name: str,
    fn: Callable[..., Any] | None = None,
    *,
    schema: str,
    mutates_args: Sequence[str] = (),
    tags: Sequence[torch.Tag] = (),
) -> Any:
    """``torch.library.custom_op(name, fn, mutates_args=..., schema=schema)``, with ``tags``
    where this torch takes them. Without ``fn``, a decorator (as torch's)."""
    kwargs: dict[str, Any] = {"mutates_args": tuple(mutates_args), "schema": schema}
    if tags and _TAKES_TAGS:
        kwargs["tags"] = tuple(tags)
    if fn is None:
        return torch.library.custom_op(name, **kwargs)
    return torch.library.custom_op(name, fn, **kwargs)
