"""Shared fixtures: zoo models exported once per test session.

``zoo_onnx(name)`` returns the path of the parity-checked ONNX export of ``models.zoo.ZOO[name]``
(seed 0), exporting it on first use; every test that needs a zoo model file shares it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than 20 s on one CPU core")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_onnx(zoo_dir: Path) -> Callable[[str], Path]:
    """``zoo_onnx(name) -> Path`` of ``zoo_dir/name.onnx``, exported on first request."""
    from models.zoo import export_zoo_model

    exported: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in exported:
            exported[name] = export_zoo_model(name, zoo_dir)
        return exported[name]

    return get


# Compiled gradient models go to a per-run cache, so tests never see a stale user cache.
os.environ.setdefault("ONNXPLAIN_CACHE_DIR", tempfile.mkdtemp(prefix="onnxplain-test-cache-"))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder for tests that check what is (not) written."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ONNXPLAIN_CACHE_DIR", str(folder))
    return folder
