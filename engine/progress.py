"""Progress bars on stderr for the long steps of the command line: drawn only on a terminal.

``bar = ProgressBar()`` then ``bar(step, done, total)``: one line redrawn in place
(``onnxplain: integrated_gradients [#######.......] 3/8 12 s``) and ended when ``done == total``.
Where stderr is not a terminal (a log file, CI, a pipe) nothing is written, so logs hold only
results and errors.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .text import printable


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self.start = time.monotonic()
        self._open = False

    def __call__(self, step: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        text = f"onnxplain: {printable(step)}"
        if total:
            filled = int(self.width * min(max(done or 0, 0), total) / total)
            text += f" [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
        text += f" {elapsed:.0f} s"
        self.stream.write("\r\x1b[K" + text)
        self._open = True
        if total and done is not None and done >= total:
            self.close()
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
