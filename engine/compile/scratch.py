"""Scratch folders for the compiler (builder input/output, self-check, constant folding).

They live under the cache root, named after the process that made them, so the next run can
remove what a killed compile left behind (``clean_stale``) without touching a live one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import platformdirs

ENV_VAR = "ONNXPLAIN_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or platformdirs.user_cache_dir("onnxplain"))


def scratch_root() -> Path:
    return cache_root() / "scratch"


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder, removed on exit (also on error); named ``{prefix}{pid}-{random}``."""
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale() -> list[Path]:
    """Remove scratch folders whose process is gone; returns what was removed."""
    removed = []
    root = scratch_root()
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        # "{prefix}{pid}-{random}": mkdtemp's random part holds no "-"
        head = entry.name.rsplit("-", 1)[0]
        digits = head.rsplit("-", 1)[-1]
        pid = int(digits) if digits.isdigit() else None
        if pid is None or not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
