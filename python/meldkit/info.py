"""``meldkit.info()`` / ``python -m meldkit info``: what this build is and what it can run."""

from __future__ import annotations

import os
import platform
import sys
from typing import TextIO

import torch

from meldkit import _native
from meldkit._version import __version__


def collect() -> dict:
    """The facts :func:`info` prints, as a dict (JSON-serialisable)."""
    build = dict(_native._C.build_info()) if _native._C is not None else {}
    usable, why_not = _native.cuda_usable()
    try:
        backend, backend_error = _native.backend(), None
    except ValueError as exc:  # shown among the facts; every op call raises the same error
        backend, backend_error = os.environ.get("MELDKIT_BACKEND"), str(exc)
    gpu_name = None
    if usable and torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
    from meldkit.ops import NATIVE_OPS

    ops = {}
    for op in NATIVE_OPS:
        native = _native.native_dtypes(op)
        ops[op] = {
            "cpu": native.get("cpu", []),
            "cuda": native.get("cuda", []) if usable else [],
        }
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": _native.IMPORT_ERROR is None,
        "extension_error": _native.IMPORT_ERROR,
        "backend": backend,
        "backend_error": backend_error,
        "build": build,
        "gpu_usable": usable,
        "gpu_reason": None if usable else why_not,
        "gpu_name": gpu_name,
        "torch_sees_gpu": torch.cuda.is_available(),
        "ops": ops,
    }


def info(file: TextIO | None = None) -> dict:
    """Print meldkit's version, compiled backends, CUDA archs, GPU state, torch version, and which
    ops run natively on which device (and in which dtypes); return the same facts as a dict."""
    facts = collect()
    out = file or sys.stdout
    build = facts["build"]
    lines = [
        f"meldkit {facts['version']} (python {facts['python']}, torch {facts['torch']}"
        + (f", torch CUDA {facts['torch_cuda']})" if facts["torch_cuda"] else ", CPU-only torch)"),
    ]
    if not facts["extension"]:
        lines.append(f"compiled core: NOT AVAILABLE ({facts['extension_error']})")
        lines.append("  every op runs its pure-PyTorch reference")
    else:
        omp = f"OpenMP, {build['openmp_max_threads']} threads" if build["openmp"] else "no OpenMP"
        lines.append(f"compiled core: CPU ({omp}; {build['compiler']}; {build['build_type']})")
        if build.get("cpu_vectors"):
            lines.append(f"               CPU kernels run with {build['cpu_vectors']}")
        if build["cuda"]:
            lines.append(
                f"               CUDA {build['cuda_runtime']} (archs {build['cuda_archs']}, "
                "static cudart)"
            )
        else:
            lines.append("               CUDA: not compiled")
    if facts["gpu_usable"]:
        lines.append(f"GPU: usable ({facts['gpu_name'] or 'CUDA device'})")
    else:
        lines.append(f"GPU: none usable ({facts['gpu_reason']})")
    if facts["backend_error"] is None:
        lines.append(f"MELDKIT_BACKEND: {facts['backend']}")
    else:
        lines.append(
            f"MELDKIT_BACKEND: {facts['backend']!r} is INVALID (accepted: "
            f"{', '.join(_native.BACKENDS)}; unset means auto): every op raises until it is fixed"
        )
    lines.append("ops (native dtypes; anything else runs the reference):")
    for op, devices in facts["ops"].items():
        for dev, dtypes in devices.items():
            if dtypes:
                shown = ", ".join(dtypes)
            elif dev == "cuda" and not facts["torch_sees_gpu"]:
                shown = "n/a (no usable GPU)"  # no CUDA tensor to run anything on
            else:
                shown = "reference only"
            lines.append(f"  {op:<16} {dev:<5} {shown}")
    print("\n".join(lines), file=out)
    return facts
