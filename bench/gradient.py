"""Forward + input gradient of EfficientNet-Lite0 at 224x224, batch 16, 2 threads, medians.

onnxplain (lowered graph on onnxruntime) vs torch autograd vs onnxruntime-training on the
builder's own graph, all in one run; printed as ratios. Targets (issue 2): onnxplain <= 0.3x torch
autograd, and its gradient call <= 3x the forward-only call of the same model.

    python -m bench.gradient [--batch 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: session initialisation, allocator growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "onnxplain-bench"))
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ONNXPLAIN_CACHE_DIR", str(work / "cache"))

    import torch

    import engine
    from engine.compile import builder, builder_graph, head
    from models.efficientnet import MEAN, STD, export_efficientnet_lite0, load_efficientnet_lite0
    from models.images import sample_images

    torch.set_num_threads(args.threads)
    onnx_path = work / "efficientnet_lite0.onnx"
    if not onnx_path.exists():
        export_efficientnet_lite0(onnx_path)
    photos, _ = sample_images(size=224)
    x = np.concatenate([photos] * (args.batch // len(photos) + 1))[: args.batch].astype(np.float32)

    clf = engine.load(
        onnx_path, providers=["CPUExecutionProvider"], threads=args.threads, batch_size=args.batch
    )
    target = clf.predict(x).argmax(1)
    results = {
        "forward": median_seconds(lambda: clf.predict(x), args.repeats),
        "onnxplain": median_seconds(lambda: clf.gradient(x, target, output="logit"), args.repeats),
    }

    module = load_efficientnet_lite0().eval()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    def torch_gradient():
        xt = torch.tensor(x, requires_grad=True)
        z = module((xt - mean) / std)
        z[torch.arange(len(x)), torch.as_tensor(target)].sum().backward()
        return xt.grad

    # as a module comes (what captum and most users run: weight gradients are computed too) ...
    results["torch_autograd_default"] = median_seconds(torch_gradient, args.repeats)
    module.zero_grad(set_to_none=True)
    # ... and with frozen parameters, input gradients only: the strict comparison
    module.requires_grad_(False)
    results["torch_autograd"] = median_seconds(torch_gradient, args.repeats)
    ours = clf.gradient(x, target, output="logit")[1]
    results["max_rel_diff_vs_torch"] = float(
        np.abs(ours - torch_gradient().numpy()).max() / np.abs(ours).max()
    )

    # onnxruntime-training on its own (unlowered) graph, timed inside the builder interpreter
    graph, mf = builder_graph(onnx_path)
    import onnx

    onnx.save(graph, work / "builder_graph.onnx")
    feeds = {
        mf.input_name: x,
        head.CLASS_WEIGHTS: np.eye(clf.num_classes, dtype=np.float32)[target],
        head.OUTPUT_MIX: np.array([1, 0, 0], np.float32),
    }
    np.savez(work / "feeds.npz", **feeds)
    answer = builder.call(
        {
            "op": "run",
            "model": str(work / "builder_graph.onnx"),
            "feeds": str(work / "feeds.npz"),
            "outputs": [mf.input_name + "_grad"],
            "repeat": args.repeats,
            "threads": args.threads,
        }
    )
    results["onnxruntime_training"] = statistics.median(answer["seconds"])

    print(
        f"EfficientNet-Lite0 224x224, batch {args.batch} (onnxplain chunks of {clf.batch_size}), "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"{'what':40s} {'seconds':>8s} {'ratio':>8s}")
    rows = [
        ("forward only (onnxplain predict)", results["forward"], None),
        ("forward + gradient, onnxplain", results["onnxplain"], None),
        ("forward + gradient, torch (module as is)", results["torch_autograd_default"], None),
        ("forward + gradient, torch (frozen params)", results["torch_autograd"], None),
        ("forward + gradient, onnxruntime-training", results["onnxruntime_training"], None),
    ]
    for name, secs, _ in rows:
        print(f"{name:40s} {secs:8.3f}")
    # The target's torch baseline is autograd on the module as it comes (design/lowering.md measured
    # 1.8-2.4 s for it); frozen parameters are the stricter comparison, printed beside it.
    ratios = {
        "onnxplain / torch, module as is (target <= 0.3)": results["onnxplain"]
        / results["torch_autograd_default"],
        "onnxplain / torch, frozen params (strict)": results["onnxplain"] / results["torch_autograd"],
        "onnxplain / onnxruntime-training": results["onnxplain"] / results["onnxruntime_training"],
        "onnxplain gradient / forward (target <= 3)": results["onnxplain"] / results["forward"],
    }
    for name, r in ratios.items():
        print(f"{name:50s} {r:6.2f}x")
    print(f"gradient agreement with torch: max |diff| / max |grad| = {results['max_rel_diff_vs_torch']:.2e}")
    results["ratios"] = ratios
    (work / "gradient_bench.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
