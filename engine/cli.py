"""The onnxplain command."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _cmd_builder(args) -> int:
    from .compile import builder

    if args.action == "install":
        py = builder.install(args.path, quiet=not args.verbose)
        print(f"builder interpreter: {py}")
    else:
        print(f"builder interpreter: {builder.builder_python()} (onnxruntime {builder.version()})")
    return 0


def _cmd_compile(args) -> int:
    from .compile import compile_to_file

    info = compile_to_file(
        args.model, args.output, rule=args.rule, layer=args.layer, self_check=not args.no_self_check
    )
    check = info.self_check or {"status": "not run"}
    print(
        f"wrote {args.output}: rule {info.rule}, {info.num_classes} classes, lowered "
        f"{', '.join(info.lowered_ops) or 'nothing'}; self-check {check['status']}"
    )
    if check.get("status") == "passed":
        g = check[info.input_gradient]
        print(
            f"  input gradient max abs error vs the builder's graph: {g['max_abs_error']:.3g} "
            f"(scale {g['scale']:.3g})"
        )
    elif check.get("reason"):
        print(f"  reason: {check['reason']}")
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
        "labels": (clf.labels or [])[:5],
        "source_framework": clf.info.source_framework,
        "preprocessing": clf.info.preprocessing,
        "batch_size": clf.batch_size,
        "providers": clf.providers,
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_predict(args) -> int:
    from .images import load_images

    clf = _load(args)
    x = load_images(args.images, clf.input_shape, clf.layout, clf.input_range)
    logits = clf.predict(x)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    for path, row in zip(args.images, p):
        print(path)
        for k in np.argsort(-row)[: args.top]:
            label = clf.labels[k] if clf.labels else str(k)
            print(f"  {row[k]:7.2%}  {k:5d}  {label}")
    return 0


def _cmd_explain(args) -> int:
    import platform

    from . import __version__, explain
    from .atomic import atomic_write_bytes
    from .images import load_images

    clf = _load(args)
    x = load_images(args.images, clf.input_shape, clf.layout, clf.input_range)
    params = json.loads(args.params) if args.params else {}
    target = None if args.target is None else int(args.target)
    maps = explain(clf, x, args.method, target=target, output=args.output, **params)
    record = {  # enough to reproduce the maps from the record alone
        "onnxplain": __version__,
        "model": str(args.model),
        "model_sha256": clf.sha256,
        "method": args.method,
        "params": params,
        "target": target,
        "output": args.output,
        "images": list(args.images),
        "providers": clf.providers,
        "python": platform.python_version(),
    }
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, attributions=maps, inputs=x, record=json.dumps(record))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}: {args.method} maps {maps.shape}, record {json.dumps(record)[:120]}...")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="onnxplain", description="Explain ONNX classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("builder", help="manage the gradient-builder interpreter")
    p.add_argument("action", choices=["install", "show"])
    p.add_argument("--path", help="venv folder (default: the user data directory)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_cmd_builder)

    p = sub.add_parser("compile", help="write a standalone gradient model (explain anywhere)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rule", default="gradient", choices=["gradient", "guided_backprop", "deconvnet"])
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
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("explain", help="attribution maps for image files, saved as .npz with a record")
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("-m", "--method", default="integrated_gradients")
    p.add_argument("-o", "--out", default="attributions.npz")
    p.add_argument("--target", help="class index (default: the top-1 prediction)")
    p.add_argument("--output", default="probability", choices=["probability", "logit", "log_probability"])
    p.add_argument("--params", help="method parameters as JSON, e.g. '{\"steps\": 32}'")
    p.add_argument("--gradient-model", help="a gradient model from `onnxplain compile`")
    p.set_defaults(func=_cmd_explain)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, TypeError) as e:
        print(f"onnxplain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
