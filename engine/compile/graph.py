"""Small ONNX graph helpers shared by the prepass, the head and the lowering."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from .domains import STANDARD_DOMAINS


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            return imp.version
    raise ValueError("model has no default-domain opset import")


def is_standard(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a standard ONNX op (not com.microsoft or another custom domain)."""
    return node.domain in STANDARD_DOMAINS


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """name -> dims (int, symbolic str, or None when unknown) for every tensor shape inference reaches."""
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is a convenience: lowering falls back to dynamic forms
        inferred = model
    shapes: dict[str, list[int | str | None]] = {}
    g = inferred.graph
    for vi in itertools.chain(g.input, g.value_info, g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


class GraphContext:
    """Fresh names, constants and static facts about one graph under rewrite."""

    def __init__(self, model: onnx.ModelProto, shapes: dict | None = None):
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.shapes = shapes if shapes is not None else infer_shapes(model)
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.producers = {o: n for n in self.graph.node for o in n.output if o}
        self._used = {n for node in self.graph.node for n in (*node.input, *node.output)}
        self._used |= set(self.initializers) | {i.name for i in self.graph.input}
        self._counter = itertools.count()
        self.new_initializers: list[TensorProto] = []

    def fresh(self, hint: str) -> str:
        while True:
            name = f"onnxplain/{hint}_{next(self._counter)}"
            if name not in self._used:
                self._used.add(name)
                return name

    def const(self, value, hint: str = "const", dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(arr, name)
        self.new_initializers.append(tensor)
        self.initializers[name] = tensor
        return name

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None. Identity chains are
        followed: torch.onnx merges equal tensors into one initializer and feeds the other uses
        through Identity nodes (DenseNet's BatchNorm parameters at their initial values)."""
        seen = set()
        while name not in self.initializers:
            node = self.producers.get(name)
            if node is None or name in seen:
                return None
            seen.add(name)
            if node.op_type == "Identity":
                name = node.input[0]
                continue
            if node.op_type == "Constant":
                return _constant_attribute(node)
            return None
        return numpy_helper.to_array(self.initializers[name])

    def rank(self, name: str) -> int | None:
        dims = self.shapes.get(name)
        return None if dims is None else len(dims)

    def spatial_static(self, name: str) -> list[int] | None:
        """Spatial dims (everything after N, C) when they are known integers, batch may be symbolic."""
        dims = self.shapes.get(name)
        if dims is None or len(dims) < 3:
            return None
        spatial = dims[2:]
        if any(not isinstance(d, int) or d <= 0 for d in spatial):
            return None
        return list(spatial)


def _constant_attribute(node: onnx.NodeProto) -> np.ndarray | None:
    """A Constant node's value, whichever attribute holds it (value, value_float(s), value_int(s))."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def eliminate_dead_code(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraph inputs captured from the outer scope
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(_outer_names(a.g))
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        needed.update(_outer_names(sg))
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
    return names


def prune_opset_imports(model: onnx.ModelProto) -> None:
    """Keep only the opset imports of domains the graph still uses."""
    used = {n.domain or "" for n in model.graph.node}
    used.add("")
    keep = [imp for imp in model.opset_import if (imp.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def topological_sort(model: onnx.ModelProto) -> None:
    """Order nodes so that every input is produced before use (lowered nodes are appended)."""
    g = model.graph
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input) and _subgraph_ready(node, available):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise ValueError(f"graph has a cycle or dangling inputs: {missing}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def _subgraph_ready(node, available) -> bool:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            inner = {o for n in a.g.node for o in n.output} | {i.name for i in a.g.initializer}
            inner |= {i.name for i in a.g.input}
            if not all(i in available or i in inner for n in a.g.node for i in n.input if i):
                return False
    return True
