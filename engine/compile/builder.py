"""The builder interpreter: a separate venv holding onnxruntime-training-cpu 1.19.2.

onnxruntime-training installs a module named ``onnxruntime`` and must never share an environment
with onnxruntime(-gpu), so the engine talks to it through a subprocess running builder_worker.py.
``onnxplain builder install`` creates the venv in the user's data directory;
ONNXPLAIN_BUILDER_PYTHON points at another interpreter; ONNXPLAIN_BUILDER_TIMEOUT bounds one request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import platformdirs
from filelock import FileLock

from ..errors import BuilderError
from ..providers import env_int
from ..text import printable

BUILDER_REQUIREMENTS = ["onnxruntime-training-cpu==1.19.2", "numpy<2.3"]
ENV_VAR = "ONNXPLAIN_BUILDER_PYTHON"
WORKER = Path(__file__).with_name("builder_worker.py")
TIMEOUT_VAR = "ONNXPLAIN_BUILDER_TIMEOUT"
DEFAULT_TIMEOUT = 600  # seconds for one request: building EfficientNet's graph takes ~20 s here


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


def _marker(root: Path) -> Path:
    return root / ".onnxplain-requirements"


def _complete(root: Path) -> bool:
    """A venv this module made and finished (the marker is written last, after the import check)."""
    try:
        return _venv_python(root).exists() and _marker(root).read_text() == "\n".join(BUILDER_REQUIREMENTS)
    except OSError:
        return False


def install(root: Path | None = None, quiet: bool = True, force: bool = False) -> Path:
    """Create the builder venv; quick when a complete one is already there.

    The venv is built in a temporary sibling folder and renamed into place only after its
    interpreter imports onnxruntime-training's GradientGraphBuilder and answers, so a failed or
    killed install never leaves a half-made builder behind. A folder that is not a complete
    onnxplain builder is replaced only with ``force`` (``onnxplain builder install --force``).
    """
    root = Path(root) if root else default_venv()
    if _complete(root) and not force:
        return _venv_python(root)
    if root.exists() and not force:
        raise BuilderError(
            f"{root} exists but is not a complete onnxplain builder (a half-made or foreign folder); "
            "run `onnxplain builder install --force` to replace it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        staging = root.parent / f".{root.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            venv.EnvBuilder(with_pip=True).create(staging)
            py = _venv_python(staging)
            cmd = [str(py), "-m", "pip", "install", *(["-q"] if quiet else []), *BUILDER_REQUIREMENTS]
            done = subprocess.run(cmd)
            if done.returncode != 0:
                raise BuilderError(
                    f"pip could not install {' '.join(BUILDER_REQUIREMENTS)} (exit {done.returncode})"
                )
            call({"op": "version"}, python=py)  # imports the training build, or raises
            _marker(staging).write_text("\n".join(BUILDER_REQUIREMENTS))
            # Swap: the old folder moves aside first, so `root` is always absent or complete.
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            if root.exists() or root.is_symlink():
                os.replace(root, old)
            os.replace(staging, root)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    # The venv's interpreter finds its prefix from pyvenv.cfg next to it, so the renamed venv
    # works; only console scripts keep the staging path in their shebang, and none is used.
    return _venv_python(root)


def _timeout() -> int:
    return env_int(TIMEOUT_VAR, DEFAULT_TIMEOUT, minimum=1)


def call(request: dict, timeout: float | None = None, python: Path | None = None) -> dict:
    """Run one worker request in the builder interpreter and return its JSON answer.

    Every way the interpreter can fail (missing, crashes, hangs past ONNXPLAIN_BUILDER_TIMEOUT
    seconds, prints something that is not an answer) becomes a BuilderError that says what to do.
    """
    py = python or builder_python()
    timeout = _timeout() if timeout is None else timeout
    fix = f"if the builder is broken, run `onnxplain builder install --force` (or fix {ENV_VAR})"
    try:
        proc = subprocess.run(
            [str(py), str(WORKER)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env={**os.environ, "PYTHONNOUSERSITE": "1"},
        )
    except subprocess.TimeoutExpired as e:
        raise BuilderError(
            f"builder {py} did not answer within {timeout} s ({request.get('op')} "
            f"{request.get('model', '')}); raise {TIMEOUT_VAR} or {fix}"
        ) from e
    except OSError as e:
        raise BuilderError(f"builder interpreter {py} cannot be started ({e}); {fix}") from e
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = proc.stderr.strip().splitlines()[-5:]
        raise BuilderError(
            f"builder interpreter {py} exited with {proc.returncode}: {printable(' | '.join(tail))}; {fix}"
        )
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise BuilderError(
            f"builder interpreter {py} answered something that is not a worker answer: "
            f"{printable(proc.stdout.strip()[:200])!s}; {fix}"
        )
    if not answer["ok"]:
        error = str(answer.get("error", "unknown builder error"))
        if request.get("op") == "version":
            error += f"; {py} is not a Python with {BUILDER_REQUIREMENTS[0]}: {fix}"
        raise BuilderError(printable(error))
    return answer


def version() -> str:
    return call({"op": "version"})["onnxruntime"]


if __name__ == "__main__":  # python -m engine.compile.builder: install into the default location
    print(install(quiet=False), file=sys.stderr)
