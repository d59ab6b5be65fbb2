"""The onnxplain command.

Exit codes: 0 success, 1 failure (a bad model, image or fault: one line on stderr), 2 usage
(an unknown option, method or parameter; a malformed --params or --target; an output that is
one of the inputs), 130 interrupted.
Every string that comes from a model file is printed through ``printable`` (no terminal escapes).
ONNXPLAIN_DEBUG=1 prints the traceback of a failure as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import InputError, OnnxplainError, OverwriteError
from .protocol import RULES
from .text import printable

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(InputError):
    """A command-line option that cannot be used (exit code 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_builder(args) -> int:
    from .compile import builder

    if args.action == "install":
        py = builder.install(args.path, quiet=not args.verbose, force=args.force)
        print(f"builder interpreter: {py}")
    else:
        print(f"builder interpreter: {builder.builder_python()} (onnxruntime {builder.version()})")
    return 0


def _cmd_cache(args) -> int:
    from .compile import cache

    if args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.cache_dir()}")
        return 0
    found = cache.entries()
    total = sum(e.bytes for e in found)
    print(f"{cache.cache_dir()}: {len(found)} entries, {total / 2**20:.1f} MiB")
    for e in found:
        r = e.record
        source = printable(r.get("source", r.get("status", "?")))
        print(f"  {e.key}  {e.bytes / 2**20:8.1f} MiB  {r.get('rule', '?'):16s} {source}")
    return 0


def _cmd_compile(args) -> int:
    from .compile import compile_to_file

    info = compile_to_file(
        args.model, args.output, rule=args.rule, layer=args.layer, self_check=not args.no_self_check
    )
    check = info.self_check or {"status": "not run"}
    print(
        f"wrote {args.output}: rule {info.rule}, {info.num_classes} classes, lowered "
        f"{printable(', '.join(info.lowered_ops) or 'nothing')}; self-check {check['status']}"
    )
    print(f"  passes: {printable(', '.join(f'{k} x{v}' for k, v in info.passes.items()) or 'none')}")
    if check.get("status") == "passed":
        g = check[info.input_gradient]
        print(
            f"  input gradient max abs error vs the builder's graph: {g['max_abs_error']:.3g} "
            f"(scale {g['scale']:.3g})"
        )
    elif check.get("reason"):
        print(f"  reason: {printable(check['reason'])}")
    return 0


def _load(args):
    from . import load

    return load(args.model, gradient_model=getattr(args, "gradient_model", None))


def _cmd_info(args) -> int:
    clf = _load(args)
    info = {
        "model": str(args.model),
        "sha256": clf.sha256,
        "input_shape": clf.input_shape,
        "layout": clf.layout,
        "input_range": clf.input_range,
        "num_classes": clf.num_classes,
        "labels": [printable(s) for s in (clf.labels or [])[:5]],
        "source_framework": printable(clf.info.source_framework),
        "preprocessing": clf.info.preprocessing,
        "batch_size": clf.batch_size,
        "providers": clf.providers,
        "inferred": [printable(n) for n in clf.notes],
    }
    print(json.dumps(info, indent=2))  # json escapes the remaining controls (\u001b)
    return 0


def _cmd_predict(args) -> int:
    from .images import load_images

    clf = _load(args)
    x = load_images(args.images, clf.input_shape, clf.layout, clf.input_range)
    logits = clf.predict(x)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    for path, row in zip(args.images, p):
        print(printable(path))
        for k in np.argsort(-row)[: args.top]:
            label = printable(clf.labels[k]) if clf.labels else str(k)
            print(f"  {row[k]:7.2%}  {k:5d}  {label}")
    return 0


