"""Progress bars that suit where they are shown: tqdm's bar on a terminal or in a notebook, and
whole lines in a log file (a batch job's stderr), where a bar redrawn with carriage returns
becomes one line of megabytes."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm as _std_tqdm

# How often a log gets a line, in seconds (tqdm's TQDM_MININTERVAL, where set, decides).
LOG_INTERVAL = 30.0


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
    return any(c.__module__ == "tqdm.notebook" for c in cls.__mro__)


def progress_bar(*, file: TextIO | None = None, **kwargs: Any) -> _std_tqdm:
    """A tqdm progress bar on ``file`` (default: stderr) with tqdm's ``kwargs`` (``total``,
    ``desc``, ``unit``, ...): tqdm.auto's (a widget in a notebook, a bar on a terminal), or,
    where ``file`` is not a terminal (a log), :class:`LogLines`: a line every 30 seconds
    (``TQDM_MININTERVAL`` overrides) and one at the end."""
    from tqdm.auto import tqdm as auto_tqdm

    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    if _in_notebook(auto_tqdm) or (isatty is not None and isatty()):
        return auto_tqdm(file=file, **kwargs)
    if "TQDM_MININTERVAL" not in os.environ:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return LogLines(file=file, **kwargs)
