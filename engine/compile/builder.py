"""The builder interpreter: a separate venv holding onnxruntime-training-cpu 1.19.2.

onnxruntime-training installs a module named ``onnxruntime`` and must never share an environment
with onnxruntime(-gpu), so the engine talks to it through a subprocess running builder_worker.py.
``onnxplain builder install`` creates the venv in the user's data directory;
ONNXPLAIN_BUILDER_PYTHON points at another interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import platformdirs

from ..errors import BuilderError

BUILDER_REQUIREMENTS = ["onnxruntime-training-cpu==1.19.2", "numpy<2.3"]
ENV_VAR = "ONNXPLAIN_BUILDER_PYTHON"
WORKER = Path(__file__).with_name("builder_worker.py")


def default_venv() -> Path:
    return Path(platformdirs.user_data_dir("onnxplain")) / "builder-venv"


def _venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def builder_python() -> Path:
    """The interpreter to build with: $ONNXPLAIN_BUILDER_PYTHON, else the default venv."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise BuilderError(
                f"{ENV_VAR}={explicit} does not exist; unset it or point it at a "
                "Python with onnxruntime-training-cpu==1.19.2"
            )
        return path
    path = _venv_python(default_venv())
    if not path.exists():
        raise BuilderError(
            f"no builder interpreter at {path}. Run `onnxplain builder install` (creates a venv with "
            f"{BUILDER_REQUIREMENTS[0]}), set {ENV_VAR}, or pass a precompiled gradient model "
            "(engine.load(model, gradient_model=...))"
        )
    return path


def install(root: Path | None = None, quiet: bool = True) -> Path:
    """Create (or refresh) the builder venv; idempotent and quick when it is already there."""
    root = Path(root) if root else default_venv()
    py = _venv_python(root)
    marker = root / ".onnxplain-requirements"
    wanted = "\n".join(BUILDER_REQUIREMENTS)
    if py.exists() and marker.exists() and marker.read_text() == wanted:
        return py
    root.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=not py.exists()).create(root)
    cmd = [str(py), "-m", "pip", "install", *(["-q"] if quiet else []), *BUILDER_REQUIREMENTS]
    subprocess.run(cmd, check=True)
    marker.write_text(wanted)
    return py


def call(request: dict, timeout: float = 600) -> dict:
    """Run one worker request in the builder interpreter and return its JSON answer."""
    py = builder_python()
    try:
        proc = subprocess.run(
            [str(py), str(WORKER)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONNOUSERSITE": "1"},
        )
    except subprocess.TimeoutExpired as e:
        raise BuilderError(f"builder timed out after {timeout} s on {request.get('model')}") from e
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = proc.stderr.strip().splitlines()[-5:]
        raise BuilderError(f"builder interpreter {py} exited with {proc.returncode}: " + " | ".join(tail))
    answer = json.loads(proc.stdout)
    if not answer.get("ok"):
        raise BuilderError(answer.get("error", "unknown builder error"))
    return answer


def version() -> str:
    return call({"op": "version"})["onnxruntime"]


if __name__ == "__main__":  # python -m engine.compile.builder: install into the default location
    print(install(quiet=False), file=sys.stderr)