def _value(text: str):
    """A --param value: JSON when it parses (64, 0.5, true, [1, 2], "x"), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _params(text: str | None, pairs: list[str] | None, methods: list[str], known_of=None) -> dict[str, dict]:
    """Per-name parameters from --params JSON and --param NAME=VALUE / --param METHOD.NAME=VALUE.

    A parameter goes to every chosen method (or metric) that has it; one that none has is an
    error. ``known_of(name)``: the parameters a name takes (default: the method's)."""
    if known_of is None:
        from .methods import method_parameters

        def known_of(name: str) -> set[str]:
            return set(method_parameters(name)) - {"output"}

    given: dict = {}
    if text:
        try:
            given = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--params is not valid JSON ({e}): {text[:80]!r}") from None
        if not isinstance(given, dict):
            kind = type(given).__name__
            raise UsageError(f"--params must be a JSON object like '{{\"steps\": 32}}', got {kind}")
    scoped: dict[str, dict] = {m: {} for m in methods}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--param {pair!r}: expected NAME=VALUE or METHOD.NAME=VALUE")
        method, dot, key = name.rpartition(".")
        if dot and method in scoped:
            scoped[method][key] = _value(value)
        elif dot:
            raise UsageError(
                f"--param {pair!r}: {method!r} is not one of the chosen methods or metrics {methods}"
            )
        else:
            given[name] = _value(value)
    out: dict[str, dict] = {}
    for m in methods:
        known = known_of(m)
        out[m] = {k: v for k, v in given.items() if k in known}
        for k, v in scoped[m].items():
            if k not in known:
                raise UsageError(
                    f"--param {m}.{k}: {m} has no parameter {k}; it takes {', '.join(sorted(known))}"
                )
            out[m][k] = v
    unused = sorted(k for k in given if not any(k in out[m] for m in methods))
    if unused:
        takes = "; ".join(f"{m} takes {', '.join(sorted(known_of(m)))}" for m in methods)
        raise UsageError(f"--params: none of the chosen has parameter {', '.join(unused)} ({takes})")
    return out


def _target(text: str | None, labels: list[str] | None, num_classes: int) -> int | None:
    """--target: a class index or a class name from the model's labels."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        matches = [k for k, name in enumerate(labels or []) if name == text]
        if len(matches) == 1:
            return matches[0]
        if not labels:
            raise UsageError(
                f"--target {printable(text)!r} is not a class index and the model has no labels"
            ) from None
        what = (
            "names several classes" if matches else "is neither a class index nor one of the model's labels"
        )
        raise UsageError(f"--target {printable(text)!r} {what}") from None
    if not 0 <= value < num_classes:
        raise UsageError(
            f"--target {value} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return value


def _progress(args):
    """A progress bar on stderr when it is a terminal (none otherwise, with --quiet or --json)."""
    if getattr(args, "quiet", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    from .progress import ProgressBar

    return ProgressBar()


def _cmd_explain(args) -> int:
    from .atomic import refuse_overwrite
    from .images import expand_paths, read_images
    from .methods import METHODS

    methods = args.method or ["integrated_gradients"]
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"-m/--method {m!r} is not a method; known: {', '.join(METHODS)}")
    params = _params(args.params, args.param, methods)
    out = Path(args.out)
    images = expand_paths(args.images)
    refuse_overwrite(out, [args.model, args.gradient_model, *images], "-o")
    clf = _load(args)
    refuse_overwrite(out, clf.data_files, "-o")
    npz = out.suffix.lower() == ".npz"
    if not npz and out.suffix and not out.is_dir():
        raise UsageError(f"-o {out}: give a folder (heatmaps, report.html, records) or a .npz file")
    if npz and len(methods) > 1:
        raise UsageError(
            f"-o {out}: a .npz holds one method's maps; give a folder for {len(methods)} methods"
        )
    target = _target(args.target, clf.labels, clf.num_classes)
    x, decoded = read_images(images, clf.input_shape, clf.layout, clf.input_range)
    if npz:
        return _explain_npz(args, clf, methods[0], params[methods[0]], images, x, decoded, target)
    from .report.explain import explain_to_dir

    records = explain_to_dir(
        clf,
        images,
        x,
        [d.to_dict() for d in decoded],
        methods,
        params,
        out,
        target=target,
        output=args.output,
        scale=args.scale,
        progress=_progress(args),
    )
    if args.json:
        print(json.dumps({"out": str(out), "report": str(out / "report.html"), "records": records}))
    else:
        for r in records:
            print(f"{r['method']}: {len(images)} images in {r['seconds']:.2f} s")
        print(f"wrote {printable(out / 'report.html')}")
    return 0


def _explain_npz(args, clf, method, params, images, x, decoded, target) -> int:
    import io

    from . import explain
    from .atomic import atomic_write_bytes
    from .methods.common import resolve_target
    from .report.record import file_sha256, method_record

    targets = resolve_target(clf, x, target)
    maps = explain(clf, x, method, target=targets, output=args.output, **params)
    info = [
        {"path": str(p), "sha256": file_sha256(p), "decoded": d.to_dict()} for p, d in zip(images, decoded)
    ]
    record = method_record(clf, method, params, output=args.output, targets=targets, images=info)
    record["target"] = target  # as given (None: the top-1 class, listed in "targets")
    buf = io.BytesIO()
    np.savez_compressed(buf, attributions=maps, inputs=x, record=json.dumps(record))
    atomic_write_bytes(args.out, buf.getvalue())
    shape = maps.shape if isinstance(maps, np.ndarray) else maps[0].shape
    print(f"wrote {printable(args.out)}: {method} maps {shape}")
    return 0


def _cmd_annotate(args) -> int:
    from .annotate import annotate

    labels = None
    if args.labels:
        from .modelfile import read_model_bytes

        text = read_model_bytes(Path(args.labels), "labels file").decode("utf-8", errors="strict")
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    notes = annotate(
        args.model,
        args.output,
        layout=args.layout,
        mean=args.mean,
        std=args.std,
        input_range=tuple(args.range) if args.range else None,
        labels=labels,
    )
    for n in notes:
        print(f"  {printable(n)}")
    print(f"wrote {printable(args.output)}")
    return 0


def _audit_params(args, methods: list[str], metrics: list[str]) -> tuple[dict, dict]:
    from .methods import method_parameters
    from .metrics import metric_parameters

    if set(methods) & set(metrics):
        raise UsageError(f"a name is both a method and a metric: {sorted(set(methods) & set(metrics))}")

    def known_of(name: str) -> set[str]:
        if name in methods:
            return set(method_parameters(name)) - {"output"}
        return set(metric_parameters(name))

    both = _params(args.params, args.param, methods + metrics, known_of)
    return {m: both[m] for m in methods}, {m: both[m] for m in metrics}


def _cmd_audit(args) -> int:
    from .atomic import atomic_write_bytes, refuse_overwrite
    from .audit import AuditStore, Plan, audit
    from .audit.report import audit_report
    from .images import expand_paths
    from .methods import METHODS
    from .metrics import METRICS

    methods = args.method or ["saliency"]
    metrics = args.metric or []
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"-m/--method {m!r} is not a method; known: {', '.join(METHODS)}")
    for m in metrics:
        if m not in METRICS:
            raise UsageError(f"--metric {m!r} is not a metric; known: {', '.join(METRICS) or 'none'}")
    if args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
    if args.workers is not None and args.ray is None:
        raise UsageError("--workers needs --ray (the one-machine audit runs in this process)")
    if args.workers is None:
        args.workers = 2
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.ray_data and args.ray is None:
        raise UsageError("--ray-data needs --ray (Ray Data reads on a Ray cluster)")
    if args.ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UsageError("--ray needs Ray: pip install 'onnxplain[ray]'")
    if args.ray_data or args.parquet:
        _need_pyarrow("--ray-data" if args.ray_data else "--parquet")
    if args.ray_data:
        _quiet_ray_data()
    mparams, sparams = _audit_params(args, methods, metrics)
    # With --ray-data the IMAGES are Ray Data's to list (URIs, folders); only local patterns are
    # expanded (by the Ray backend), and nothing is read here.
    images = [] if args.ray_data else expand_paths(args.images)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: give a folder (audit.sqlite and report.html go in it)")
    local_data = (
        [d for d in args.images if "://" not in d] if args.ray_data else []
    )  # remote: never the output
    refuse_overwrite(out, [args.model, args.gradient_model, *images, *local_data], "--out")
    if args.parquet:
        refuse_overwrite(args.parquet, [args.model, args.gradient_model, *images, *local_data], "--parquet")
    clf = _load(args)
    target = _target(args.target, clf.labels, clf.num_classes)
    plan = Plan(
        methods=[(m, mparams[m]) for m in methods],
        metrics=[(m, sparams[m]) for m in metrics],
        target=target,
        output=args.output,
        chunk=args.chunk,
    )
    progress = _progress(args)
    out.mkdir(parents=True, exist_ok=True)
    with AuditStore(out / "audit.sqlite") as store:
        if args.ray is not None:
            from .audit.ray_backend import audit_on_ray  # the only module that imports ray

            summary = audit_on_ray(
                clf,
                images or None,
                store,
                plan,
                dataset=args.images if args.ray_data else None,
                address=args.ray,
                workers=args.workers,
                progress=progress,
            )
        else:
            summary = audit(clf, images, store, plan, progress=progress)
        atomic_write_bytes(out / "report.html", audit_report(store).encode())
        if args.parquet:
            from .audit.parquet import write_parquet

            write_parquet(store, args.parquet)
    if args.json:
        print(json.dumps({"out": str(out), **summary.__dict__}))
    else:
        print(
            f"{summary.images} images in {summary.chunks} chunks: {summary.computed} results computed, "
            f"{summary.skipped} already stored ({summary.seconds:.1f} s)"
        )
        print(f"wrote {printable(out / 'audit.sqlite')} and {printable(out / 'report.html')}")
        if args.parquet:
            print(f"wrote the results as Parquet into {printable(args.parquet)}")
    return 0


def _quiet_ray_data() -> None:
    """Ray Data's INFO lines on stderr (execution plans, a note that progress bars are off) only
    in its log file: the command's stderr keeps progress and errors."""
    import logging

    import ray.data  # noqa: F401  (it configures its logger when imported)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def _need_pyarrow(option: str) -> None:
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        raise UsageError(f"{option} needs pyarrow: pip install 'onnxplain[ray]'")


def _cmd_audit_export(args) -> int:
    from .audit import AuditStore
    from .audit.parquet import write_parquet

    _need_pyarrow("audit-export")
    db = _audit_db(args.audit)
    with AuditStore(db, create=False) as store:
        counts = write_parquet(store, args.out)
    if args.json:
        print(json.dumps({"out": str(args.out), "rows": counts}))
    else:
        for name, n in counts.items():
            print(f"wrote {printable(Path(args.out) / name)} ({n} rows)")
    return 0


def _cmd_evaluate(args) -> int:
    from .atomic import refuse_overwrite
    from .images import expand_paths, read_images
    from .methods import METHODS, explain
    from .methods.common import resolve_target
    from .metrics import METRICS
    from .report.evaluate import evaluate_to_dir
    from .report.record import file_sha256

    metrics = args.metric or []
    if not metrics:
        raise UsageError(f"give at least one --metric; known: {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise UsageError(f"--metric {m!r} is not a metric; known: {', '.join(METRICS)}")
    if bool(args.maps) == bool(args.images):
        raise UsageError("give image files (with -m METHOD) or --maps FILE.npz from `onnxplain explain`")
    methods = [] if args.maps else (args.method or ["saliency"])
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"-m/--method {m!r} is not a method; known: {', '.join(METHODS)}")
    mparams, sparams = _audit_params(args, methods, metrics)
    out = Path(args.out) if args.out else None
    images = expand_paths(args.images) if args.images else []
    if args.boxes and "pointing_game" not in metrics:
        raise UsageError("--boxes is the pointing game's ground truth: add --metric pointing_game")
    if args.boxes and ({"boxes", "masks"} & set(sparams.get("pointing_game", {}))):
        raise UsageError("give the pointing game's boxes either with --boxes or with --param, not both")
    if out is not None:
        refuse_overwrite(out, [args.model, args.gradient_model, args.maps, args.boxes, *images], "-o")
    clf = _load(args)
    target = _target(args.target, clf.labels, clf.num_classes)
    if args.maps:
        x, maps, info = _read_maps(args.maps)
        targets = resolve_target(clf, x, target)
    else:
        x, decoded = read_images(images, clf.input_shape, clf.layout, clf.input_range)
        targets = resolve_target(clf, x, target)
        maps = {}
        for m in methods:
            got = explain(clf, x, m, target=targets, output=args.output, **mparams[m])
            maps[m] = got[0] if isinstance(got, tuple) else got
        info = [
            {"path": str(p), "sha256": file_sha256(p), "decoded": d.to_dict()}
            for p, d in zip(images, decoded)
        ]
    if args.boxes:
        from .groundtruth import boxes_for_images, read_boxes_file

        sparams["pointing_game"]["boxes"] = boxes_for_images(read_boxes_file(args.boxes), info, args.boxes)
    summary = evaluate_to_dir(
        clf,
        x,
        maps,
        metrics,
        sparams,
        out,
        targets=targets,
        images=info,
        method_params=mparams,
        progress=_progress(args),
    )
    if args.json:
        print(json.dumps(summary["metrics"]))
        return 0
    for method, row in summary["metrics"].items():
        print(
            f"{method}: "
            + ", ".join(f"{k} {'n/a' if v is None else format(v, '.4f')}" for k, v in row.items())
        )
    if out is not None:
        print(f"wrote {printable(out / 'report.html')}")
    return 0


def _read_maps(path: str):
    """Maps, inputs and image records from an `onnxplain explain -o FILE.npz` file."""
    from .modelfile import regular_file

    regular_file(Path(path), "maps file", InputError)
    try:
        with np.load(path, allow_pickle=False) as z:
            maps, x, record = z["attributions"], z["inputs"], json.loads(str(z["record"]))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: not a maps file from `onnxplain explain -o FILE.npz` ({e})") from None
    if maps.shape[0] != x.shape[0]:
        raise InputError(f"{path}: {maps.shape[0]} maps for {x.shape[0]} inputs")
    return x, {record.get("method", "maps"): maps}, record.get("images", [{}] * len(x))


def _factory(spec: str):
    """MODULE:FACTORY (a dotted module or a .py file) -> FACTORY() for a class or function, the
    object itself otherwise. The user's own code, run because they named it."""
    import importlib
    import importlib.util

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:build or net.py:build")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"{spec!r}: no such file {path}")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UsageError(f"{spec!r}: cannot import {module_name} ({e})") from None
    if not hasattr(module, attr):
        raise UsageError(f"{spec!r}: {module_name} has no attribute {attr}")
    obj = getattr(module, attr)
    import inspect

    # A class or a function is a factory (called with no arguments); anything else is the model.
    return obj() if inspect.isclass(obj) or inspect.isroutine(obj) else obj


def _cmd_export(args) -> int:
    from .atomic import refuse_overwrite

    out = Path(args.output)
    labels = None
    if args.labels:
        labels = [ln.strip() for ln in Path(args.labels).read_text().splitlines() if ln.strip()]
    kw = {"mean": args.mean, "std": args.std, "labels": labels, "opset": args.opset}
    if args.range:
        kw["input_range"] = tuple(args.range)
    if args.framework == "torch":
        from exporters import torch as torch_export

        if not args.input_shape:
            raise UsageError("export torch: give --input-shape C H W (one example, no batch axis)")
        refuse_overwrite(out, [args.source.rpartition(":")[0]], "-o")
        report = torch_export.export(_factory(args.source), out, input_shape=tuple(args.input_shape), **kw)
    else:
        import keras

        from exporters import keras as keras_export

        refuse_overwrite(out, [args.source], "-o")
        source = Path(args.source)
        if source.suffix in (".keras", ".h5"):
            model = keras.saving.load_model(source, compile=False)
        else:
            model = _factory(args.source)
        if args.input_shape:
            kw["input_shape"] = tuple(args.input_shape)
        report = keras_export.export(model, out, **kw)
    print(printable(str(report)))
    return 0


def _cmd_demo(args) -> int:
    from models import demo

    return demo.main(["--out", args.out] + (["--quick"] if args.quick else []))


def _audit_db(path: str) -> Path:
    p = Path(path)
    return p / "audit.sqlite" if p.is_dir() else p


def _cmd_report(args) -> int:
    from .atomic import atomic_write_bytes, refuse_overwrite
    from .audit import AuditStore
    from .audit.report import audit_report, compare_stores, summarise

    db = _audit_db(args.audit)
    with AuditStore(db, create=False) as store:
        if args.against:
            with AuditStore(_audit_db(args.against), create=False) as other:
                result = compare_stores(store, other, top_fraction=args.top_fraction)
            text = json.dumps(result)
            if args.output:
                refuse_overwrite(args.output, [db, _audit_db(args.against)], "-o")
                atomic_write_bytes(Path(args.output), text.encode())
            if args.json or not args.output:
                print(text)
            return 0
        if args.json:
            s = summarise(store)
            print(json.dumps({k: v for k, v in s.items() if not k.startswith("_")}))
            return 0
        out = Path(args.output or db.with_name("report.html"))
        refuse_overwrite(out, [db], "-o")
        atomic_write_bytes(out, audit_report(store).encode())
    print(f"wrote {printable(out)}")
    return 0


def _cmd_compare(args) -> int:
    from . import load
    from .atomic import refuse_overwrite
    from .images import expand_paths, read_images
    from .methods import METHODS
    from .report.compare import compare_to_dir

    methods = args.method or ["saliency"]
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"-m/--method {m!r} is not a method; known: {', '.join(METHODS)}")
    params = _params(args.params, args.param, methods)
    images = expand_paths(args.images)
    out = Path(args.out)
    refuse_overwrite(out, [args.model_a, args.model_b, *images], "-o")
    a, b = load(args.model_a), load(args.model_b)
    xa, _ = read_images(images, a.input_shape, a.layout, a.input_range)
    xb, _ = read_images(images, b.input_shape, b.layout, b.input_range)
    result = compare_to_dir(
        a,
        b,
        images,
        xa,
        xb,
        methods,
        params,
        out,
        output=args.output,
        top_fraction=args.top_fraction,
        progress=_progress(args),
    )
    if args.json:
        print(json.dumps(result))
        return 0
    agree = result["models_agree"]
    print(
        f"models: max |logit difference| {agree['max_abs_logit_diff']:.3g} "
        f"({agree['relative_logit_diff']:.3g} of scale), top-1 agreement {agree['top1_agreement']:.0%}, "
        f"mean KL {agree['mean_kl']:.3g}"
    )
    for m, d in result["methods"].items():
        if "error" in d:
            print(f"{m}: not compared ({printable(d['error'])})")
            continue
        g = d["aggregate"]
        print(
            f"{m}: Spearman {g['spearman']['mean']:.4f}, top-{args.top_fraction:.0%} intersection "
            f"{g['top_k_intersection']['mean']:.3f}, SSIM {g['ssim']['mean']:.4f}, "
            f"max |diff| {g['max_abs_diff_relative']['mean']:.3g} of scale"
        )
    print(f"wrote {printable(out / 'report.html')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxplain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Explain ONNX classifiers.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage error, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("builder", help="manage the gradient-builder interpreter")
    p.add_argument("action", choices=["install", "show"])
    p.add_argument("--path", help="venv folder (default: the user data directory)")
    p.add_argument("--force", action="store_true", help="replace a broken or foreign builder folder")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_cmd_builder)

    p = sub.add_parser("cache", help="list or clear the compiled gradient models")
    p.add_argument("action", choices=["list", "clear"])
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("compile", help="write a standalone gradient model (explain anywhere)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rule", default="gradient", choices=list(RULES))
    p.add_argument("--layer", help="tap a tensor for Grad-CAM ('auto': the last conv feature map)")
    p.add_argument("--no-self-check", action="store_true")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("info", help="what onnxplain reads from a model")
    p.add_argument("model")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("predict", help="top-k predictions for image files")
    p.add_argument("model")
    p.add_argument("--gradient-model", help=argparse.SUPPRESS)
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=_positive_int, default=5)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "explain", help="heatmaps, maps, records and an HTML report for image files, folders or globs"
    )
    p.add_argument("model")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument(
        "-m", "--method", action="append", help="repeat for several (default integrated_gradients)"
    )
    p.add_argument(
        "-o", "--out", default="onnxplain-out", help="a folder (default onnxplain-out) or a .npz file"
    )
    p.add_argument("--target", help="class index or class name (default: the top-1 prediction)")
    p.add_argument("--output", default="probability", choices=["probability", "logit", "log_probability"])
    p.add_argument("--params", help="method parameters as a JSON object, e.g. '{\"steps\": 32}'")
    p.add_argument(
        "--param", action="append", metavar="[METHOD.]NAME=VALUE", help="one parameter; repeatable"
    )
    p.add_argument("--gradient-model", help="a gradient model from `onnxplain compile`")
    p.add_argument(
        "--scale",
        choices=["own", "shared"],
        default="own",
        help="heatmap colours: each its own scale, or one scale per method across the images",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("compare", help="do two models of one task agree, and do their explanations?")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("-m", "--method", action="append", help="repeat for several (default saliency)")
    p.add_argument("-o", "--out", default="onnxplain-compare", help="output folder")
    p.add_argument("--output", default="probability", choices=["probability", "logit", "log_probability"])
    p.add_argument("--params", help="method parameters as a JSON object")
    p.add_argument("--param", action="append", metavar="[METHOD.]NAME=VALUE")
    p.add_argument("--top-fraction", type=float, default=0.05, help="share of pixels for top-k intersection")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("evaluate", help="score methods' maps with metrics (insertion, deletion, SIC, ...)")
    p.add_argument("model")
    p.add_argument("images", nargs="*", help="image files, folders or glob patterns")
    p.add_argument("-m", "--method", action="append", help="repeat for several (default saliency)")
    p.add_argument("--maps", help="score the maps of an `explain -o FILE.npz` instead")
    p.add_argument("--metric", action="append", help="repeat for several")
    p.add_argument("-o", "--out", help="folder: results.json, curve plots, report.html")
    p.add_argument("--target", help="class index or label (default: each image's top-1 class)")
    p.add_argument("--output", default="probability", choices=["probability", "logit", "log_probability"])
    p.add_argument("--params", help="method/metric parameters as a JSON object")
    p.add_argument("--param", action="append", metavar="[NAME.]KEY=VALUE")
    p.add_argument("--gradient-model", help="a compiled gradient model (no builder needed)")
    p.add_argument(
        "--boxes",
        help='pointing game ground truth: JSON {"image.jpg": [[x_min, y_min, x_max, y_max], ...]} '
        "in the image's own pixels (inclusive), of the explained class",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="a PyTorch module or Keras model to ONNX, preprocessing baked in")
    p.add_argument("framework", choices=["torch", "keras"])
    p.add_argument(
        "source", help="torch: MODULE:FACTORY (or file.py:FACTORY); keras: MODEL.keras or MODULE:FACTORY"
    )
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--input-shape", type=int, nargs="+", help="one example, e.g. 3 224 224 (torch)")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean the model expects subtracted")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std the model expects divided by")
    p.add_argument("--range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="value range of the input")
    p.add_argument("--labels", help="a text file, one class name per line")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="the pretrained EfficientNet-Lite0 explained, evaluated and compared")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--quick", action="store_true", help="fewer methods and steps")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("audit", help="methods and metrics over a folder into a resumable SQLite store")
    p.add_argument("model")
    p.add_argument(
        "images", nargs="+", help="image files, folders or glob patterns (with --ray-data: also URIs)"
    )
    p.add_argument("-m", "--method", action="append", help="repeat for several (default saliency)")
    p.add_argument("--metric", action="append", help="repeat for several (each scores every method)")
    p.add_argument("--out", "-o", default="onnxplain-audit", help="folder: audit.sqlite, report.html")
    p.add_argument("--target", help="class index or label (default: each image's top-1 class)")
    p.add_argument("--output", default="probability", choices=["probability", "logit", "log_probability"])
    p.add_argument("--params", help="method/metric parameters as a JSON object")
    p.add_argument("--param", action="append", metavar="[NAME.]KEY=VALUE")
    p.add_argument("--chunk", type=int, default=8, help="images per batch (part of each result's key)")
    p.add_argument("--gradient-model", help="a compiled gradient model (no builder needed)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on a Ray cluster: ADDRESS (auto, HOST:6379, ray://HOST:10001) or none/local for a "
        "local one on 127.0.0.1",
    )
    p.add_argument("--workers", type=int, help="Ray actors, each with its own Classifier (default 2)")
    p.add_argument(
        "--ray-data",
        action="store_true",
        help="with --ray: Ray Data reads the IMAGES' bytes on the cluster (URIs such as "
        "s3://BUCKET/PREFIX/, folders recursively, files, local glob patterns); the actors decode them",
    )
    p.add_argument("--parquet", metavar="DIR", help="also write the results as Parquet files into DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("audit-export", help="an audit's results as Parquet files (one row per result)")
    p.add_argument("audit", help="an audit folder or its audit.sqlite")
    p.add_argument("out", help="folder for predictions, maps, metrics and images .parquet")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_audit_export)

    p = sub.add_parser("report", help="the HTML report of an audit database (or two audits compared)")
    p.add_argument("audit", help="an audit folder or its audit.sqlite")
    p.add_argument("--against", help="a second audit (another model version): compare the two")
    p.add_argument("-o", "--output", help="report file (default: report.html beside the database)")
    p.add_argument("--top-fraction", type=float, default=0.05)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("annotate", help="write onnxplain metadata (and baked-in normalisation) into a copy")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--layout", choices=["NCHW", "NHWC"])
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean the model expects subtracted")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std the model expects divided by")
    p.add_argument("--range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="value range of the input")
    p.add_argument("--labels", help="a text file, one class name per line")
    p.set_defaults(func=_cmd_annotate)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"onnxplain: error: {printable(message)}", file=sys.stderr)
    return code


