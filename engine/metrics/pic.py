"""Performance information curves: SIC and AIC (Kapishnikov et al. 2019, XRAI), computed as PAIR
saliency's ``saliency.metrics.pic`` 0.2.1 computes them (specs/metrics.md §6;
docs/metrics-pic.md).

For one image: a "bokeh" image keeps a random 1 % of the pixels and fills the rest by linear
scattered-data interpolation; for each saliency threshold t the top-t fraction of the map is
revealed as well. Each bokeh image gives an information value (its lossless-WebP size, or
MS-SSIM to the original) and a prediction (SIC: the softmax probability of the class; AIC: 1 if
the class is the top-1 else 0), both normalised between the fully blurred and the original
image; the curve of prediction against information is resampled on 1000 points and its area is
the score.

What we share where PAIR recomputes: one Delaunay triangulation per bokeh image serves all colour
channels (PAIR's ``griddata`` triangulates once per channel); the fully blurred image, its
entropy and the original's are computed once per image for all M maps; identical reveal masks
are interpolated once; every bokeh image of every map and image goes to ``model.predict`` in
streamed chunks. A triangulation cannot be shared between thresholds without changing the
result: the kept points differ, and a grid's Delaunay triangulation is degenerate (co-circular
points), so qhull's choice depends on the point set.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import io
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
from PIL import Image
from scipy import interpolate

from engine.errors import InputError
from engine.metrics import common
from engine.metrics.base import MetricResult, metric
from engine.metrics.ssim import ms_ssim

THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.21, 0.34, 0.5, 0.75)
INFORMATION = ("entropy", "ms_ssim")


def bokeh_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PAIR's ``create_blurred_image(image, mask, "linear")`` for a uint8 (H, W, C) image.

    The four corners are always kept; kept pixels keep their values, the others are linearly
    interpolated (scipy ``LinearNDInterpolator`` on the kept pixel coordinates, the triangulation
    ``griddata`` builds, here once for all channels), the mean colour where no triangle covers a
    pixel; values are stored in float32, rounded and cast back to uint8, as PAIR does.
    """
    mask = np.array(mask, dtype=bool)
    h, w = mask.shape
    mask[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]] = True
    if mask.all():
        return image.copy()
    known, unknown = np.argwhere(mask), np.argwhere(~mask)
    values = image[mask].astype(np.float64)
    with single_threaded_lapack():
        filled = interpolate.LinearNDInterpolator(known, values, fill_value=np.nan)(unknown)
    outside = np.isnan(filled)
    if outside.any():
        mean = image.mean(axis=(0, 1))
        filled[outside] = np.broadcast_to(mean, filled.shape)[outside]
    out = image.astype(np.float32)
    out[~mask] = filled
    return np.round(out).astype(np.uint8)


@cache
def _scipy_openblas() -> ctypes.CDLL | None:
    """The OpenBLAS that scipy's LAPACK wrappers use (the wheel bundles it), or None."""
    import scipy

    folder = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(folder, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)  # already loaded by scipy: the same handle
            lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
            lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


@contextmanager
def single_threaded_lapack() -> Iterator[None]:
    """Run scipy's LAPACK on one thread inside the block.

    ``LinearNDInterpolator`` computes a 2×2 barycentric transform per triangle with LAPACK;
    with OpenBLAS's thread pool each of those tiny calls wakes the pool, which measured 30–60×
    more CPU time than the work itself on a loaded 2-core machine. The result is unchanged (one
    thread computes the same 2×2 solves). Without a bundled OpenBLAS this does nothing.
    """
    lib = _scipy_openblas()
    if lib is None:
        yield
        return
    with _LAPACK_STATE["lock"]:  # re-entrant across threads: the outermost block restores
        if _LAPACK_STATE["depth"] == 0:
            _LAPACK_STATE["before"] = lib.scipy_openblas_get_num_threads()
            lib.scipy_openblas_set_num_threads(1)
        _LAPACK_STATE["depth"] += 1
    try:
        yield
    finally:
        with _LAPACK_STATE["lock"]:
            _LAPACK_STATE["depth"] -= 1
            if _LAPACK_STATE["depth"] == 0:
                lib.scipy_openblas_set_num_threads(_LAPACK_STATE["before"])


_LAPACK_STATE: dict[str, Any] = {"lock": threading.Lock(), "depth": 0, "before": 1}


