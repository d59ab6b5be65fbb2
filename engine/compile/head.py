"""The loss head appended to a classifier before the build, and the intermediate taps.

Per row n the score is  s_n = Σ_k W[n,k] · (m0 · z + m1 · softmax(z) + m2 · log_softmax(z))[n,k]
where z are the logits, W the class weights (one-hot of the target in practice) and m the output
mix (one-hot of logit / probability / log-probability). One graph serves all three outputs and
any class per row, chosen at run time; the loss is Σ_n s_n, so d loss / d x_n = d s_n / d x_n
because rows do not interact in an eval-mode classifier.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASS_WEIGHTS = "onnxplain_class_weights"
OUTPUT_MIX = "onnxplain_output_mix"
SCORES = "onnxplain_scores"
LOSS = "onnxplain_loss"
TAP = "onnxplain_tap"
TAP_DELTA = "onnxplain_tap_delta"
OUTPUT_INDEX = {"logit": 0, "probability": 1, "log_probability": 2}


def gradient_name(name: str) -> str:
    return name + "_grad"


def add_head(model: onnx.ModelProto, logits: str, num_classes: int, batch_dim) -> None:
    g = model.graph
    g.input.append(helper.make_tensor_value_info(CLASS_WEIGHTS, TensorProto.FLOAT, [batch_dim, num_classes]))
    g.input.append(helper.make_tensor_value_info(OUTPUT_MIX, TensorProto.FLOAT, [3]))

    def init(name, arr):
        g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))

    for i in range(3):
        init(f"onnxplain/mix_index_{i}", np.array(i, np.int64))
    init("onnxplain/axis_1", np.array([1], np.int64))
    nodes = [
        helper.make_node("Softmax", [logits], ["onnxplain/prob"], axis=-1),
        helper.make_node("LogSoftmax", [logits], ["onnxplain/log_prob"], axis=-1),
    ]
    terms = []
    for i, src in enumerate([logits, "onnxplain/prob", "onnxplain/log_prob"]):
        nodes += [
            helper.make_node(
                "Gather", [OUTPUT_MIX, f"onnxplain/mix_index_{i}"], [f"onnxplain/mix_{i}"], axis=0
            ),
            helper.make_node("Mul", [src, f"onnxplain/mix_{i}"], [f"onnxplain/term_{i}"]),
        ]
        terms.append(f"onnxplain/term_{i}")
    nodes += [
        helper.make_node("Add", terms[:2], ["onnxplain/mixed01"]),  # no Sum gradient in the builder
        helper.make_node("Add", ["onnxplain/mixed01", terms[2]], ["onnxplain/mixed"]),
        helper.make_node("Mul", ["onnxplain/mixed", CLASS_WEIGHTS], ["onnxplain/weighted"]),
        helper.make_node("ReduceSum", ["onnxplain/weighted", "onnxplain/axis_1"], [SCORES], keepdims=0),
        helper.make_node("ReduceSum", [SCORES], [LOSS], keepdims=0),
    ]
    for i, n in enumerate(nodes):
        n.name = n.name or f"onnxplain/head_{i}"
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, [batch_dim]))
    g.output.append(helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []))


def add_tap(model: onnx.ModelProto, tensor: str, dims: list) -> None:
    """Expose ``tensor`` and make its gradient computable: consumers read tensor + delta, where
    delta is a new input fed with zeros; d loss / d delta = d loss / d tensor."""
    g = model.graph
    tapped = "onnxplain/tapped"
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = tapped
    for out in g.output:
        if out.name == tensor:
            raise ValueError(f"tap {tensor!r} is a graph output; choose an intermediate tensor")
    g.input.append(helper.make_tensor_value_info(TAP_DELTA, TensorProto.FLOAT, dims))
    g.node.append(helper.make_node("Add", [tensor, TAP_DELTA], [tapped], name="onnxplain/tap_add"))
    g.node.append(helper.make_node("Identity", [tensor], [TAP], name="onnxplain/tap_identity"))
    g.output.append(helper.make_tensor_value_info(TAP, TensorProto.FLOAT, dims))


# Ops that keep a feature map a feature map: the Grad-CAM layer search walks through them.
_ELEMENTWISE = {
    "Relu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "Elu",
    "HardSwish",
    "HardSigmoid",
    "BatchNormalization",
    "Mul",
    "Add",
    "Identity",
    "Gelu",
    "Erf",
    "Div",
    "Selu",
    "PRelu",
}


def last_feature_map(model: onnx.ModelProto, shapes: dict) -> str:
    """The last convolutional feature map: the output of the last Conv followed through the
    element-wise ops (activation, BatchNorm) that keep its shape."""
    g = model.graph
    convs = [n for n in g.node if n.op_type == "Conv"]
    if not convs:
        raise ValueError("the model has no Conv node; name the Grad-CAM layer explicitly")
    tensor = convs[-1].output[0]
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    while True:
        users = consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type not in _ELEMENTWISE:
            break
        nxt = users[0].output[0]
        if shapes.get(nxt) != shapes.get(tensor):
            break
        tensor = nxt
    return tensor
