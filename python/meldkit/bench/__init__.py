"""Benchmark harness: one timer, one bandwidth ceiling, one JSON row per (case, baseline).

Every op registered in :data:`OPS` has a case module (``meldkit.bench.<op>``) whose
``cases(device, quick)`` returns a list of :class:`Case`. For each case the harness times our
implementation and every baseline in the same run with the same timer, and measures the device's
memory-bandwidth ceiling (a large ``dst.copy_(src)``) once per device, so that a row says both how
we compare with what users write today (``ratio``) and how close we are to the hardware (``GB/s``
and its fraction of the ceiling).

Command line (``meldkit bench`` builds the same parser)::

    python -m meldkit.bench --op weighted_sum --device cpu --quick
    python -m meldkit.bench --device all --dtype bf16,fp16 --json results.jsonl

Programmatic use::

    rows = meldkit.bench.run_op("weighted_sum", device="cpu", quick=True)

Timing rules
------------
* Warm-up calls first (they also estimate how many repeats fit the time budget), then ``repeats``
  timed calls; rows report the median with the minimum and the inter-quartile range. A call that
  takes seconds (the argsort baselines at the issue's sizes take 5-50 s on 2 cores) is warmed
  up once and timed as often as fits :data:`_SLOW_BUDGET_S`, at least once, unless ``repeats``
  is given: its row says how many.
* Before every timed call the caches are flushed by writing a buffer twice the size of the
  last-level cache (L2 on CUDA, read from the device properties), so that every call reads its
  inputs from memory, as a call on tensors of this size does inside a real model.
* CPU calls are timed with :func:`time.perf_counter`; CUDA calls with CUDA events recorded on the
  current stream around the call, after a device synchronisation, and read after another.
* Inputs are random (never zeros), so data-dependent fast paths cannot flatter a kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# Ops whose benchmark is a script of its own (a whole pipeline's weights, not op cases).
_OWN_SCRIPTS = {"blend": "bench_exde.py (python bench/bench_exde.py --dtype bf16)"}

OPS: dict[str, str] = {
    "weighted_sum": "meldkit.bench.weighted_sum",
    "merge": "meldkit.bench.merge",
    "routed_lora": "meldkit.bench.routed_lora",
    "logit_fusion": "meldkit.bench.logit_fusion",
}
"""Registry of benchmarked ops: op name -> module providing ``cases(device, quick) -> list[Case]``.

Modules are imported only when their op is run, so a missing op cannot break the others."""

OURS = "meldkit"
"""Key of our implementation in the mapping returned by :attr:`Case.build`."""

REFERENCE = "meldkit_ref"
"""Key of the pure-PyTorch reference: also the yardstick for every impl's error column."""

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Short dtype names used in case names, rows and ``--dtype``."""

_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Default time spent in timed calls per impl and case; warm-up estimates how many repeats fit.
_TIME_BUDGET_S = 0.25
_MIN_REPEATS = 5
_MAX_REPEATS = 50
_DEFAULT_WARMUP = 2
# A call slower than this is warmed up once, and timed only as often as fits _SLOW_BUDGET_S (at
# least once) when the repeats are fitted: its run-to-run noise is small against its length, and
# five repeats of a 50 s baseline made the full CPU merge set take over half an hour.
_SLOW_CALL_S = 2.0
_SLOW_BUDGET_S = 10.0

# Bandwidth-ceiling copy: large enough to defeat every cache level, small enough for a laptop.
_CEILING_BYTES = {"cuda": 256 << 20, "cpu": 128 << 20}
# Fallback last-level cache sizes when the device does not report one.
_FALLBACK_CACHE_BYTES = {"cuda": 128 << 20, "cpu": 32 << 20}

Impl = Callable[[], torch.Tensor]
"""A zero-argument call of one implementation on inputs already allocated by :attr:`Case.build`."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration of one op.

    Attributes
    ----------
    op : str
        Op name, a key of :data:`OPS`.
    name : str
        Case name, unique within the op for a given dtype and device (e.g. ``"n8_4096x4096"``).
    shape : tuple of int
        Shape of each input tensor.
    n_inputs : int
        Number of input tensors.
    dtype : torch.dtype
        Storage dtype of the inputs.
    device : str
        ``"cpu"`` or ``"cuda"``.
    bytes_moved : int
        Bytes a perfect implementation moves: every input read once plus the output written once.
    build : callable
        Allocates random inputs on ``device`` and returns ``{impl name: Impl}``; the mapping holds
        :data:`OURS`, :data:`REFERENCE` and any other baselines. Called once per case, just before
        timing, so that only one case's inputs are alive at a time.
    """

    op: str
    name: str
    shape: tuple[int, ...]
    n_inputs: int
    dtype: torch.dtype
    device: str
    bytes_moved: int
    build: Callable[[], dict[str, Impl]]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Statistics of the timed calls of one implementation, in seconds."""

    median_s: float
    min_s: float
    iqr_s: float
    repeats: int


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a storage dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def parse_dtypes(values: Sequence[str] | None) -> list[torch.dtype] | None:
    """Parse ``--dtype`` values (repeated and/or comma-separated) into dtypes; None keeps all.

    Raises
    ------
    ValueError
        For a name that is neither a short name (``fp32``) nor a torch name (``float32``).
    """
    if not values:
        return None
    dtypes = []
    for name in (part.strip() for value in values for part in value.split(",")):
        if not name:
            continue
        short = _DTYPE_ALIASES.get(name, name)
        if short not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
        dtypes.append(DTYPES[short])
    return dtypes


