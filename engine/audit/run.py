"""The audit job: a deployed model and a folder of images -> predictions, maps and scores, stored
one result at a time in an ``AuditStore`` as each completes.

Images are taken in the order given, in fixed chunks of ``chunk`` images; every method and
metric runs on a whole chunk in one call (so the runtime sees big batches) and every chunk is
defined by its images' digests. A method that draws noise (SmoothGrad, RISE, ...) draws it for the
chunk, so the chunk is part of each result's key: a rerun — after a SIGKILL, or on another machine
— recomputes a chunk exactly as before and stores only the rows that are missing. A chunk whose
rows are all present is not even decoded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .store import AuditStore, Row, result_key

Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass
class Plan:
    """What an audit computes: (name, params) per method and per metric, scored for ``target``."""

    methods: list[tuple[str, dict]]
    metrics: list[tuple[str, dict]] = field(default_factory=list)
    target: int | None = None  # None: each image's top-1 class
    output: str = "probability"
    chunk: int = 8

    def validate(self) -> None:
        from ..methods import METHODS, method_parameters
        from ..metrics import METRICS, metric_parameters

        if int(self.chunk) < 1:
            raise InputError(f"chunk must be >= 1, got {self.chunk}")
        for name, params in self.methods:
            if name not in METHODS:
                raise InputError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
            _check_params(name, params, method_parameters(name))
        for name, params in self.metrics:
            if name not in METRICS:
                raise InputError(f"unknown metric {name!r}; known: {', '.join(METRICS) or 'none'}")
            _check_params(name, params, metric_parameters(name))


def _check_params(name: str, params: dict, known: dict) -> None:
    from ..errors import ParameterError

    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParameterError(f"{name} has no parameter {', '.join(unknown)}; it takes {', '.join(known)}")


@dataclass
class Summary:
    images: int
    chunks: int
    computed: int  # rows written by this run
    skipped: int  # rows already in the store
    seconds: float


def full_params(kind: str, name: str, params: dict) -> dict:
    """Every parameter a result ran with, defaults included (JSON-ready)."""
    from ..methods import method_parameters
    from ..metrics import metric_parameters
    from ..report.record import jsonable

    defaults = method_parameters(name) if kind == "method" else metric_parameters(name)
    merged = {k: v for k, v in defaults.items() if k != "output"}
    merged.update(params)
    return jsonable(merged)


def audit(
    clf: Any,
    paths: Sequence[str | Path],
    store: AuditStore,
    plan: Plan,
    *,
    progress: Progress | None = None,
) -> Summary:
    """Run ``plan`` over the image files ``paths`` with the Classifier ``clf`` into ``store``."""
    from ..images import read_images
    from ..report.record import file_sha256, versions

    plan.validate()
    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no image files given")
    digests = [file_sha256(p) for p in paths]
    model_sha = clf.sha256
    store.add_model(model_sha, str(clf.path or ""), _model_record(clf, versions()))
    methods = [(m, full_params("method", m, p), p) for m, p in plan.methods]
    metrics = [(m, full_params("metric", m, p), p) for m, p in plan.metrics]
    chunks = [list(range(i, min(i + plan.chunk, len(paths)))) for i in range(0, len(paths), plan.chunk)]
    computed = skipped = 0
    for c, rows in enumerate(chunks):
        chunk_id = result_key(images=[digests[i] for i in rows])
        keys = _chunk_keys(model_sha, [digests[i] for i in rows], chunk_id, plan, methods, metrics)
        missing = {k for k in keys.all() if not store.has(k)}
        skipped += len(keys.all()) - len(missing)
        if progress:
            progress("images", c, len(chunks))
        if not missing:
            continue
        x, decoded = read_images([paths[i] for i in rows], clf.input_shape, clf.layout, clf.input_range)
        for j, i in enumerate(rows):
            store.add_image(
                digests[i], model_sha, str(paths[i]), i, _picture(clf, x[j]), decoded[j].to_dict()
            )
        computed += compute_chunk(
            clf, x, [digests[i] for i in rows], chunk_id, keys, missing, plan, store.put, _reader(store)
        )
    if progress:
        progress("images", len(chunks), len(chunks))
    return Summary(len(paths), len(chunks), computed, skipped, time.perf_counter() - start)


@dataclass
class _Keys:
    prediction: list[str]
    method: dict[int, list[str]]  # method index -> key per image
    metric: dict[tuple[int, int], list[str]]  # (method index, metric index) -> key per image
    methods: list
    metrics: list

    def all(self) -> list[str]:
        out = list(self.prediction)
        for v in self.method.values():
            out += v
        for v in self.metric.values():
            out += v
        return out


# Part of every key: bump it when the same model, image and parameters would give other numbers
# (image decoding, a method's or metric's definition, its random draws), so a resumed audit
# recomputes instead of mixing rows of two definitions. 2: random tensors drawn channel-first.
RESULTS_REVISION = 2


def _chunk_keys(model_sha, images, chunk_id, plan, methods, metrics) -> _Keys:
    target = "top1" if plan.target is None else int(plan.target)
    rev = RESULTS_REVISION
    pred = [
        result_key(model=model_sha, image=d, kind="prediction", chunk=chunk_id, revision=rev) for d in images
    ]
    mkeys, skeys = {}, {}
    for a, (name, full, _) in enumerate(methods):
        mkeys[a] = [
            result_key(
                model=model_sha,
                image=d,
                kind="method",
                name=name,
                params=full,
                target=target,
                output=plan.output,
                chunk=chunk_id,
                revision=rev,
            )
            for d in images
        ]
        for b, (metric, mfull, _) in enumerate(metrics):
            skeys[(a, b)] = [
                result_key(source=k, kind="metric", name=metric, params=mfull, target=target, revision=rev)
                for k in mkeys[a]
            ]
    return _Keys(pred, mkeys, skeys, methods, metrics)


def _reader(store: AuditStore) -> Callable[[str], np.ndarray]:
    return lambda key: store.get(key).data


def compute_chunk(
    clf,
    x: np.ndarray,
    digests: list[str],
    chunk_id: str,
    keys: _Keys,
    missing: set,
    plan: Plan,
    emit: Callable[[Row], bool],
    stored: Callable[[str], np.ndarray],
) -> int:
    """Compute the rows of one chunk whose keys are in ``missing`` and hand each to ``emit`` as it
    is made (``AuditStore.put`` here; the Ray backend collects them and ships them to the driver,
    which alone writes the store). ``stored(key)`` gives back a map already in the store, for a
    chunk whose maps are done but whose metrics are not. Returns how many ``emit`` calls returned
    True."""
    from ..methods import explain
    from ..methods.common import output_scores, resolve_target
    from ..metrics import evaluate, for_method

    written = 0
    labels = clf.labels or []
    t0 = time.perf_counter()
    logits = np.asarray(clf.predict(x))
    seconds = (time.perf_counter() - t0) / len(x)
    targets = resolve_target(clf, x, plan.target, logits)
    scores = output_scores(logits, targets, plan.output)
    model_sha = clf.sha256

    def label(k: int) -> str | None:
        return labels[k] if k < len(labels) else None

    for j, key in enumerate(keys.prediction):
        if key in missing:
            record = {
                "kind": "prediction",
                "top1": int(logits[j].argmax()),
                "label": label(int(logits[j].argmax())),
            }
            row = Row(
                key,
                model_sha,
                digests[j],
                "prediction",
                "logits",
                {},
                None,
                int(targets[j]),
                float(scores[j]),
                logits[j],
                record,
                seconds,
            )
            written += emit(row)
    for a, (name, full, given) in enumerate(keys.methods):
        mkeys = keys.method[a]
        need_scores = any(k in missing for b in range(len(keys.metrics)) for k in keys.metric[(a, b)])
        if not any(k in missing for k in mkeys) and not need_scores:
            continue
        if all(k not in missing for k in mkeys):  # maps stored, only metrics to do: read them back
            maps = np.stack([stored(k) for k in mkeys])
        else:
            t0 = time.perf_counter()
            maps = explain(clf, x, name, target=targets, output=plan.output, **given)
            maps = maps[0] if isinstance(maps, tuple) else np.asarray(maps)
            seconds = (time.perf_counter() - t0) / len(x)
            for j, key in enumerate(mkeys):
                if key in missing:
                    record = _result_record(clf, "method", name, full, plan, targets[j], label, chunk_id)
                    row = Row(
                        key,
                        model_sha,
                        digests[j],
                        "method",
                        name,
                        full,
                        None,
                        int(targets[j]),
                        None,
                        np.asarray(maps[j], np.float32),
                        record,
                        seconds,
                    )
                    written += emit(row)
        for b, (metric, mfull, mgiven) in enumerate(keys.metrics):
            skeys = keys.metric[(a, b)]
            if not any(k in missing for k in skeys):
                continue
            t0 = time.perf_counter()
            results = evaluate(
                clf, x, maps, metric, target=targets, **for_method(metric, mgiven, name, given, plan.output)
            )
            seconds = (time.perf_counter() - t0) / len(x)
            for j, key in enumerate(skeys):
                if key in missing:
                    res = results[j]
                    record = _result_record(clf, "metric", metric, mfull, plan, targets[j], label, chunk_id)
                    record.update(
                        method=name, higher_is_better=bool(res.higher_is_better), result=res.to_dict()
                    )
                    curve = None if res.curve_y is None else np.asarray(res.curve_y, np.float64)
                    row = Row(
                        key,
                        model_sha,
                        digests[j],
                        "metric",
                        metric,
                        mfull,
                        mkeys[j],
                        int(targets[j]),
                        float(res.score),
                        curve,
                        record,
                        seconds,
                    )
                    written += emit(row)
    return written


def _result_record(clf, kind, name, full, plan, target, label, chunk_id) -> dict:
    return {
        "kind": kind,
        "name": name,
        "params": full,
        "output": plan.output,
        "target_rule": "top1" if plan.target is None else int(plan.target),
        "class": int(target),
        "label": label(int(target)),
        "chunk": chunk_id,
        "providers": list(getattr(clf, "providers", []) or []),
    }


def _model_record(clf, versions: dict) -> dict:
    return {
        "gradient_model_sha256": getattr(clf, "gradient_model_sha256", None),
        "layout": clf.layout,
        "input_shape": list(clf.input_shape),
        "input_range": list(clf.input_range),
        "num_classes": int(clf.num_classes),
        "labels": list(clf.labels or []),
        "providers": list(getattr(clf, "providers", []) or []),
        "notes": list(getattr(clf, "notes", []) or []),
        "versions": versions,
    }


def _picture(clf, x: np.ndarray) -> bytes:
    """The model input as an 8-bit PNG (what the report draws the heatmaps over)."""
    from ..report import heatmap

    lo, hi = clf.input_range
    img = (heatmap.to_hwc(np.asarray(x, np.float64), clf.layout) - lo) / (hi - lo)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return heatmap.png_bytes(img[..., 0] if img.shape[-1] == 1 else img)
