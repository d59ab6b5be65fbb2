"""Execution providers: CUDA when the installed onnxruntime offers it and a device answers."""

from __future__ import annotations

import ctypes
import functools
import os
import re

import onnxruntime as ort

from .errors import InputError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@functools.lru_cache(maxsize=1)
def cuda_device_present() -> bool:
    """Ask the driver directly: onnxruntime-gpu lists CUDA even on machines without a GPU."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    return False


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def env_int(name: str, default: int, *, minimum: int = 0, sizes: bool = False) -> int:
    """An integer environment variable (``sizes``: with an optional K/M/G/T suffix, powers of 1024);
    a value that does not parse or is below ``minimum`` is an error naming the variable."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    found = _SIZE.match(raw) if sizes else re.match(r"^\s*(-?\d+)\s*$", raw)
    value = None
    if found:
        unit = (found.group(2) or "").lower()[:1] if sizes else ""
        value = int(found.group(1)) * _UNITS[unit]
    if value is None or value < minimum:
        what = "a byte count such as 2147483648 or 2G" if sizes else "an integer"
        raise InputError(f"environment variable {name}={raw[:40]!r} must be {what} >= {minimum}")
    return value


def check_providers(providers) -> list[str]:
    """Execution provider names, checked against what the installed onnxruntime offers."""
    if isinstance(providers, str):
        providers = [providers]
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    available = ort.get_available_providers()
    unknown = [p for p in names if p not in available]
    if unknown or not names:
        raise InputError(
            f"unknown execution provider(s) {unknown or names}; this onnxruntime offers {available}"
        )
    return list(names)


def default_providers() -> list[str]:
    forced = os.environ.get("ONNXPLAIN_PROVIDERS")
    if forced:
        try:
            return check_providers([p.strip() for p in forced.split(",") if p.strip()])
        except InputError as e:
            raise InputError(f"environment variable ONNXPLAIN_PROVIDERS: {e}") from None
    if CUDA in ort.get_available_providers() and cuda_device_present():
        return [CUDA, CPU]
    return [CPU]


# TF32 (on by default in onnxruntime's CUDA provider on Ampere and newer) rounds convolution
# inputs to 10 mantissa bits: the activation masks' power-of-two arithmetic, and gradients "to the
# last decimal", need full float32.
CUDA_OPTIONS = {"use_tf32": "0"}


def with_options(providers: list[str]) -> list:
    """The providers as onnxruntime takes them, CUDA with full-float32 options."""
    return [(p, dict(CUDA_OPTIONS)) if p == CUDA else p for p in providers]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads = threads or env_int("ONNXPLAIN_THREADS", 0, minimum=0)
    if threads:
        so.intra_op_num_threads = threads
    return so
