"""RISE: randomized input sampling for explanation (Petsiuk et al., BMVC 2018; spec methods.md §11).

Forward-only: the map is the mean of random smooth masks weighted by the model's score on the
masked image. Masks are generated and consumed in chunks, so memory stays flat as the number of
masks grows; every chunk is one ``predict`` call on all its masks × images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from engine.errors import ParameterError
from engine.methods.common import (
    Target,
    check_input,
    check_output,
    perturbation_chunk_rows,
    resolve_target,
)
from engine.perturb import Baseline, make_baseline, spatial_axes
from engine.protocol import ClassifierLike

# Masks are accumulated in blocks of this many, whatever the chunk size, so the float64 sums (and
# so the bits of the result) do not depend on the model's batch size or the memory budget.
MASK_BLOCK = 64
# With all_classes each block is a (K, b) @ (b, H·W) product: bigger blocks keep it efficient.
ALL_CLASSES_BLOCK = 256
# Grids are drawn in blocks of this many masks (the random stream is the same as one big draw).
GRID_DRAW_BLOCK = 4096


def _upsampling_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells) matrix of the reference's 1-D upsampling: ``skimage.transform.resize`` with
    order=1, mode="reflect", anti_aliasing=False, i.e. ``scipy.ndimage.zoom(order=1,
    mode="mirror", grid_mode=True)``; applied to the identity it gives the interpolation weights,
    and 2-D resizing is this matrix on both sides (linear interpolation is separable)."""
    eye = np.eye(cells)
    return ndimage.zoom(eye, (size / cells, 1.0), order=1, mode="mirror", grid_mode=True)