def _catalogue() -> str:
    """The methods and metrics with their defaults, for the top-level --help."""
    from .methods import METHODS, method_parameters
    from .metrics import METRICS, metric_parameters

    def line(name: str, params: dict) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items() if k != "output")
        return f"  {name}: {shown}" if shown else f"  {name}"

    lines = ["methods (-m NAME, --param NAME=VALUE):"]
    lines += [line(m, method_parameters(m)) for m in METHODS]
    lines += ["metrics (--metric NAME):"]
    lines += [line(m, metric_parameters(m)) for m in METRICS] or ["  none"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv in (["-h"], ["--help"]):  # only the top-level help imports the methods
        parser.epilog = f"{_catalogue()}\n\n{parser.epilog}"
    args = parser.parse_args(argv)  # argparse itself exits 2 on a usage error
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("onnxplain: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `onnxplain ... | head`: the reader left, nothing to report
        return EXIT_FAILURE
    except Exception as e:
        if os.environ.get("ONNXPLAIN_DEBUG"):
            raise
        if isinstance(e, (UsageError, OverwriteError)):
            return _fail(str(e), EXIT_USAGE)
        if isinstance(e, OnnxplainError):
            return _fail(str(e), EXIT_FAILURE)
        # Not raised on purpose: an onnxruntime or protobuf exception, an OS error, or a bug.
        kind = type(e).__name__
        if isinstance(e, OSError):
            return _fail(f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e), EXIT_FAILURE)
        return _fail(f"{kind}: {e} (ONNXPLAIN_DEBUG=1 shows the traceback)", EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