def cache_flusher(device: str) -> Callable[[], None]:
    """Return a function that evicts the device's last-level cache.

    It writes a buffer twice the size of the L2 cache on CUDA (``L2_cache_size`` of the device
    properties) or of the last-level cache on the CPU (from sysfs). The write is an in-place add,
    not a memset: a large CPU memset uses non-temporal stores that bypass the cache and would evict
    nothing.
    """
    buffer = torch.empty(2 * _last_level_cache_bytes(device), dtype=torch.uint8, device=device)
    buffer.zero_()

    def flush() -> None:
        buffer.add_(1)

    return flush


def _last_level_cache_bytes(device: str) -> int:
    kind = torch.device(device).type
    if kind == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        size = getattr(props, "L2_cache_size", 0)
        return size or _FALLBACK_CACHE_BYTES["cuda"]
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * multiplier)
    return max(sizes, default=_FALLBACK_CACHE_BYTES["cpu"])


def time_impls(
    impls: dict[str, Impl],
    device: str,
    *,
    flush: Callable[[], None],
    warmup: int = _DEFAULT_WARMUP,
    repeats: int | None = None,
) -> dict[str, Timing]:
    """Time each ``fn()`` of ``impls`` on ``device``: warm-up, then interleaved timed calls.

    The timed calls go round-robin (every impl once per round, each after a cache flush), so that
    slow drifts of the machine (clock boost, other processes, allocator state) hit every impl
    alike instead of whichever happened to run during them.

    Parameters
    ----------
    impls : dict of str to callable
        Zero-argument calls to time; their results are discarded.
    device : str
        Device the calls run on; selects the clock (CUDA events or ``time.perf_counter``).
    flush : callable
        Cache flush run before every timed call (not timed), from :func:`cache_flusher`.
    warmup : int
        Untimed calls of each impl first (at least one, which also estimates its cost).
    repeats : int, optional
        Timed calls of each impl. Default: as many rounds as fit :data:`_TIME_BUDGET_S` per impl,
        between 5 and 50; an impl whose calls take over :data:`_SLOW_CALL_S` (warmed up once)
        takes part in as many of the first rounds as fit :data:`_SLOW_BUDGET_S`, at least one.

    Returns
    -------
    dict of str to Timing
        Median, minimum and inter-quartile range of each impl's timed calls, in seconds.
    """
    is_cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else _no_op
    warmup = max(1, warmup)
    estimates: dict[str, float] = {}
    for name, fn in impls.items():
        calls, elapsed = 0, 0.0
        while calls < warmup and not (calls and elapsed / calls > _SLOW_CALL_S):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            elapsed += time.perf_counter() - start
            calls += 1
        estimates[name] = elapsed / calls
    slow = {name for name, t in estimates.items() if t > _SLOW_CALL_S}
    counts = dict.fromkeys(impls, repeats)
    if repeats is None:
        fast_s = sum(t for name, t in estimates.items() if name not in slow)
        fits = int(_TIME_BUDGET_S * (len(impls) - len(slow)) / max(fast_s, 1e-9))
        repeats = min(_MAX_REPEATS, max(_MIN_REPEATS, fits))
        counts = {
            name: min(repeats, max(1, int(_SLOW_BUDGET_S / estimates[name])))
            if name in slow
            else repeats
            for name in impls
        }

    times: dict[str, list[float]] = {name: [] for name in impls}
    if is_cuda:
        events = {
            name: [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(repeats)
            ]
            for name in impls
        }
        for index in range(repeats):
            for name, fn in impls.items():
                if index >= counts[name]:
                    continue
                begin, end = events[name][index]
                # The flush is queued on the same stream before `begin`, so it is never inside
                # the measured interval, and it keeps the GPU busy while the call is launched.
                flush()
                begin.record()
                fn()
                end.record()
        torch.cuda.synchronize()
        for name, pairs in events.items():
            times[name] = [begin.elapsed_time(end) * 1e-3 for begin, end in pairs[: counts[name]]]
    else:
        for index in range(repeats):
            for name, fn in impls.items():
                if index >= counts[name]:
                    continue
                flush()
                begin_s = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - begin_s)
    return {name: _summarise(samples) for name, samples in times.items()}


