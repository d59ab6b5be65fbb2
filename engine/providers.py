"""Execution providers: CUDA when the installed onnxruntime offers it and a device answers."""

from __future__ import annotations

import ctypes
import functools
import os

import onnxruntime as ort

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


def default_providers() -> list[str]:
    forced = os.environ.get("ONNXPLAIN_PROVIDERS")
    if forced:
        return [p.strip() for p in forced.split(",") if p.strip()]
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
    threads = threads or int(os.environ.get("ONNXPLAIN_THREADS", "0"))
    if threads:
        so.intra_op_num_threads = threads
    return so
