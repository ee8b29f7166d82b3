"""Progress of the long commands (train, generate, eval, cache-teacher, bench), with an ETA.

On a terminal, a tqdm bar (count, rate, elapsed and remaining time, and the last figures given,
such as the loss). Without one (output to a log file, a job scheduler, a pipe) a bar would be
a stream of carriage returns, so a plain line is written instead every `every` seconds and at the
end, with the same figures. Everything goes to stderr: stdout stays clean for piping.

    >>> import io
    >>> log = io.StringIO()
    >>> with Progress(total=4, desc="demo", unit="batch", file=log, every=0) as p:
    ...     for _ in range(4):
    ...         p.update(1, loss=0.5)
    >>> log.getvalue().splitlines()[-1].split(",")[0]
    'demo: 4/4 batches (100%)'
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '2h03m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of one loop of `total` units, started at `initial` (a resumed run).

    enabled=False shows nothing (a worker process, or the user turned it off); update() is then
    free, so callers need no second code path.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0, file: IO[str] | None = None,
                 every: float = 30.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, every
        self.done = self.start = int(initial)
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last_line = time.monotonic()
        self._bar = None
        if enabled and getattr(self.file, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, file=self.file,
                             dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """`n` more units done; `postfix` (e.g. loss=...) is shown with the count."""
        if not self.enabled:
            return
        self.done += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif time.monotonic() - self.last_line >= self.every or self.done >= self.total:
            self._line()

    def line(self) -> str:
        """The progress as one line: count, share, elapsed and remaining time, postfix."""
        elapsed = time.monotonic() - self.t0
        unit = self.unit if self.total == 1 or self.unit.endswith("s") else (
            self.unit + ("es" if self.unit.endswith(("ch", "sh", "x")) else "s"))
        text = f"{self.desc}: {self.done}/{self.total} {unit} ({100 * self.done // max(self.total, 1)}%)"
        text += f", {format_duration(elapsed)} elapsed"
        new = self.done - self.start
        if 0 < new and self.done < self.total:
            text += f", ETA {format_duration(elapsed / new * (self.total - self.done))}"
        if self.postfix:
            text += ", " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        return text

    def _line(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done < self.total and self.done > self.start:
            self._line()  # stopped early (an error, a kill): say where

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