def time_fn(
    fn: Impl,
    device: str,
    *,
    flush: Callable[[], None],
    warmup: int = _DEFAULT_WARMUP,
    repeats: int | None = None,
) -> Timing:
    """Time one call with :func:`time_impls` (same warm-up, flush, clock and statistics)."""
    return time_impls({"fn": fn}, device, flush=flush, warmup=warmup, repeats=repeats)["fn"]


def _summarise(samples: list[float]) -> Timing:
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return Timing(
        median_s=statistics.median(samples),
        min_s=min(samples),
        iqr_s=quartiles[2] - quartiles[0],
        repeats=len(samples),
    )


def _no_op() -> None:
    pass


def measure_ceiling(
    device: str,
    *,
    flush: Callable[[], None] | None = None,
    warmup: int = _DEFAULT_WARMUP,
    repeats: int | None = None,
) -> float:
    """Measure the memory-bandwidth ceiling of ``device`` in GB/s (1 GB = 1e9 bytes).

    Times ``dst.copy_(src)`` on a buffer of 256 MB (CUDA) or 128 MB (CPU) with :func:`time_fn` and
    returns ``(bytes read + bytes written) / median time``.
    """
    nbytes = _CEILING_BYTES[torch.device(device).type]
    src = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(
        lambda: dst.copy_(src),
        device,
        flush=flush or cache_flusher(device),
        warmup=warmup,
        repeats=repeats,
    )
    return 2 * nbytes / timing.median_s / 1e9


