"""Which implementation runs an op: a compiled kernel of meldkit._C, or the PyTorch reference.

Every op asks :func:`unavailable` before calling ``_C``. It returns every reason the native kernel
cannot run for the given device and dtypes (an empty list when it can). When there are reasons, the
op runs its reference instead and :func:`warn_fallback` says why, once per (op, device, dtypes).
``MELDKIT_BACKEND`` overrides the choice:

==============  ========================================================================
``auto``        native kernel where one exists, else the reference with a warning (default)
``reference``   always the reference (debugging, benchmarks); no warning
``native``      always the native kernel; raise instead of falling back (for CI and GPU checks)
==============  ========================================================================
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

try:
    from meldkit import _C

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built, or built for another Python
    _C = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

BACKENDS = ("auto", "reference", "native")

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}

_warned: set[tuple] = set()


class MeldkitFallbackWarning(UserWarning):
    """An op ran its pure-PyTorch reference because its native kernel could not run."""


def backend() -> str:
    """The value of ``MELDKIT_BACKEND`` (``auto`` when unset), validated."""
    value = os.environ.get("MELDKIT_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MELDKIT_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def native_dtypes(op: str) -> dict[str, list[str]]:
    """``{device_type: [dtype names]}`` that the compiled kernels of ``op`` accept."""
    return {k: list(v) for k, v in _dtype_table(op).items()}


def _dtype_table(op: str) -> dict[str, list[str]]:
    """:func:`native_dtypes` as a fixed fact of the build: asked once per op, then cached
    (callers must not modify it)."""
    table = _dtype_tables.get(op)
    if table is None:
        query = getattr(_C, f"{op}_native_dtypes", None)
        # None: not built, or an op whose kernels have not landed in this build
        table = _dtype_tables[op] = {} if query is None else dict(query())
    return table


_dtype_tables: dict[str, dict[str, list[str]]] = {}


def cuda_usable() -> tuple[bool, str]:
    """Whether the compiled CUDA kernels can run here, and why not."""
    if _C is None:
        return False, f"meldkit._C could not be imported ({IMPORT_ERROR})"
    if not _C.has_cuda():
        return False, "meldkit was built without CUDA (no nvcc at build time, or MELDKIT_CUDA=0)"
    count, reason = _C.cuda_device_count()
    return (count > 0), reason


def unavailable(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Every reason the native kernel of ``op`` cannot run on ``device`` for ``dtypes``.

    Raises
    ------
    RuntimeError
        When ``MELDKIT_BACKEND=native`` and there is a reason.
    """
    mode = backend()
    if mode == "reference":
        return ["MELDKIT_BACKEND=reference"]
    reasons = []
    if _C is None:
        reasons.append(f"meldkit._C could not be imported ({IMPORT_ERROR})")
    else:
        supported = _dtype_table(op).get(device.type)
        if supported is None:
            if device.type == "cuda" and not _C.has_cuda():
                reasons.append("meldkit was built without CUDA (no nvcc, or MELDKIT_CUDA=0)")
            else:
                reasons.append(f"no native kernel for device type {device.type!r}")
        else:
            for dt in dict.fromkeys(dtypes):
                name = _DTYPE_NAMES.get(dt, str(dt).removeprefix("torch."))
                if name not in supported:
                    reasons.append(
                        f"dtype {name} has no native {device.type} kernel "
                        f"(native: {', '.join(supported)})"
                    )
    if reasons and mode == "native":
        raise RuntimeError(f"meldkit.{op}: MELDKIT_BACKEND=native but " + "; ".join(reasons))
    return reasons


def warn_fallback(op: str, device: torch.device, dtypes: tuple, reasons: list[str]) -> None:
    """Warn, once per (op, device type, dtypes, reasons), that ``op`` runs its reference.

    Raises
    ------
    RuntimeError
        When ``MELDKIT_BACKEND=native``: every fallback, including those an op decides on
        beyond :func:`unavailable`'s reasons (an argument its kernels do not take), is refused.
    """
    if reasons == ["MELDKIT_BACKEND=reference"]:
        return  # asked for explicitly
    if backend() == "native":
        raise RuntimeError(f"meldkit.{op}: MELDKIT_BACKEND=native but " + "; ".join(reasons))
    names = tuple(_DTYPE_NAMES.get(dt, str(dt)) for dt in dtypes)
    key = (op, device.type, names, tuple(reasons))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"meldkit.{op}: running the pure-PyTorch reference on {device.type} for dtype "
        f"{'/'.join(dict.fromkeys(names))}: " + "; ".join(reasons),
        MeldkitFallbackWarning,
        stacklevel=_outside_stacklevel(),
    )


# Frames the fallback warning skips: meldkit's own and torch's (an op called through
# torch.library reaches warn_fallback from torch/_library/custom_ops.py).
_INTERNAL_DIRS = tuple(
    os.path.dirname(path) + os.sep for path in (__file__, torch.__file__) if path is not None
)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning :func:`warn_fallback` raises name the first
    calling frame outside meldkit and torch (the user's line that called the op), however deep
    the op's call chain; the outermost frame when every frame is inside. What ``warnings.warn``'s
    ``skip_file_prefixes`` does on Python ≥ 3.12, for 3.10 and 3.11 too."""
    frame, level = sys._getframe(2), 2  # warn_fallback's caller is stacklevel 2 of its warn()
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def stream_of(device: torch.device) -> int:
    """The raw ``cudaStream_t`` torch's current stream on ``device`` uses (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def _state_queries():
    """torch's (private, long-standing) queries of tracing, functorch transforms and modes;
    None where this torch lacks one (every call then goes through the registered op)."""
    try:
        return (
            torch.compiler.is_compiling,
            torch._C._are_functorch_transforms_active,
            torch._C._is_torch_function_mode_enabled,
            torch._C._len_torch_dispatch_stack,
        )
    except AttributeError:
        return None


_STATE_QUERIES = _state_queries()


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager_call(device: torch.device, args: tuple) -> bool:
    """Whether a call may go straight to an op's CPU/CUDA implementation instead of through
    ``torch.library``'s dispatch (0.05-0.2 ms a call, which a decoding step pays per layer
    and per step): an eager call on plain tensors that needs no autograd, with no compilation,
    functorch transform, or torch-function or dispatch mode active. Anything else (training,
    fake tensors, ``torch.compile``, op counters, tensor subclasses) goes through the op.
    ``nn.Parameter`` counts as plain (it overrides no torch function): a module's weights passed
    as they are, as GoatLinear and TwinLinear do at inference, take the direct call too."""
    if device.type not in ("cpu", "cuda") or _STATE_QUERIES is None:
        return False
    compiling, transforms, function_mode, dispatch_stack = _STATE_QUERIES
    if compiling() or transforms() or function_mode() or dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for t in args:
        if isinstance(t, torch.Tensor) and (
            type(t) not in _PLAIN_TYPES or (grad and t.requires_grad)
        ):
            return False
    return True


def call(op, impl, name: str, device: torch.device, args: tuple):
    """Run a custom op: ``impl(*args)``, its CPU/CUDA implementation, directly when
    :func:`plain_eager_call` allows it (inside a ``record_function(name)`` range while the
    PyTorch profiler runs, so that profiles still show the op by its name), else ``op(*args)``
    through ``torch.library``."""
    if not plain_eager_call(device, args):
        return op(*args)
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        with torch.profiler.record_function(name):
            return impl(*args)
    return impl(*args)
