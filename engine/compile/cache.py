"""Content-addressed cache of compiled gradient models.

Key: the model's content digest (``ModelFile.sha256``: the .onnx bytes and every external-data
byte it reads), the compile options and every tool version that shapes the graph. Each entry is
``KEY.onnx`` plus ``KEY.json`` (its sha256, size and what it was compiled from); an entry is
verified on every read, and one that is corrupt or truncated is rebuilt, never served.
Writes are atomic (temporary file + rename) and serialised by one file lock per cache folder, so
two processes never build the same model twice or read a half-written file. Under the lock,
what a killed compile left (temporary files, entries without their record, scratch folders of
dead processes) is removed. The folder is capped (ONNXPLAIN_CACHE_MAX_BYTES, default 4 GiB):
least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from filelock import FileLock

from .. import __version__
from ..atomic import TEMP_SUFFIX, atomic_write_bytes
from ..errors import CacheError
from ..modelfile import ModelFile
from ..providers import env_int
from . import COMPILER_VERSION, builder, compile_model
from .scratch import ENV_VAR, cache_root, clean_stale

DEFAULT_MAX_BYTES = 4 * 1024**3
MAX_BYTES_VAR = "ONNXPLAIN_CACHE_MAX_BYTES"
__all__ = ["ENV_VAR", "cache_dir", "cached_gradient_model", "entries", "clear"]


def cache_dir() -> Path:
    return cache_root() / "gradients"


def cache_key(mf: ModelFile, rule: str, layer: str | None) -> str:
    parts = {
        "model": mf.sha256,
        "rule": rule,
        "layer": layer,
        "compiler": COMPILER_VERSION,
        "onnxplain": __version__,
        "builder": builder.BUILDER_REQUIREMENTS,
        "onnx": onnx.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Entry:
    key: str
    bytes: int
    last_used: float
    record: dict


def _record_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def _valid(path: Path) -> bool:
    """The entry's bytes match its record (size, then sha256)."""
    try:
        record = json.loads(_record_path(path).read_text())
        if path.stat().st_size != record["bytes"]:
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_gradient_model(mf: ModelFile, rule: str = "gradient", layer: str | None = None) -> bytes:
    """The compiled gradient model's bytes, verified, building it on a miss."""
    folder = cache_dir()
    path = folder / f"{cache_key(mf, rule, layer)}.onnx"
    data = _read_verified(path)
    if data is not None:
        return data
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".lock"))
        lock.acquire()
    except OSError as e:
        raise CacheError(
            f"gradient cache {folder} is not usable ({e}); set {ENV_VAR} to a writable folder"
        ) from e
    try:
        _clean(folder)
        data = _read_verified(path)  # another process may have built it while we waited
        if data is None:
            model, info = compile_model(mf, rule=rule, layer=layer)
            data = model.SerializeToString()
            record = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "source": mf.where,
                "source_sha256": mf.sha256,
                "rule": rule,
                "layer": layer,
                "created": time.time(),
            }
            atomic_write_bytes(path, data)  # the model first: a record always has its model
            atomic_write_bytes(_record_path(path), json.dumps(record).encode())
            _evict(folder, keep=path)
    finally:
        lock.release()
    return data


def _read_verified(path: Path) -> bytes | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(_record_path(path).read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or len(data) != record.get("bytes")
        or (hashlib.sha256(data).hexdigest() != record.get("sha256"))
    ):
        return None  # corrupt or truncated: rebuilt under the lock
    try:
        os.utime(_record_path(path))  # least-recently-used bookkeeping
    except OSError:
        pass
    return data


def _clean(folder: Path) -> None:
    """Under the lock: nobody else is writing, so every temporary file is a leftover."""
    for p in folder.glob(f".*{TEMP_SUFFIX}"):
        p.unlink(missing_ok=True)
    for p in folder.glob("*.onnx"):
        if not _valid(p):
            p.unlink(missing_ok=True)
            _record_path(p).unlink(missing_ok=True)
    for r in folder.glob("*.json"):
        if not r.with_suffix(".onnx").exists():
            r.unlink(missing_ok=True)
    clean_stale()


def entries() -> list[Entry]:
    """Cache entries, most recently used first."""
    folder = cache_dir()
    found = []
    for p in folder.glob("*.onnx") if folder.is_dir() else []:
        r = _record_path(p)
        try:
            record = json.loads(r.read_text())
            found.append(Entry(p.stem, p.stat().st_size, r.stat().st_mtime, record))
        except (OSError, ValueError):
            found.append(Entry(p.stem, p.stat().st_size, p.stat().st_mtime, {"status": "no valid record"}))
    return sorted(found, key=lambda e: -e.last_used)


def _evict(folder: Path, keep: Path) -> None:
    cap = env_int(MAX_BYTES_VAR, DEFAULT_MAX_BYTES, minimum=0, sizes=True)
    total = sum(e.bytes for e in entries())
    for e in reversed(entries()):  # least recently used first
        if total <= cap:
            break
        p = folder / f"{e.key}.onnx"
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        _record_path(p).unlink(missing_ok=True)
        total -= e.bytes


def clear() -> int:
    """Remove every entry and leftover; returns the number of entries removed."""
    folder = cache_dir()
    if not folder.is_dir():
        return 0
    with FileLock(str(folder / ".lock")):
        count = 0
        for p in folder.glob("*.onnx"):
            p.unlink(missing_ok=True)
            count += 1
        for p in list(folder.glob("*.json")) + list(folder.glob(f".*{TEMP_SUFFIX}")):
            p.unlink(missing_ok=True)
        clean_stale()
    return count