def webp_entropy(image: np.ndarray) -> int:
    """PAIR's ``estimate_image_entropy``: the byte size of the lossless WebP (quality 100) of a
    uint8 image. Exact sizes depend on the libwebp build that Pillow carries."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="webp", lossless=True, quality=100)
    return buffer.tell()


def random_masks(n: int, h: int, w: int, fraction: float = 0.01, seed: int | None = 0) -> np.ndarray:
    """(n, h, w) bool: ``int(h·w·fraction)`` pixels per image drawn without replacement, image by
    image, from ``np.random.default_rng(seed)`` (PAIR ``generate_random_mask`` uses the global
    ``np.random.choice``; pass its masks as ``random_mask`` to replay them)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h * w), dtype=bool)
    for i in range(n):
        masks[i, rng.choice(h * w, size=int(h * w * fraction), replace=False)] = True
    return masks.reshape(n, h, w)


def _to_uint8(model: Any, x: np.ndarray) -> np.ndarray:
    """x (model layout, input_range) -> uint8 (N, H, W, C) images, rounding to 8 bits."""
    lo, hi = (float(v) for v in model.input_range)
    images = np.moveaxis(x, 1, -1) if model.layout == "NCHW" else x
    scaled = (images.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _to_input(model: Any, images: np.ndarray) -> np.ndarray:
    """uint8 (R, H, W, C) -> model input float32: lo + u8 / 255 · (hi − lo), in the model's layout."""
    lo, hi = (float(v) for v in model.input_range)
    x = images.astype(np.float64) / 255.0
    if (lo, hi) != (0.0, 1.0):
        x = x * (hi - lo) + lo
    x = x.astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, 1)) if model.layout == "NCHW" else x


