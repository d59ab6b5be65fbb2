"""Helpers shared by the benchmarks: work folder, the EfficientNet-Lite0 pair (ONNX file and torch
module seeing the same [0, 1] input), sample batches, timing, agreement and the result table."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_WORKDIR = os.path.join(tempfile.gettempdir(), "onnxplain-bench")
ONNX_NAME = "efficientnet_lite0.onnx"


def prepare_workdir(path: str | os.PathLike) -> Path:
    """Create the work folder and point the gradient-model cache into it, so a later run (or the
    other benchmark) reuses the compiled model instead of timing the compiler."""
    work = Path(path)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ONNXPLAIN_CACHE_DIR", str(work / "cache"))
    return work


def efficientnet_onnx(work: Path) -> Path:
    """The exported EfficientNet-Lite0 (normalisation in the graph, [0, 1] NCHW input), exported
    once per work folder."""
    from models.efficientnet import export_efficientnet_lite0

    path = work / ONNX_NAME
    if not path.exists():
        # export to a private name, then rename: another benchmark may be reading the same folder
        tmp = work / f".{os.getpid()}.{ONNX_NAME}"
        export_efficientnet_lite0(tmp)
        os.replace(tmp, path)
    return path


def torch_efficientnet(frozen: bool = True):
    """The same network for torch peers: [0, 1] NCHW input, normalisation inside, logits out.

    ``frozen``: parameters do not require gradients, so autograd computes only input gradients
    (the peers' fastest honest configuration). The AGI reference code leaves them trainable and
    calls ``loss.backward()``, which also fills the weight gradients: ``frozen=False``.
    """
    import torch

    from models.efficientnet import MEAN, STD, load_efficientnet_lite0

    class Normalised(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

        def forward(self, x):
            return self.net((x - self.mean) / self.std)

    model = Normalised(load_efficientnet_lite0()).eval()
    model.requires_grad_(not frozen)
    return model


def photo_batch(n: int) -> np.ndarray:
    """``n`` sample photos (N, 3, 224, 224) float32 in [0, 1]; the few bundled photos repeat."""
    from models.images import sample_images

    photos, _ = sample_images(size=224)
    reps = -(-n // len(photos))
    return np.ascontiguousarray(np.concatenate([photos] * reps)[:n], dtype=np.float32)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None):
    """(median wall seconds over ``repeats`` calls, the last result). ``warmup`` (default: ``fn``)
    runs once untimed first: session creation, gradient compilation, allocator growth."""
    (warmup or fn)()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours − reference| / max |reference|: agreement in units of the map's own scale."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {reference.shape}")
    scale = np.abs(reference).max()
    return float(np.abs(ours - reference).max() / scale) if scale > 0 else float("nan")


def relative_l2(ours: np.ndarray, reference: np.ndarray) -> float:
    """‖ours − reference‖₂ / ‖reference‖₂: unlike the max, not dominated by the few pixels where a
    ReLU6 kink or a sign(≈0) falls differently in float32 on the two runtimes."""
    diff = np.asarray(ours, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    norm = np.linalg.norm(np.asarray(reference, dtype=np.float64))
    return float(np.linalg.norm(diff) / norm) if norm > 0 else float("nan")


@dataclass
class Row:
    """One benchmark line: both timings, the target ratio and the agreement of the outputs."""

    name: str
    peer: str
    ours_s: float
    peer_s: float
    target: float
    rel_diff: float
    rel_l2: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours_s / self.peer_s

    @property
    def met(self) -> bool:
        return self.ratio <= self.target


def print_table(rows: list[Row]) -> None:
    header = f"{'method':22s} {'peer':30s} {'ours s':>9s} {'peer s':>9s} {'ratio':>7s} {'target':>8s}"
    print(header + f" {'met':>4s} {'max|d|/max|ref|':>16s} {'|d|/|ref|':>10s}")
    for r in rows:
        print(
            f"{r.name:22s} {r.peer:30s} {r.ours_s:9.3f} {r.peer_s:9.3f} {r.ratio:7.3f} "
            f"{'<= ' + format(r.target, 'g'):>8s} {'yes' if r.met else 'NO':>4s} "
            f"{r.rel_diff:16.2e} {r.rel_l2:10.2e}"
        )
    for r in rows:
        if r.note:
            print(f"{r.name}: {r.note}")
