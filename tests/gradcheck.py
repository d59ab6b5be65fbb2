"""Helpers: export a torch module, load it with onnxplain, compare gradients with torch autograd."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import torch

import engine

OUTPUT_FN = {
    "logit": lambda z: z,
    "probability": lambda z: z.softmax(-1),
    "log_probability": lambda z: z.log_softmax(-1),
}


def export(module: torch.nn.Module, input_shape, folder: Path, opset: int = 17, batch: int = 2) -> Path:
    """Plain torch.onnx export with a dynamic batch (no onnxplain exporter: the compiler must
    handle whatever torch writes)."""
    path = Path(folder) / f"m_{uuid.uuid4().hex[:8]}.onnx"
    x = torch.randn(batch, *input_shape)
    torch.onnx.export(
        module.eval(),
        x,
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    return path


def torch_gradient(module, x: np.ndarray, target: np.ndarray, output: str = "logit", hooks=None):
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    z = module(xt)
    f = OUTPUT_FN[output](z)
    score = f[torch.arange(len(x)), torch.as_tensor(target)]
    score.sum().backward()
    return score.detach().numpy(), xt.grad.numpy()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the scale of b."""
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a - b))) / scale


def check_module(
    module,
    input_shape,
    folder,
    *,
    batch: int = 3,
    outputs=("logit", "probability"),
    rtol: float = 1e-4,
    seed: int = 0,
    low: float = -1.0,
    high: float = 1.0,
):
    """Compile ``module`` and assert its input gradients match torch autograd for every output."""
    module = module.eval()
    path = export(module, input_shape, folder)
    clf = engine.load(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, size=(batch, *input_shape)).astype(np.float32)
    target = rng.integers(0, clf.num_classes, batch)
    errors = {}
    for output in outputs:
        scores, grads = clf.gradient(x, target, output=output)
        ref_scores, ref_grads = torch_gradient(module, x, target, output)
        errors[output] = relative_error(grads, ref_grads)
        assert relative_error(scores, ref_scores) <= 1e-5, output
        assert errors[output] <= rtol, f"{output}: relative gradient error {errors[output]:.3g} > {rtol}"
    return clf, errors
