"""Sanity-check cascade on EfficientNet-Lite0: weights replaced without recompiling, in one run.

Rows (ratios ours / peer, lower is better):
1. one randomised model — ``Classifier.with_initializers`` + its first saliency call (new
   sessions over the same compiled graphs) vs writing the weights into a model file and
   compiling it afresh (+ the same call); the maps must agree bit for bit;
2. a cascade over the last ``--blocks`` blocks, saliency of ``--batch`` photos per step — ours vs
   torch (copy the randomised weights in with ``load_state_dict``, autograd per step) on the
   same network.

    python -m bench.sanity [--blocks 5] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "onnxplain-bench"))
    args = parser.parse_args(argv)

    import onnx
    import torch
    from onnx import numpy_helper

    import engine
    from bench.common import (
        Row,
        efficientnet_onnx,
        photo_batch,
        prepare_workdir,
        print_table,
        relative_difference,
        relative_l2,
        torch_efficientnet,
    )
    from engine.initializers import find_blocks, initializer_values, redraw
    from engine.metrics.sanity import sanity_check

    torch.set_num_threads(args.threads)
    work = prepare_workdir(args.workdir)
    path = efficientnet_onnx(work)
    clf = engine.load(path, providers=["CPUExecutionProvider"], threads=args.threads)
    x = photo_batch(args.batch)
    target = clf.predict(x).argmax(axis=1)
    clf.gradient(x[:1], 0)  # the trained model's gradient model compiled (or cached) before timing

    proto = clf.onnx_model
    blocks = find_blocks(proto)[-args.blocks :]
    values = initializer_values(proto)
    new: dict[str, np.ndarray] = {}
    for block in blocks:
        new.update(redraw(values, block, seed=0))

    # 1. one randomised model: replace vs recompile
    start = time.perf_counter()
    ours_map = clf.with_initializers(new).gradient(x, target, output="probability")[1]
    ours_s = time.perf_counter() - start
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    fresh = Path(tempfile.mkdtemp(dir=work)) / "randomised.onnx"
    onnx.save(model, fresh)
    start = time.perf_counter()
    peer_map = engine.load(fresh, providers=["CPUExecutionProvider"], threads=args.threads).gradient(
        x, target, output="probability"
    )[1]
    peer_s = time.perf_counter() - start
    rows = [
        Row(
            "randomise+saliency",
            "recompile+saliency",
            ours_s,
            peer_s,
            0.2,
            relative_difference(ours_map, peer_map),
            relative_l2(ours_map, peer_map),
        )
    ]

    # 2. the cascade: ours (the trained map + one saliency run per step) vs torch
    start = time.perf_counter()
    report = sanity_check(
        clf, x, "saliency", target=target, modes=("cascading",), blocks=[b.name for b in blocks]
    )
    ours_s = time.perf_counter() - start
    net = torch_efficientnet()
    xt = torch.tensor(x)

    def torch_saliency(module):
        inp = xt.clone().requires_grad_(True)
        p = module(inp).softmax(-1)[torch.arange(len(x)), torch.as_tensor(target)]
        p.sum().backward()
        return inp.grad.numpy()

    start = time.perf_counter()
    torch_saliency(net)
    randomised = copy.deepcopy(net)
    rng = np.random.default_rng(0)
    layers = [m for m in randomised.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][
        -args.blocks :
    ]
    for layer in reversed(layers):
        with torch.no_grad():
            w = layer.weight
            layer.weight.copy_(torch.tensor(rng.normal(float(w.mean()), float(w.std()), tuple(w.shape))))
        torch_saliency(randomised)
    peer_s = time.perf_counter() - start
    nan = float("nan")  # different weights on the two sides: the maps are not compared
    rows.append(
        Row(f"cascade {args.blocks} blocks", "torch load weights+autograd", ours_s, peer_s, 1.0, nan, nan)
    )
    print_table(rows)
    print(
        f"final cascade step: mean spearman_abs {report.final().mean()['spearman_abs']:.3f}, "
        f"ssim {report.final().mean()['ssim']:.3f} (batch {args.batch}, {args.threads} threads)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
