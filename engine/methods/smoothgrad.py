"""SmoothGrad: average a method's maps over noisy copies of the input (Smilkov et al. 2017;
spec methods.md §3, PAIR ``GetSmoothedMask``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.methods.common import Target, prepare
from engine.methods.stream import chunk_rows
from engine.perturb import channel_first
from engine.protocol import ClassifierLike

NOISE_RANGES = ("image", "input_range")
# Bases whose ``seed`` draws values row by row (a "uniform" baseline, SmoothGrad's own noise): fed
# chunk by chunk, they must continue one generator to draw what one call on all copies would.
# (AGI's seed draws one class permutation per call, the same for every chunk: it keeps the int.)
ROW_SEEDED = ("integrated_gradients", "guided_ig", "smoothgrad")
# Bases whose map of a row depends only on that row (and the seed as above), so SmoothGrad may
# feed them chunks of copies. The mask and perturbation methods draw per call or per image index
# (RISE's masks with its baseline, I-GOS's per-image noise streams, XRAI's baselines): they get all
# N × samples copies in one call, as before, and stream inside themselves.
CHUNKED_BASES = (
    "saliency", "gradient_x_input", "integrated_gradients", "blur_ig", "guided_ig", "agi",
    "guided_backprop", "deconvnet", "grad_cam", "smoothgrad",
)  # fmt: skip


def smoothgrad(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    base: str = "saliency",
    base_params: dict[str, Any] | None = None,
    noise_level: float = 0.15,
    noise_range: str = "image",
    samples: int = 25,
    magnitude: bool = False,
    seed: int | None = 0,
) -> np.ndarray:
    """Mean over ``samples`` noisy copies x + n, n ~ N(0, σ²) i.i.d., of ``base``'s maps
    (the paper's plain mean by default; ``magnitude=True`` squares the maps first, PAIR's
    GetSmoothedMask default and captum's smoothgrad_sq).

    σ = noise_level · range, range = max(x_i) − min(x_i) over all elements of each image
    (noise_range="image", PAIR's stdev_spread) or ``input_range`` high − low ("input_range").
    Noise: ``np.random.default_rng(seed).standard_normal((N, samples, *input_shape))``, image by
    image then sample by sample, each copy drawn channel-first (C, H, W) and moved to the model's
    layout (``engine.perturb.channel_first``: an NHWC port gets the same noise per pixel). PAIR's
    ``np.random.normal`` draws are replayed when the global generator yields the same normals in
    that order. No clipping of x + n (as PAIR).
    The target is resolved on the clean x and kept for every noisy copy. ``base`` is any METHODS
    name, called with ``base_params`` on chunks of the N × samples noisy copies (the model's
    ``batch_size`` copies each, image by image then sample by sample), the noise drawn chunk by
    chunk from one generator and the maps summed as they come: memory stays flat in samples and
    the result is the same for any chunking. Bases outside ``CHUNKED_BASES`` (mask and
    perturbation methods) get all copies in one call.
    Returns float32 (N, *input_shape).
    """
    from engine.methods import METHODS, method_parameters  # late: the registry imports this module

    x, target = prepare(model, x, target, output)
    params = dict(base_params or {})
    for key in ("target", "output", "return_delta", "return_per_class", "return_details"):
        if params.get(key):
            raise ValueError(f"base_params may not set {key!r}")
        params.pop(key, None)
    if base not in METHODS:
        raise ValueError(f"unknown base method {base!r}; known: {', '.join(sorted(METHODS))}")
    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    n, s = x.shape[0], int(samples)
    if noise_range == "image":
        flat = x.reshape(n, -1)
        spread = flat.max(axis=1).astype(np.float64) - flat.min(axis=1)
    elif noise_range == "input_range":
        lo, hi = (float(v) for v in model.input_range)
        spread = np.full(n, hi - lo)
    else:
        raise ValueError(f"noise_range must be one of {NOISE_RANGES}, got {noise_range!r}")
    sigma = (noise_level * spread).reshape((n, 1) + (1,) * (x.ndim - 1))
    rng = np.random.default_rng(seed)
    if base in ROW_SEEDED:  # one generator for all chunks: it goes on where the last chunk stopped
        params["seed"] = np.random.default_rng(params.get("seed", method_parameters(base)["seed"]))
    x64 = x.astype(np.float64)
    total = np.zeros(x.shape, dtype=np.float64)
    chunk = chunk_rows(model) if base in CHUNKED_BASES else n * s
    for start in range(0, n * s, chunk):  # noisy copy r = image r // s, sample r % s
        stop = min(start + chunk, n * s)
        img = np.arange(start, stop) // s
        # rows of the (N, samples, *input_shape) draw, in order: the same normals for any chunk
        noise = channel_first(rng.standard_normal, (stop - start, *x.shape[1:]), model.layout)
        noise = noise * sigma[img, 0]
        maps = METHODS[base](model, x64[img] + noise, target[img], output=output, **params)
        maps = np.asarray(maps, dtype=np.float64)
        maps = maps * maps if magnitude else maps
        for row, i in enumerate(img):  # sample by sample, in the order a mean over axis 1 adds them
            total[i] += maps[row]
    return (total / s).astype(np.float32)
