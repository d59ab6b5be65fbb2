"""Small hand-built ONNX classifiers for the untrusted-input tests (no framework needed).

``linear_model``: x (N, 3, 4, 4) -> Flatten -> MatMul W (48, K) -> Add b -> logits (N, K), so the
logit gradient is a row of W, in closed form. Its weights can live in an external-data file and
its bias inside an If subgraph (where the old confinement never looked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPE = (3, 4, 4)
FEATURES = 48


def weights(k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (FEATURES, k)).astype(np.float32), rng.normal(0, 1, k).astype(np.float32)


def external(name: str, array: np.ndarray, location: str, offset: int = 0) -> TensorProto:
    """A tensor whose bytes live at ``location`` (relative to the model's folder)."""
    t = numpy_helper.from_array(array, name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        t.external_data.add(key=key, value=value)
    return t


def linear_model(
    w: np.ndarray,
    b: np.ndarray,
    *,
    w_location: str | None = None,
    bias_in_if: bool = False,
    bias_location: str | None = None,
    labels: list[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    k = w.shape[1]
    w_init = external("W", w, w_location) if w_location else numpy_helper.from_array(w, "W")
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "W"], ["mm"], name="matmul"),
    ]
    inits = [w_init]
    if bias_in_if:
        bias = external("B", b, bias_location) if bias_location else numpy_helper.from_array(b, "B")
        branch = helper.make_graph(
            [helper.make_node("Identity", ["B"], ["b_out"], name="bias_identity")],
            "then_bias",
            [],
            [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [k])],
            initializer=[bias],
        )
        zeros = helper.make_graph(
            [helper.make_node("Identity", ["Z"], ["z_out"], name="zero_identity")],
            "else_bias",
            [],
            [helper.make_tensor_value_info("z_out", TensorProto.FLOAT, [k])],
            initializer=[numpy_helper.from_array(np.zeros(k, np.float32), "Z")],
        )
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(
            helper.make_node("If", ["cond"], ["bias"], name="bias_if", then_branch=branch, else_branch=zeros)
        )
    else:
        inits.append(numpy_helper.from_array(b, "bias"))
    nodes.append(helper.make_node("Add", ["mm", "bias"], ["logits"], name="add"))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    props = {"onnxplain.layout": '"NCHW"', "onnxplain.input_range": "[0, 1]"}
    if labels is not None:
        import json

        props["onnxplain.labels"] = json.dumps(labels)
    props.update(metadata or {})
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write the proto as is (onnx.save would try to resolve external data itself)."""
    path.write_bytes(model.SerializeToString())
    return path


def logits(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64) @ w.astype(np.float64) + b
