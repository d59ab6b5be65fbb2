"""XRAI (Kapishnikov et al., ICCV 2019): attributions summed over image regions, regions chosen
greedily by attribution density; as PAIR saliency ``XRAI`` (``saliency/core/xrai.py``, spec
methods.md §12).

The attribution is Integrated Gradients from two baselines (``engine.methods.integrated_gradients``,
all images × baselines × steps in one ``gradient`` call); the segmentation is scikit-image's
Felzenszwalb at PAIR's scales, imported only when XRAI segments an image itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import InputError, ParameterError
from engine.methods.common import Target, prepare
from engine.methods.integrated_gradients import integrate_straight_path
from engine.methods.quadrature import QUADRATURES
from engine.perturb import Baseline, make_baseline, spatial_axes
from engine.protocol import ClassifierLike

ALGORITHMS = ("full", "fast")
PAIR_SCALES = (50, 100, 150, 250, 500, 1200)


def _skimage() -> Any:
    try:
        from skimage import morphology, segmentation, transform
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(
            "xrai segments images with scikit-image: pip install scikit-image (or pass segments=...)"
        ) from None
    return morphology, segmentation, transform


def xrai_segments(
    image: np.ndarray,
    *,
    scales: Sequence[float] = PAIR_SCALES,
    sigma: float = 0.8,
    min_size: int = 150,
    resize: tuple[int, int] | None = (224, 224),
    dilation_radius: int = 5,
) -> list[np.ndarray]:
    """PAIR's ``_get_segments_felzenszwalb`` for one H×W×C (or H×W) image: min-max rescale to
    [−1, 1], resize to ``resize`` (cubic, anti-aliased; None keeps the size), Felzenszwalb at each
    scale, labels resized back (nearest), one boolean (H, W) mask per label, each dilated with a
    disk of ``dilation_radius`` (0: none)."""
    morphology, segmentation, transform = _skimage()
    im = np.asarray(image)
    original = im.shape[:2]
    im_max, im_min = np.max(im), np.min(im)
    im = (im - im_min) / (im_max - im_min)
    im = im * 2.0 + -1.0  # PAIR's value range [-1, 1], written as PAIR computes it
    if resize is not None:
        im = transform.resize(
            im, tuple(resize), order=3, mode="constant", preserve_range=True, anti_aliasing=True
        )
    masks = []
    for scale in scales:
        seg = segmentation.felzenszwalb(im, scale=scale, sigma=sigma, min_size=min_size)
        if resize is not None:
            seg = transform.resize(
                seg, original, order=0, preserve_range=True, mode="constant", anti_aliasing=False
            ).astype(int)
        masks.extend(seg == label for label in range(seg.min(), seg.max() + 1))
    if dilation_radius:
        footprint = morphology.disk(dilation_radius)
        masks = [morphology.dilation(m, footprint=footprint) for m in masks]
    return masks


def _density(attr: np.ndarray, mask: np.ndarray) -> float:
    """PAIR's ``_gain_density``: the mean attribution over ``mask`` (−inf if empty), computed as
    PAIR does (numpy mean in the attribution's dtype), so values and ties match bit for bit."""
    return attr[mask].mean() if mask.any() else -np.inf


def _pick(attr, masks, gains, uncovered, scale) -> int:
    """Index of PAIR's choice: the first mask with the strictly largest gain. The float64 matrix
    gains decide, except among masks within PAIR's float32 rounding of the best (``scale`` ·
    1e-5), where PAIR's own expression decides, so near-ties break as in PAIR."""
    top = gains.max()
    near = np.flatnonzero(gains >= top - 1e-5 * scale)
    if len(near) == 1:
        return int(near[0])
    best, best_gain = int(near[0]), -np.inf
    for i in near:
        g = _density(attr, masks[i] & uncovered)
        if g > best_gain:
            best, best_gain = int(i), g
    return best


def xrai_regions(
    attr: np.ndarray,
    segments: Sequence[np.ndarray],
    *,
    area_threshold: float = 1.0,
    min_pixel_diff: int = 50,
    algorithm: str = "full",
) -> tuple[np.ndarray, np.ndarray]:
    """PAIR's ``XRAI._xrai`` / ``_xrai_fast`` on one 2-D attribution map and its boolean masks.

    full: repeatedly add the mask whose not-yet-covered pixels have the highest mean attribution
    (masks adding fewer than ``min_pixel_diff`` new pixels are dropped for good), while the covered
    fraction is <= ``area_threshold``; fast: masks in order of their own mean, once each. Pixels
    left over get their own mean. Returns (map (H, W) float64: each pixel the gain of the region
    that covered it, ranks (H, W) int: 1 for the best region, PAIR's integer segments).
    Gains are screened with one float64 matrix product per step instead of PAIR's loop over masks.
    """
    attr = np.asarray(attr)
    shape = attr.shape
    masks = [np.asarray(m, dtype=bool) for m in segments]
    if any(m.shape != shape for m in masks):
        raise ParameterError(f"xrai: every segment must be a boolean {shape} mask")
    out = np.full(shape, -np.inf)
    current = np.zeros(shape, dtype=bool)
    trace: list[tuple[np.ndarray, float]] = []
    if algorithm == "full":
        # pixel-major membership (P, M): the pixels a step covers are a few rows of it, so the
        # counts and sums of new pixels are updated from those rows only (PAIR rescans every
        # mask over the whole image at every step)
        members = np.array([m.ravel() for m in masks]).reshape(len(masks), -1).T
        flat = attr.astype(np.float64).ravel()
        scale = float(np.abs(flat).max()) if flat.size else 0.0
        counts = members.sum(axis=0).astype(np.float64)  # new pixels of each mask
        sums = flat @ members  # their attribution
        active = np.ones(len(masks), dtype=bool)  # PAIR's remaining_masks
        area = 0.0
        while area <= area_threshold:
            active &= counts >= min_pixel_diff  # new pixels only shrink: dropped for good
            if not active.any():
                break
            uncovered = ~current
            gains = np.where(active, sums / np.maximum(counts, 1.0), -np.inf)
            i = _pick(attr, masks, gains, uncovered, scale)
            added = masks[i] & uncovered
            gain = _density(attr, added)
            trace.append((added, gain))
            current |= masks[i]
            area = np.mean(current)
            out[added] = gain
            active[i] = False
            rows = np.flatnonzero(added.ravel())
            counts -= members[rows].sum(axis=0)
            sums -= flat[rows] @ members[rows]
    elif algorithm == "fast":
        own = [_density(attr, m) for m in masks]
        for k in sorted(range(len(masks)), key=lambda k: -own[k]):
            added = masks[k] & ~current
            if added.sum() < min_pixel_diff:
                continue
            gain = _density(attr, added)
            trace.append((added, gain))
            out[added] = gain
            current |= masks[k]
    else:
        raise ParameterError(f"xrai: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    left = out == -np.inf
    out[left] = _density(attr, left)
    regions = [m for m, _ in sorted(trace, key=lambda t: -t[1])]
    if left.any():
        regions.append(left)
    ranks = np.zeros(shape, dtype=int)
    for i, m in enumerate(regions):
        ranks[m] = i + 1
    return out, ranks


def _pair_baselines(x: np.ndarray) -> list[np.ndarray]:
    """PAIR's default XRAI baselines: constant images at min(x) and at max(x), per image."""
    axes = tuple(range(1, x.ndim))
    return [
        np.broadcast_to(x.min(axis=axes, keepdims=True), x.shape),
        np.broadcast_to(x.max(axis=axes, keepdims=True), x.shape),
    ]


def xrai(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    baselines: Sequence[Baseline] | None = None,
    steps: int = 100,
    quadrature: str = "pair",
    area_threshold: float = 1.0,
    min_pixel_diff: int = 50,
    algorithm: str = "full",
    attributions: np.ndarray | None = None,
    segments: Sequence[Sequence[np.ndarray]] | None = None,
    segment_scales: Sequence[float] = PAIR_SCALES,
    segment_sigma: float = 0.8,
    segment_min_size: int = 150,
    segment_resize: tuple[int, int] | None = (224, 224),
    dilation_radius: int = 5,
    return_segments: bool = False,
    blur_sigma: float = 10.0,
    seed: int | None = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """XRAI as PAIR ``XRAI.GetMask`` with its defaults (``XRAIParameters``).

    Attribution: the mean of Integrated Gradients (``steps`` = 100, ``quadrature`` "pair" =
    PAIR's linspace with weights 1/steps) from each of ``baselines`` — None: PAIR's constant
    images at min(x) and at max(x) of each image (black and white for an image spanning the
    input range); else ``make_baseline`` names/numbers/arrays ("black", "white", ...) — then the
    max over channels. ``attributions``: your own maps shaped like ``x`` instead (PAIR's
    ``base_attribution``; the model is not called and ``target`` is unused then).
    Segments: per image a list of boolean (H, W) masks (PAIR's ``segments``), or None for
    ``xrai_segments`` (Felzenszwalb at ``segment_scales`` with ``segment_sigma``,
    ``segment_min_size``, on the image resized to ``segment_resize``, masks dilated by a disk of
    ``dilation_radius``). Region selection: ``xrai_regions`` with ``area_threshold``,
    ``min_pixel_diff`` (PAIR's experimental_params) and ``algorithm`` "full" or "fast".
    Returns float32 shaped like ``x`` (the region gain of each pixel on every channel); with
    ``return_segments`` also the region ranks (N, H, W) int64, 1 = most important (PAIR's
    ``flatten_xrai_segments``).
    """
    h_ax, w_ax = spatial_axes(model)
    if algorithm not in ALGORITHMS:
        raise ParameterError(f"xrai: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if quadrature not in QUADRATURES:
        raise ParameterError(f"xrai: quadrature must be one of {QUADRATURES}, got {quadrature!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ParameterError(f"xrai: steps must be an integer >= 2, got {steps!r}")
    if not isinstance(min_pixel_diff, (int, np.integer)) or min_pixel_diff < 0:
        raise ParameterError(f"xrai: min_pixel_diff must be a non-negative integer, got {min_pixel_diff!r}")
    if not isinstance(area_threshold, (int, float, np.floating)) or not 0 <= area_threshold <= 1:
        raise ParameterError(f"xrai: area_threshold must be in [0, 1], got {area_threshold!r}")
    ch_axes = tuple(a for a in range(1, np.ndim(x)) if a not in (h_ax, w_ax))
    if attributions is None:
        x, target = prepare(model, x, target, output)
        bases = _pair_baselines(x) if baselines is None else None
        if bases is None:
            if isinstance(baselines, str) or len(baselines) == 0:
                raise ParameterError(f"xrai: baselines must be a list of baselines, got {baselines!r}")
            try:
                bases = [make_baseline(model, x, b, seed=seed, blur_sigma=blur_sigma) for b in baselines]
            except ValueError as e:
                raise ParameterError(f"xrai: baselines: {e}") from None
        k = len(bases)
        attr, _ = integrate_straight_path(
            model,
            np.concatenate([x] * k),
            np.concatenate(bases).astype(np.float32),
            np.tile(target, k),
            output,
            int(steps),
            quadrature,
            idgi=False,
        )
        attr = attr.reshape(k, *x.shape).astype(np.float32).mean(axis=0)
    else:
        from engine.methods.common import check_input

        x = check_input(model, x)
        attr = np.asarray(attributions)
        if attr.shape != x.shape:
            raise ParameterError(f"xrai: attributions must be shaped like x {x.shape}, got {attr.shape}")
    attr2d = attr.max(axis=ch_axes) if ch_axes else attr
    if segments is not None and len(segments) != len(x):
        raise ParameterError(
            f"xrai: segments must hold one list of masks per image ({len(x)}), got {len(segments)}"
        )
    maps = np.empty((len(x), x.shape[h_ax], x.shape[w_ax]), dtype=np.float64)
    ranks = np.empty(maps.shape, dtype=np.int64)
    for i in range(len(x)):
        if segments is None:
            image = np.moveaxis(x[i], (h_ax - 1, w_ax - 1), (0, 1))  # H, W first (PAIR: HWC)
            segs = xrai_segments(
                image,
                scales=segment_scales,
                sigma=segment_sigma,
                min_size=segment_min_size,
                resize=segment_resize,
                dilation_radius=dilation_radius,
            )
        else:
            segs = segments[i]
        maps[i], ranks[i] = xrai_regions(
            attr2d[i],
            segs,
            area_threshold=float(area_threshold),
            min_pixel_diff=int(min_pixel_diff),
            algorithm=algorithm,
        )
    result = np.broadcast_to(np.expand_dims(maps.astype(np.float32), ch_axes), x.shape).copy()
    return (result, ranks) if return_segments else result
