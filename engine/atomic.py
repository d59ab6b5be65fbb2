"""Safe output files: atomic writes with the user's permissions, and never over an input.

A write goes to a temporary file in the same folder, is flushed to disk, gets the mode a plain
``open(path, "w")`` would give it (0666 less the umask: ``mkstemp`` alone makes 0600), and is
renamed over the target: readers never see a half-written file and a failure leaves nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OverwriteError

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refuse_overwrite(
    output: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None],
    option: str = "-o",
    error: type[Exception] = OverwriteError,
) -> None:
    """Raise ``error`` when ``output`` is one of ``inputs`` (the same file: same device and inode,
    so hard links and symbolic links are caught too)."""
    out = Path(output)
    if not out.exists():
        return
    for item in inputs:
        if item is None:
            continue
        try:
            same = os.path.samefile(out, item)
        except OSError:
            continue
        if same:
            raise error(f"{option} {out} is the input file {item}; refusing to overwrite it")
