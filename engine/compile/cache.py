"""Content-addressed cache of compiled gradient models.

Key: the model's sha256, the compile options and every tool version that shapes the graph.
Writes are atomic (temporary file + rename) and serialised by one file lock per cache folder, so
two processes never build the same model twice or read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
import platformdirs
from filelock import FileLock

from .. import __version__
from ..atomic import atomic_write_bytes
from ..modelfile import ModelFile
from . import COMPILER_VERSION, builder, compile_model

ENV_VAR = "ONNXPLAIN_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or platformdirs.user_cache_dir("onnxplain")) / "gradients"


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


def cached_gradient_model(mf: ModelFile, rule: str = "gradient", layer: str | None = None) -> Path:
    """Path of the compiled gradient model, building it on a miss."""
    folder = cache_dir()
    path = folder / f"{cache_key(mf, rule, layer)}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if not path.is_file():  # another process may have built it while we waited
            model, _ = compile_model(mf, rule=rule, layer=layer)
            atomic_write_bytes(path, model.SerializeToString())
    return path