def _pic(
    kind: str,
    model: Any,
    x: np.ndarray,
    attributions: Any,
    target: Any,
    *,
    thresholds: Sequence[float],
    min_pred_value: float,
    keep_monotonous: bool,
    num_data_points: int,
    random_mask: np.ndarray | None,
    mask_fraction: float,
    seed: int | None,
    reduce: str,
    information: str,
    ms_ssim_normalise: bool,
    workers: int | None,
) -> list[MetricResult]:
    x = common.check_images(model, x)
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1
    ):
        raise common.parameter_error("workers", workers, "None or a positive integer")
    t = np.asarray(thresholds, np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all() or t.min() < 0 or t.max() > 1 or np.any(np.diff(t) < 0):
        raise common.parameter_error("thresholds", thresholds, "ascending fractions in [0, 1]")
    if information not in INFORMATION:
        raise common.parameter_error("information", information, f"one of {INFORMATION}")
    if (
        isinstance(num_data_points, bool)
        or not isinstance(num_data_points, (int, np.integer))
        or num_data_points < 1
    ):
        raise common.parameter_error("num_data_points", num_data_points, "a positive integer")
    if not 0 <= float(mask_fraction) <= 1:
        raise common.parameter_error("mask_fraction", mask_fraction, "a fraction in [0, 1]")
    maps = common.reduce_channels(common.stacked_maps(model, x, attributions), reduce)[:, :, 0]
    n_maps, n = maps.shape[:2]
    h, w = common.image_size(model, x)
    if maps.shape[-2:] != (h, w):
        raise InputError(f"{kind} needs maps at the input resolution {h}×{w}; got {maps.shape[-2:]}")
    if random_mask is None:
        rmask = random_masks(n, h, w, mask_fraction, seed)
    else:
        rmask = np.asarray(random_mask)
        if rmask.shape == (h, w):
            rmask = np.broadcast_to(rmask, (n, h, w))
        if rmask.shape != (n, h, w):
            raise common.parameter_error(
                "random_mask", f"array {rmask.shape}", f"bool ({h}, {w}) or ({n}, {h}, {w})"
            )
        rmask = rmask.astype(bool)

    images = _to_uint8(model, x)
    per_row = h * w * images.shape[-1] * 8
    rows = common.chunk_rows(model, per_row, n_maps * n * len(t))

    def info(img: np.ndarray, original: np.ndarray) -> float:
        if information == "entropy":
            return float(webp_entropy(img))
        pair = np.stack([img, original]).transpose(0, 3, 1, 2).astype(np.float64) / 255.0
        return float(ms_ssim(pair[:1], pair[1:])[0])

    # originals and fully blurred images: one call, for every map at once
    pool_size = max(1, int(workers) if workers else min(8, os.cpu_count() or 1))
    with single_threaded_lapack(), ThreadPoolExecutor(pool_size) as pool:
        blurred = list(pool.map(lambda i: bokeh_image(images[i], rmask[i]), range(n)))
    logits0 = np.asarray(model.predict(_to_input(model, np.concatenate([images, np.stack(blurred)]))))
    tgt = common.targets(model, x, target, logits0[:n])
    both = np.tile(tgt, 2)
    if kind == "sic":
        pred0 = common.scores_of(logits0, both, "probability")
    else:
        pred0 = (logits0.argmax(axis=1) == both).astype(np.float64)
    p_orig, p_blur = pred0[:n], pred0[n:]
    with ThreadPoolExecutor(pool_size) as pool:
        e_orig = list(pool.map(lambda i: info(images[i], images[i]), range(n)))
        e_blur = list(pool.map(lambda i: info(blurred[i], images[i]), range(n)))
    skipped: list[str | None] = []
    for i in range(n):  # PAIR's skip rules, in its order
        if p_orig[i] < min_pred_value:
            skipped.append(f"prediction on the original {p_orig[i]:.4g} < min_pred_value {min_pred_value}")
        elif e_blur[i] >= e_orig[i]:
            skipped.append(
                f"{information} of the fully blurred image {e_blur[i]:.6g} >= the original's {e_orig[i]:.6g}"
            )
        elif p_blur[i] >= p_orig[i]:
            skipped.append(
                f"prediction on the fully blurred image {p_blur[i]:.4g} >= the original's {p_orig[i]:.4g}"
            )
        else:
            skipped.append(None)

    # every distinct reveal mask of an image is one task: bokeh image + information, run on
    # ``workers`` threads (qhull, LAPACK and libwebp release the GIL), predicted chunk by chunk
    tasks: list[tuple[int, np.ndarray]] = []
    jobs: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        if skipped[i] is not None:
            continue
        seen: dict[bytes, int] = {}
        for m in range(n_maps):
            sal = maps[m, i]
            points = []
            for threshold in t:
                packed = np.packbits((sal >= np.quantile(sal, 1 - threshold)) | rmask[i])
                key = hashlib.sha1(packed.tobytes()).digest()
                if key not in seen:
                    seen[key] = len(tasks)
                    tasks.append((i, packed))
                points.append(seen[key])
            jobs[(m, i)] = points

    def run(task: tuple[int, np.ndarray]) -> tuple[np.ndarray, float]:
        i, packed = task
        img = bokeh_image(images[i], np.unpackbits(packed, count=h * w).reshape(h, w).astype(bool))
        return img, info(img, images[i])

    task_info = np.empty(len(tasks))
    task_pred = np.empty(len(tasks))
    with single_threaded_lapack(), ThreadPoolExecutor(pool_size) as pool:
        for begin in range(0, len(tasks), rows):
            chunk = tasks[begin : begin + rows]
            done = list(pool.map(run, chunk))
            cls = np.asarray([tgt[i] for i, _ in chunk], np.int64)
            logits = np.asarray(model.predict(_to_input(model, np.stack([img for img, _ in done]))))
            if kind == "sic":
                task_pred[begin : begin + len(chunk)] = common.scores_of(logits, cls, "probability")
            else:
                task_pred[begin : begin + len(chunk)] = logits.argmax(axis=1) == cls
            task_info[begin : begin + len(chunk)] = [v for _, v in done]

    curve_x = np.append(np.linspace(0.0, 1.0, num_data_points, endpoint=False), 1.0)
    params = {
        "thresholds": t.tolist(),
        "min_pred_value": float(min_pred_value),
        "keep_monotonous": bool(keep_monotonous),
        "num_data_points": int(num_data_points),
        "random_mask": "given"
        if random_mask is not None
        else f"random_masks(fraction={mask_fraction}, seed={seed})",
        "mask_fraction": float(mask_fraction),
        "seed": seed,
        "reduce": reduce,
        "information": information,
        "ms_ssim_normalise": bool(ms_ssim_normalise),
        "workers": pool_size,
    }
    results = []
    for m in range(n_maps):
        for i in range(n):
            extra: dict[str, Any] = {"map_index": m, "skipped": skipped[i]}
            if skipped[i] is not None:
                results.append(
                    MetricResult(
                        kind, float("nan"), True, int(tgt[i]), preset="pair", params=params, extra=extra
                    )
                )
                continue
            e_span, p_span = e_orig[i] - e_blur[i], p_orig[i] - p_blur[i]
            best, pts = 0.0, []
            infos, values = [], []
            for index in jobs[(m, i)]:
                value, pred = float(task_info[index]), float(task_pred[index])
                if information == "entropy" or ms_ssim_normalise:
                    e = float(np.clip((value - e_blur[i]) / e_span, 0.0, 1.0))
                else:  # the MS-SSIM reproduction's raw x axis (§6e): neither normalised nor clipped
                    e = value
                p = float(np.clip((pred - p_blur[i]) / p_span, 0.0, 1.0))
                best = max(best, p)
                pts.append((e, best if keep_monotonous else p))
                infos.append(value)
                values.append(pred)
            pts += [(0.0, 0.0), (1.0, 1.0)]
            xs, ys = zip(*pts, strict=True)
            # scipy's interp1d on the unsorted points, exactly as PAIR (it sorts them stably)
            curve_y = np.append(interpolate.interp1d(x=xs, y=ys)(curve_x[:-1]), 1.0)
            extra.update(
                predictions=[float(p_blur[i]), *values, float(p_orig[i])],
                information=[e_blur[i], *infos, e_orig[i]],
                thresholds=[0.0, *t.tolist(), 1.0],
            )
            results.append(
                MetricResult(
                    kind,
                    float(np.trapezoid(curve_y, curve_x)),
                    True,
                    int(tgt[i]),
                    curve_x=curve_x,
                    curve_y=curve_y,
                    preset="pair",
                    params=params,
                    extra=extra,
                )
            )
    return results


def aggregate_pic(results: Sequence[MetricResult], method: str = "median") -> MetricResult:
    """PAIR's ``aggregate_individual_pic_results``: the element-wise median (default; the
    reproduction uses it for SIC) or mean (for AIC) of the curves of the images that were not
    skipped, and the trapezoid area of that curve. All curves must share one x grid."""
    kept = [r for r in results if r.curve_y is not None]
    if not kept:
        raise InputError("aggregate_pic needs at least one result that was not skipped")
    xs = np.stack([r.curve_x for r in kept])
    if not np.all(xs == xs[0]):
        raise InputError("aggregate_pic: the results have different x grids (num_data_points)")
    ys = np.stack([r.curve_y for r in kept])
    if method == "median":
        y = np.median(ys, axis=0)
    elif method == "mean":
        y = np.mean(ys, axis=0)
    else:
        raise common.parameter_error("method", method, "'median' or 'mean'")
    return MetricResult(
        kept[0].metric,
        float(np.trapezoid(y, xs[0])),
        True,
        curve_x=xs[0],
        curve_y=y,
        preset=kept[0].preset,
        params={"aggregation": method, **kept[0].params},
        extra={"images": len(kept), "skipped": len(results) - len(kept)},
    )


def _public(kind: str):
    def run(
        model: Any,
        x: np.ndarray,
        attributions: Any,
        target: Any = None,
        *,
        thresholds: Sequence[float] = THRESHOLDS,
        min_pred_value: float = 0.8,
        keep_monotonous: bool = True,
        num_data_points: int = 1000,
        random_mask: np.ndarray | None = None,
        mask_fraction: float = 0.01,
        seed: int | None = 0,
        reduce: str = "abs_of_sum",
        information: str = "entropy",
        ms_ssim_normalise: bool = False,
        workers: int | None = None,
    ) -> list[MetricResult]:
        return _pic(
            kind,
            model,
            x,
            attributions,
            target,
            thresholds=thresholds,
            min_pred_value=min_pred_value,
            keep_monotonous=keep_monotonous,
            num_data_points=num_data_points,
            random_mask=random_mask,
            mask_fraction=mask_fraction,
            seed=seed,
            reduce=reduce,
            information=information,
            ms_ssim_normalise=ms_ssim_normalise,
            workers=workers,
        )

    run.__name__ = run.__qualname__ = kind
    return run


_DOC = """{title} per map and image (PAIR ``compute_pic_metric``; specs/metrics.md §6).

    x is quantised to 8 bits (PAIR works on uint8 images): u8 = round((x − lo)/(hi − lo)·255)
    with ``input_range`` (lo, hi), and every bokeh image reaches the model as lo + u8/255·(hi − lo).
    {pred}

    thresholds: ascending fractions of the map revealed (PAIR's example list); min_pred_value,
    keep_monotonous, num_data_points: PAIR's (its defaults). random_mask: bool (H, W) or
    (N, H, W); None draws ``mask_fraction`` of the pixels per image with ``seed`` (one mask per
    image, shared by all its maps). reduce: the channel rule giving the 2-D map (default
    |Σ_c a|, as PAIR's notebook). information: "entropy" (lossless WebP size, PAIR) or "ms_ssim"
    (MS-SSIM of the bokeh image to the original, data_range 1, as the TMLR-IDGI reproduction:
    raw, unless ``ms_ssim_normalise``, which normalises and clips it like the entropy; images must
    exceed 160 px a side). workers: threads making bokeh images and their information (None:
    the CPU count, at most 8; the results do not depend on it). Skipped images (PAIR raises
    ComputePicMetricError for them) get score NaN and the reason in ``extra["skipped"]``;
    ``aggregate_pic`` combines the rest.
    """

sic = metric(higher_is_better=True)(_public("sic"))
aic = metric(higher_is_better=True)(_public("aic"))
sic.__doc__ = _DOC.format(
    title="Softmax information curve (SIC)",
    pred="The prediction is the softmax probability of the target (top-1 of the clean image by default).",
)
aic.__doc__ = _DOC.format(
    title="Accuracy information curve (AIC)",
    pred="The prediction is 1.0 when the target is the top-1 class of the bokeh image, else 0.0.",
)

__all__ = ["THRESHOLDS", "aggregate_pic", "aic", "bokeh_image", "random_masks", "sic", "webp_entropy"]