class MaskSampler:
    """The masks of RISE, drawn once and generated on demand in any slice.

    grid_n = (U[0, 1) < keep_probability) on a cells × cells grid; cell = ceil(H / cells),
    ceil(W / cells); the grid is resized bilinearly to (cells + 1) · cell and cropped at a random
    shift (dx in [0, cell_h), dy in [0, cell_w)) to H × W, as ``RISE.generate_masks``.
    Draws: ``rng = np.random.default_rng(seed)``; ``rng.random((n, cells, cells))`` (in blocks,
    same stream), then ``rng.integers(0, cell_h, n)`` and ``rng.integers(0, cell_w, n)``. Only
    the boolean grids and shifts are kept (n · cells² bytes); masks come out float32.
    """

    def __init__(self, n: int, cells: int, keep_probability: float, size: tuple[int, int], seed):
        h, w = size
        self.n, self.size = n, (h, w)
        cell_h, cell_w = -(-h // cells), -(-w // cells)
        rng = np.random.default_rng(seed)
        self.grids = np.empty((n, cells, cells), dtype=bool)
        for start in range(0, n, GRID_DRAW_BLOCK):
            stop = min(start + GRID_DRAW_BLOCK, n)
            self.grids[start:stop] = rng.random((stop - start, cells, cells)) < keep_probability
        self.dx = rng.integers(0, cell_h, n)
        self.dy = rng.integers(0, cell_w, n)
        self.rows = _upsampling_matrix(cells, (cells + 1) * cell_h)
        self.cols = _upsampling_matrix(cells, (cells + 1) * cell_w)

    def masks(self, start: int, stop: int) -> np.ndarray:
        """Masks ``start:stop`` as float32 (b, H, W)."""
        h, w = self.size
        rows = self.rows[self.dx[start:stop, None] + np.arange(h)]  # (b, H, cells)
        cols = self.cols[self.dy[start:stop, None] + np.arange(w)]  # (b, W, cells)
        grid = self.grids[start:stop].astype(np.float64)
        return (rows @ grid @ cols.transpose(0, 2, 1)).astype(np.float32)


def rise_masks(
    n: int = 4000,
    cells: int = 8,
    keep_probability: float = 0.1,
    size: tuple[int, int] = (224, 224),
    seed: int | None = 0,
) -> np.ndarray:
    """All ``n`` masks (n, H, W) float32 that ``rise`` with the same arguments uses (for
    inspection and tests; ``rise`` itself never holds them all)."""
    _check(n, cells, keep_probability, size)
    sampler = MaskSampler(int(n), int(cells), float(keep_probability), tuple(size), seed)
    return sampler.masks(0, int(n))


def _check(n, cells, keep_probability, size) -> None:
    for name, value in (("n_masks", n), ("cells", cells)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ParameterError(f"rise: {name} must be a positive integer, got {value!r}")
    if cells > min(size):
        raise ParameterError(f"rise: cells must be at most the image's height and width {size}, got {cells}")
    if not isinstance(keep_probability, (int, float, np.floating)) or not 0 < keep_probability <= 1:
        raise ParameterError(f"rise: keep_probability must be in (0, 1], got {keep_probability!r}")


def _class_scores(logits: np.ndarray, target: np.ndarray | None, output: str) -> np.ndarray:
    """(rows,) score of each row's target, or (rows, K) for every class, float64."""
    z = np.asarray(logits, dtype=np.float64)
    if output != "logit":
        z = z - z.max(axis=1, keepdims=True)
        z = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        if output == "probability":
            z = np.exp(z)
    return z if target is None else z[np.arange(len(z)), target]


def rise(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    n_masks: int = 4000,
    cells: int = 8,
    keep_probability: float = 0.1,
    baseline: Baseline = 0.0,
    all_classes: bool = False,
    masks: np.ndarray | None = None,
    seed: int | None = 0,
) -> np.ndarray:
    """RISE saliency S_c = Σ_i f_c(x_i) · M_i / (N · p), x_i = b + M_i ⊙ (x − b).

    Masks M_i as ``RISE.generate_masks`` (see ``MaskSampler``): ``n_masks`` (N), ``cells`` (s)
    per side, ``keep_probability`` (p1), bilinear upsampling with reflect borders and a random
    shift, seeded (``np.random.default_rng(seed)``; the reference uses numpy's global generator
    unseeded). Defaults: N = 4000 (the issue's benchmark; the notebooks use 2000–6000), s = 8,
    p1 = 0.1 (``Saliency.ipynb``). ``masks``: your own (N, H, W) masks in [0, 1] instead (e.g.
    the reference's ``masks.npy``); ``n_masks`` and ``seed`` are then ignored, p1 still divides.
    baseline: what masked-out pixels become — 0.0 (default) multiplies the input by the mask as
    the reference does (it masks the normalised tensor, so 0 is the mean colour there; for a model
    taking [0, 1] pixels 0 is black: pass the normalisation mean, e.g. 0.5, for the reference's
    colour), or any ``make_baseline`` name/number/array ("blur", ...).
    f: ``output`` of the model on the masked images (the reference's model ends in Softmax:
    "probability"). all_classes: every class at once, as the reference's forward.
    Returns float32 shaped like ``x`` (N_img, *input_shape), the map repeated over the channel
    axis (as grad_cam); with ``all_classes`` (N_img, K, H, W), one map per class (the target is
    then unused; that result alone holds N_img · K · H · W float32). All masks × images go to
    ``predict`` in chunks of whole runtime batches.
    """
    check_output(output)
    x = check_input(model, x)
    h_ax, w_ax = spatial_axes(model)
    size = (x.shape[h_ax], x.shape[w_ax])
    if masks is not None:
        masks = np.asarray(masks, dtype=np.float32)
        if masks.ndim != 3 or masks.shape[1:] != size or len(masks) == 0:
            raise ParameterError(f"rise: masks must be shaped (N, {size[0]}, {size[1]}), got {masks.shape}")
        if not np.isfinite(masks).all():
            raise ParameterError("rise: masks contain NaN/Inf values")
        n_masks = len(masks)
    _check(n_masks, cells, keep_probability, size)
    n_masks, p = int(n_masks), float(keep_probability)
    if not isinstance(all_classes, (bool, np.bool_)):
        raise ParameterError(f"rise: all_classes must be True or False, got {all_classes!r}")
    try:
        base = make_baseline(model, x, baseline, seed=seed)
    except ValueError as e:
        raise ParameterError(f"rise: baseline: {e}") from None
    target = None if all_classes else resolve_target(model, x, target)
    sampler = None if masks is not None else MaskSampler(n_masks, int(cells), p, size, seed)

    n_img, k = len(x), int(model.num_classes)
    block = ALL_CLASSES_BLOCK if all_classes else MASK_BLOCK
    rows_cap = perturbation_chunk_rows(model, x[0].nbytes)
    group = max(1, rows_cap // block)  # images per chunk
    # the non-spatial (channel) axes: (b, H, W) masks broadcast against (b, *input_shape) inputs
    mask_axes = tuple(a for a in range(1, x.ndim) if a not in (h_ax, w_ax))
    hw = size[0] * size[1]
    if all_classes:
        out = np.zeros((n_img, k, hw), dtype=np.float32)
    else:
        out = np.zeros((n_img, hw), dtype=np.float64)
    for g0 in range(0, n_img, group):
        g1 = min(g0 + group, n_img)
        xg, bg = x[g0:g1], base[g0:g1]
        diff = xg - bg
        per_chunk = max(block, (rows_cap // (len(xg) * block)) * block)
        for m0 in range(0, n_masks, per_chunk):
            m1 = min(m0 + per_chunk, n_masks)
            mk = masks[m0:m1] if masks is not None else sampler.masks(m0, m1)
            mb = np.expand_dims(mk, mask_axes)[:, None]  # (b, 1, ...) against (1, n, *input_shape)
            perturbed = np.empty((m1 - m0, *xg.shape), dtype=np.float32)
            np.multiply(mb, diff[None], out=perturbed)  # in place: one chunk-sized buffer only
            perturbed += bg[None]
            perturbed = perturbed.reshape(-1, *x.shape[1:])
            logits = model.predict(perturbed)
            del perturbed
            tg = None if target is None else np.tile(target[g0:g1], m1 - m0)
            scores = _class_scores(logits, tg, output).reshape(m1 - m0, len(xg), -1)
            flat = mk.reshape(m1 - m0, hw)
            for b0 in range(0, m1 - m0, block):
                b1 = min(b0 + block, m1 - m0)
                if all_classes:
                    fb = flat[b0:b1]
                    for i in range(len(xg)):
                        out[g0 + i] += scores[b0:b1, i, :].T.astype(np.float32) @ fb
                else:
                    out[g0:g1] += scores[b0:b1, :, 0].T @ flat[b0:b1].astype(np.float64)
    scale = 1.0 / (n_masks * p)
    if all_classes:
        out *= np.float32(scale)
        return out.reshape(n_img, k, *size)
    sal = (out * scale).astype(np.float32).reshape(n_img, *size)
    return np.broadcast_to(np.expand_dims(sal, mask_axes), x.shape).copy()