def device_name(device: str) -> str:
    """Human-readable name of ``device``: the GPU's name, or the CPU model and thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def run_metadata() -> dict[str, Any]:
    """Metadata added to every row: date, versions, commit (and whether the checkout has
    uncommitted changes), host and the ``MELDKIT_BACKEND`` mode."""
    from meldkit import _native

    try:
        # The version of the code actually imported, which may be a PYTHONPATH checkout that
        # differs from whatever distribution is installed.
        from meldkit._version import __version__ as meldkit_version
    except ImportError:
        meldkit_version = None
    commit, dirty = _git_commit()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "meldkit_version": meldkit_version,
        "git_commit": commit,
        "git_dirty": dirty,
        "host": platform.node(),
        "backend": _native.backend(),
    }


def ours_path(case: Case) -> tuple[str, list[str]]:
    """Which path our implementation takes in ``case``: ``("native", [])`` or
    ``("reference", reasons)``, from the same check the op makes before calling ``_C``.

    A row timed on the reference is not a measurement of the kernel; the table marks it.
    """
    from meldkit import _native

    reasons = _native.unavailable(case.op, torch.device(case.device), (case.dtype,))
    return ("reference", reasons) if reasons else ("native", [])


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    # Run from this file's folder: the checkout being measured, not whatever repository the
    # command was started in; None where git is missing or hangs.
    try:
        return subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> tuple[str | None, bool | None]:
    """Short commit of the meldkit checkout and whether tracked files differ from it.

    ``MELDKIT_COMMIT``, when set (by ``scripts/gpu_check.sh``'s caller), wins: a working tree
    copied to a GPU machine may sit in a stale repository, or in none (an installed wheel);
    cleanliness is then unknown (None).
    """
    if os.environ.get("MELDKIT_COMMIT"):
        return os.environ["MELDKIT_COMMIT"], None
    head = _git("rev-parse", "--short", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return os.environ.get("MELDKIT_COMMIT") or None, None
    diff = _git("diff", "--quiet", "HEAD", "--")
    dirty = None if diff is None or diff.returncode not in (0, 1) else diff.returncode == 1
    return head.stdout.strip(), dirty


def load_cases(op: str, device: str, quick: bool) -> list[Case]:
    """Import the case module of ``op`` and return its cases for ``device``.

    Raises
    ------
    ValueError
        If ``op`` is not registered in :data:`OPS`; the message lists the known ops.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
    module = importlib.import_module(OPS[op])
    return module.cases(device=device, quick=quick)


def run_op(
    name: str,
    device: str = "cpu",
    quick: bool = True,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    warmup: int = _DEFAULT_WARMUP,
    repeats: int | None = None,
    ceiling_gbps: float | None = None,
    progress: bool = True,
    on_case: Callable[[list[dict[str, Any]]], None] | None = None,
    cases: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every case of one op on one device.

    Parameters
    ----------
    name : str
        Op name, a key of :data:`OPS`.
    device : str
        ``"cpu"`` or ``"cuda"``.
    quick : bool
        Run the small cases (seconds on a laptop CPU) instead of the full set.
    dtypes : sequence of torch.dtype, optional
        Keep only cases of these dtypes.
    warmup, repeats : int
        Passed to :func:`time_impls`; ``repeats=None`` fits the repeats to a time budget.
    ceiling_gbps : float, optional
        Bandwidth ceiling of ``device`` already measured in this run; measured here if None.
    progress : bool
        Print one line per case to stderr, with ours and each baseline's ratio.
    on_case : callable, optional
        Called with each case's rows as soon as it is timed (``meldkit bench --json`` appends
        them to its file there, so that a long run that is stopped keeps its finished cases).
    cases : sequence of str, optional
        Keep only the cases whose name matches one of these shell-style patterns
        (:func:`fnmatch.fnmatchcase`, e.g. ``"dare_ties_*llama*"``; a pattern without
        wildcards must equal the name).

    Returns
    -------
    list of dict
        One row per (case, baseline); see :func:`make_rows` for the fields.
    """
    patterns = cases
    cases = load_cases(name, device, quick)
    if dtypes is not None:
        cases = [case for case in cases if case.dtype in dtypes]
    if patterns is not None:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    flush = cache_flusher(device)
    if ceiling_gbps is None:
        ceiling_gbps = measure_ceiling(device, flush=flush, warmup=warmup, repeats=repeats)
    metadata = run_metadata()
    metadata.update(device_name=device_name(device), ceiling_gbps=ceiling_gbps, quick=quick)

    rows: list[dict[str, Any]] = []
    for index, case in enumerate(cases, start=1):
        if progress:
            label = f"{case.op} {case.name} {dtype_name(case.dtype)} {case.device}"
            print(f"[{index}/{len(cases)}] {label} ...", end="", file=sys.stderr, flush=True)
        path, reasons = ours_path(case)
        impls = case.build()
        errors = relative_errors(impls)
        peaks = peak_extra_bytes(impls, device)
        timings = time_impls(impls, device, flush=flush, warmup=warmup, repeats=repeats)
        del impls  # free this case's inputs before the next case allocates its own
        case_metadata = {**metadata, "ours_path": path, "fallback_reasons": reasons}
        case_rows = make_rows(case, timings, errors, case_metadata, peaks)
        rows.extend(case_rows)
        if on_case is not None:
            on_case(case_rows)
        if progress:
            ours = format_seconds(timings[OURS].median_s)
            ratios = ", ".join(
                f"{name} {timings[name].median_s / timings[OURS].median_s:.1f}x"
                for name in timings
                if name not in (OURS, REFERENCE)
            )
            print(
                f" ours {ours} ({path}){'; ' + ratios if ratios else ''}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def relative_errors(impls: dict[str, Impl]) -> dict[str, float]:
    """Error of each impl against :data:`REFERENCE`: ``max|y - y_ref| / max|y_ref|`` in fp32.

    A wrong kernel is not worth timing; the error is reported next to each time so that a fast but
    wrong result, or a baseline that loses precision in low-precision storage, is visible.
    """
    # A copy: in ``out=`` cases every impl returns one buffer, which the next call overwrites.
    reference = impls[REFERENCE]().float().clone()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    errors = {}
    for impl, fn in impls.items():
        result = fn().float()
        errors[impl] = ((result - reference).abs().max() / scale).item()
    return errors


def peak_extra_bytes(impls: dict[str, Impl], device: str) -> dict[str, int | None]:
    """Peak memory each impl allocates beyond what is already allocated (its inputs), from one
    call: the CUDA caching allocator's high-water mark. None on the CPU, where PyTorch keeps no
    such count (``bench/bench_merge.py`` measures a whole merge's peak resident memory in a
    child process instead)."""
    if torch.device(device).type != "cuda":
        return {name: None for name in impls}
    peaks: dict[str, int | None] = {}
    for name, fn in impls.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peaks[name] = int(torch.cuda.max_memory_allocated() - before)
        del result
    return peaks


def make_rows(
    case: Case,
    timings: dict[str, Timing],
    errors: dict[str, float],
    metadata: dict[str, Any],
    peaks: dict[str, int | None] | None = None,
) -> list[dict[str, Any]]:
    """Build one JSON row per baseline of ``case``, comparing it with :data:`OURS`.

    Row fields: ``op, case, shape, n_inputs, dtype, device, device_name, impl, median_s, min_s,
    iqr_s, repeats, max_rel_err, baseline, baseline_median_s, baseline_min_s, baseline_iqr_s,
    baseline_max_rel_err, ratio`` (baseline median / our median: > 1 means we are faster),
    ``bytes_moved, gbps, baseline_gbps, ceiling_gbps, fraction_of_ceiling`` (ours),
    ``peak_extra_bytes, baseline_peak_extra_bytes`` (:func:`peak_extra_bytes`; None on the CPU),
    the run metadata of :func:`run_metadata`, and the keys ``metadata`` adds (``run_op`` adds
    ``device_name, ceiling_gbps, quick, ours_path, fallback_reasons``).
    """
    peaks = peaks or {}
    ours = timings[OURS]
    gbps = case.bytes_moved / ours.median_s / 1e9
    rows = []
    for baseline, timing in timings.items():
        if baseline == OURS:
            continue
        rows.append(
            {
                "op": case.op,
                "case": case.name,
                "shape": list(case.shape),
                "n_inputs": case.n_inputs,
                "dtype": dtype_name(case.dtype),
                "device": case.device,
                "device_name": metadata["device_name"],
                "impl": OURS,
                "median_s": ours.median_s,
                "min_s": ours.min_s,
                "iqr_s": ours.iqr_s,
                "repeats": ours.repeats,
                "max_rel_err": errors[OURS],
                "baseline": baseline,
                "baseline_median_s": timing.median_s,
                "baseline_min_s": timing.min_s,
                "baseline_iqr_s": timing.iqr_s,
                "baseline_max_rel_err": errors[baseline],
                "ratio": timing.median_s / ours.median_s,
                "bytes_moved": case.bytes_moved,
                "gbps": gbps,
                "baseline_gbps": case.bytes_moved / timing.median_s / 1e9,
                "ceiling_gbps": metadata["ceiling_gbps"],
                "fraction_of_ceiling": gbps / metadata["ceiling_gbps"],
                "peak_extra_bytes": peaks.get(OURS),
                "baseline_peak_extra_bytes": peaks.get(baseline),
                **{key: value for key, value in metadata.items() if key != "device_name"},
            }
        )
    return rows


def format_seconds(seconds: float) -> str:
    """Format a duration with a unit that keeps three significant digits (µs, ms or s)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Render rows as an aligned text table, one line per (case, baseline)."""
    header = (
        "op",
        "case",
        "dtype",
        "device",
        "ours",
        "baseline",
        "baseline time",
        "ratio",
        "GB/s",
        "% ceiling",
        "ours err",
    )
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["op"],
                row["case"],
                row["dtype"],
                row["device"],
                format_seconds(row["median_s"]) + ("" if row["ours_path"] == "native" else " *"),
                row["baseline"],
                format_seconds(row["baseline_median_s"]),
                f"{row['ratio']:.2f}x",
                f"{row['gbps']:.1f}",
                f"{100 * row['fraction_of_ceiling']:.0f}%",
                f"{row['max_rel_err']:.1e}",
            )
        )
    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
    # Text columns align left, numbers right, so that magnitudes line up.
    numeric = {4, 6, 7, 8, 9, 10}
    rendered = [
        " | ".join(
            cell.rjust(width) if col in numeric else cell.ljust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    rendered.insert(1, "-+-".join("-" * width for width in widths))
    fallbacks = dict.fromkeys(
        "; ".join(row["fallback_reasons"]) for row in rows if row["ours_path"] != "native"
    )
    rendered += [f"* ours ran the pure-PyTorch reference: {reasons}" for reasons in fallbacks]
    return "\n".join(rendered)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Render rows as the Markdown table of ``bench/RESULTS.md``, header included.

    Columns: date, device, commit, op, case, dtype, ours, baseline, baseline time, ratio, GB/s and
    % of ceiling; a commit with uncommitted changes is marked ``+dirty``.
    """
    lines = [
        "| date | device | commit | op | case | dtype | ours | baseline | baseline time | ratio "
        "| GB/s | % of ceiling |",
        "|---|---|---|---|---|---|--:|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        commit = row.get("git_commit") or "?"
        if row.get("git_dirty"):
            commit += "+dirty"
        ours = format_seconds(row["median_s"])
        if row.get("ours_path", "native") != "native":
            ours += " (reference)"
        cells = (
            row["date"][:10],
            f"{row['device']}: {row['device_name']}",
            commit,
            row["op"],
            row["case"],
            row["dtype"],
            ours,
            row["baseline"],
            format_seconds(row["baseline_median_s"]),
            f"{row['ratio']:.2f}x",
            f"{row['gbps']:.1f}",
            f"{100 * row['fraction_of_ceiling']:.0f}%",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_rows(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Append rows to a JSON Lines file atomically.

    The existing lines and the new ones are written to a temporary file in the same folder, which
    then replaces ``path`` with :func:`os.replace`: a reader never sees a half-written file, and an
    interrupted run leaves the previous results intact.
    """
    path = Path(path)
    previous = path.read_text() if path.exists() else ""
    if previous and not previous.endswith("\n"):
        previous += "\n"
    text = previous + "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark options to ``parser`` (shared by ``meldkit bench`` and ``-m``)."""
    parser.add_argument(
        "--op",
        action="append",
        metavar="NAME",
        help=f"op to benchmark, repeatable or comma-separated (default: all of {', '.join(OPS)})",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "all"),
        default=None,
        help="device to run on (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        help=f"keep only these dtypes, repeatable or comma-separated ({', '.join(DTYPES)})",
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="PATTERN",
        help="keep only cases whose name matches, shell-style, repeatable or comma-separated "
        "(e.g. 'ties_n8_*,*llama*'; the progress lines name the cases)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small cases only (seconds on a laptop CPU)"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="append one JSON row per (case, baseline) to PATH"
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="also print the rows as the Markdown table of bench/RESULTS.md",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help=f"timed calls per impl (default: fit {_TIME_BUDGET_S} s, "
        f"{_MIN_REPEATS} to {_MAX_REPEATS})",
    )
    parser.add_argument(
        "--warmup",
        type=_positive_int,
        default=_DEFAULT_WARMUP,
        help=f"untimed calls per impl before timing (default: {_DEFAULT_WARMUP})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _resolve_devices(choice: str | None) -> list[str]:
    cuda = torch.cuda.is_available()
    if choice is None:
        return ["cuda" if cuda else "cpu"]
    if choice == "all":
        return ["cpu", "cuda"] if cuda else ["cpu"]
    if choice == "cuda" and not cuda:
        raise ValueError("--device cuda: torch sees no CUDA device")
    return [choice]


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks selected by parsed ``args``; print the table and write JSON.

    Returns
    -------
    int
        Exit code: 0 on success, 1 if an op failed while running, 2 for bad arguments.
    """
    try:
        ops = [op.strip() for value in args.op or [",".join(OPS)] for op in value.split(",")]
        ops = [op for op in ops if op]
        unknown = [op for op in ops if op not in OPS]
        if unknown:
            elsewhere = [
                f"; {op} is measured by bench/{_OWN_SCRIPTS[op]} in the source tree"
                for op in unknown
                if op in _OWN_SCRIPTS
            ]
            raise ValueError(
                f"unknown op {', '.join(unknown)}; known ops: {', '.join(OPS)}" + "".join(elsewhere)
            )
        devices = _resolve_devices(args.device)
        dtypes = parse_dtypes(args.dtype)
        patterns = None
        if args.case:
            patterns = [p.strip() for value in args.case for p in value.split(",") if p.strip()]
        from meldkit import _native

        _native.backend()  # an invalid MELDKIT_BACKEND: one line now, not a traceback later
    except ValueError as error:
        print(f"meldkit bench: error: {error}", file=sys.stderr)
        return 2
    # Checked before anything is measured: a --case typo must not cost the ceiling's seconds.
    available = {(op, d): load_cases(op, d, args.quick) for d in devices for op in ops}
    selected = [
        c
        for found in available.values()
        for c in found
        if (dtypes is None or c.dtype in dtypes)
        and (patterns is None or any(fnmatch.fnmatchcase(c.name, p) for p in patterns))
    ]
    if not selected:
        names: dict[str, dict[str, list[str]]] = {}
        for (op, _), found in available.items():
            for c in found:
                names.setdefault(op, {}).setdefault(c.name, [])
                if dtype_name(c.dtype) not in names[op][c.name]:
                    names[op][c.name].append(dtype_name(c.dtype))
        listing = "; ".join(
            f"{op}: " + ", ".join(f"{n} ({'/'.join(d)})" for n, d in by_name.items())
            for op, by_name in names.items()
        )
        size = "--quick set" if args.quick else "full set (--quick has fewer, smaller ones)"
        print(
            "meldkit bench: no case matches the selected ops, dtypes and cases; the cases of "
            f"the {size} are: {listing or 'none'}",
            file=sys.stderr,
        )
        return 2 if patterns else 0  # a --case that selects nothing is a typo
    if args.device == "all" and devices == ["cpu"]:
        print("meldkit bench: no CUDA device, running on cpu only", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    status = 0

    def save(case_rows: list[dict[str, Any]]) -> None:  # each case as it finishes
        if args.json:
            write_rows(args.json, case_rows)

    for device in devices:
        ceiling = measure_ceiling(device, warmup=args.warmup, repeats=args.repeats)
        print(f"{device}: copy ceiling {ceiling:.1f} GB/s ({device_name(device)})", file=sys.stderr)
        for op in ops:
            try:
                rows += run_op(
                    op,
                    device,
                    args.quick,
                    dtypes=dtypes,
                    warmup=args.warmup,
                    repeats=args.repeats,
                    ceiling_gbps=ceiling,
                    on_case=save,
                    cases=patterns,
                )
            except Exception as error:  # report and go on: one broken op must not hide the rest
                print(f"\nmeldkit bench: {op} on {device} failed: {error!r}", file=sys.stderr)
                status = 1
    if rows:
        print(format_table(rows))
        print(
            "ratio = baseline time / ours (> 1: meldkit is faster); GB/s and % ceiling are ours,"
            " against a device copy measured in this run."
        )
    if args.markdown and rows:
        print()
        print(format_markdown(rows))
    if args.json and rows:
        print(f"wrote {len(rows)} rows to {args.json}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m meldkit.bench``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m meldkit.bench",
        description="Time meldkit ops against their baselines in the same run.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = [
    "DTYPES",
    "OPS",
    "OURS",
    "REFERENCE",
    "Case",
    "Impl",
    "Timing",
    "add_arguments",
    "cache_flusher",
    "device_name",
    "dtype_name",
    "format_markdown",
    "format_seconds",
    "format_table",
    "load_cases",
    "main",
    "make_rows",
    "measure_ceiling",
    "ours_path",
    "parse_dtypes",
    "relative_errors",
    "run",
    "run_metadata",
    "run_op",
    "time_fn",
    "time_impls",
    "write_rows",
]
