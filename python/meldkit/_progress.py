"""Progress bars that suit where they are shown: tqdm's bar on a terminal or in a notebook, and
whole lines in a log file (a batch job's stderr), where a bar redrawn with carriage returns
becomes one line of megabytes."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm as _std_tqdm

# How often a log gets a line, in seconds (tqdm's TQDM_MININTERVAL, where set, decides), and
# tqdm's delay before a bar's first line (none at 0 %: shorter work writes only its last).
LOG_INTERVAL = 30.0
LOG_DELAY = 2.0


class _Discard:
    """A stream that drops what is written to it."""

    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


class LogLines(_std_tqdm):
    """tqdm that writes each refresh as a full line (no carriage returns, no cursor moves),
    and the final count once more when it closes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing the line: nothing to clear in a log
            return True
        text = self.__str__() if msg is None else msg
        self.fp.write(text.rstrip() + "\n")
        self.fp.flush()
        self._shown = self.n
        return True

    def clear(self, nolock: bool = False) -> None:
        pass

    def set_postfix(self, ordered_dict=None, refresh: bool = False, **kwargs) -> None:
        # Shown with the next line, not as a line of its own (tqdm's default redraws).
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        super().set_postfix_str(s, refresh=False)

    def moveto(self, n: int) -> None:
        pass

    def close(self) -> None:
        if self.disable:
            return
        if getattr(self, "_shown", None) != self.n:
            self._ema_dt = lambda: None  # the overall rate, as tqdm's last line shows it
            self.display()
        # tqdm's own close would redraw the line and end it with a newline or a return.
        fp, self.fp, self.leave = self.fp, _Discard(), False
        try:
            super().close()
        finally:
            self.fp = fp


def _in_notebook(cls: type) -> bool:
    """In a Jupyter/IPython kernel (with or without ipywidgets: without them tqdm.auto draws
    the plain bar, which the notebook redraws in place), or tqdm.auto picked its widget."""
    if any(c.__module__ == "tqdm.notebook" for c in cls.__mro__):
        return True
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    try:
        shell = get() if get is not None else None
        return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    except Exception:
        return False


def _log_interval() -> float:
    """Seconds between a log's lines: ``TQDM_MININTERVAL`` where set (read now: tqdm reads it
    only when it is imported), else :data:`LOG_INTERVAL`."""
    value = os.environ.get("TQDM_MININTERVAL")
    try:
        return float(value) if value is not None else LOG_INTERVAL
    except ValueError:
        return LOG_INTERVAL


def progress_bar(*, file: TextIO | None = None, **kwargs: Any) -> _std_tqdm:
    """A tqdm progress bar on ``file`` (default: stderr) with tqdm's ``kwargs`` (``total``,
    ``desc``, ``unit``, ...): tqdm.auto's on a terminal or in a notebook, or, where ``file`` is
    not a terminal (a log), :class:`LogLines`: a line every 30 seconds at most
    (``TQDM_MININTERVAL`` sets the interval) and one at the end (no 0 % line: work done in
    seconds gets one line)."""
    from tqdm.auto import tqdm as auto_tqdm

    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    if _in_notebook(auto_tqdm) or (isatty is not None and isatty()):
        return auto_tqdm(file=file, **kwargs)
    interval = kwargs.setdefault("mininterval", _log_interval())
    # tqdm's monitor thread refreshes a bar idle for maxinterval (10 s) whatever mininterval.
    kwargs.setdefault("maxinterval", max(float(interval), 10.0))
    # Work done within the first seconds gets one line, at the end, not a 0 % line too.
    kwargs.setdefault("delay", min(float(interval), LOG_DELAY))
    return LogLines(file=file, **kwargs)
