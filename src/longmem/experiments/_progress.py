"""A small live progress bar (no tqdm dependency).

On a terminal it redraws one line in place at most ~10 times a second; elsewhere (a log file, a
pipe, a test) it prints a plain line at every tenth of the run, so logs stay short.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.4 -> '1:15'``, ``3725 -> '1:02:05'``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """``[label] |#####-----| 120/300  40%  loss 2.310  12.3 it/s  ETA 0:15``.

    Args:
        label: shown first (the run's name).
        total: number of steps of the whole run.
        start: steps already done (a resumed run).
        stream: where to draw (stderr by default).
        enabled: ``False`` draws nothing at all (``--quiet``).
        width: characters of the bar itself.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        start: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        width: int = 24,
    ) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.n = int(start)
        self._start_n = int(start)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self._last_printed_n = -1
        self.postfix = ""
        if self.enabled:
            self._draw(force=True)

    def update(self, n: int, postfix: str = "") -> None:
        """Set the number of finished steps to ``n``, with an optional ``postfix`` (e.g. the loss)."""
        self.n = n
        if postfix:
            self.postfix = postfix
        if self.enabled:
            self._draw()

    def close(self, note: str = "") -> None:
        """Draw the final state and end the line; ``note`` (e.g. 'interrupted') is appended."""
        if not self.enabled:
            return
        if note:
            self.postfix = f"{self.postfix}  {note}".strip()
        elif not self.tty and self.n == self._last_printed_n:
            return  # the last plain line already shows the final state
        self._draw(force=True, final=True)

    # ------------------------------------------------------------------------------------------------
    def _line(self) -> str:
        frac = min(self.n / self.total, 1.0)
        filled = round(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self._t0
        done_here = self.n - self._start_n
        rate = done_here / elapsed if elapsed > 0 and done_here > 0 else float("nan")
        eta = (self.total - self.n) / rate if rate == rate and rate > 0 else float("nan")
        rate_s = f"{rate:5.1f} it/s" if rate == rate else "   - it/s"
        return (
            f"[{self.label}] |{bar}| {self.n}/{self.total} {100 * frac:3.0f}%  {self.postfix}  "
            f"{rate_s}  {format_duration(elapsed)} elapsed, ETA {format_duration(eta)}"
        )

    def _draw(self, *, force: bool = False, final: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            if not force and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            self.stream.write("\r\x1b[2K" + self._line() + ("\n" if final else ""))
            self.stream.flush()
            return
        decile = int(10 * self.n / self.total)
        if force or decile > self._last_decile:
            self._last_decile = decile
            self._last_printed_n = self.n
            self.stream.write(self._line() + "\n")
            self.stream.flush()
