"""Reading a model file as untrusted input: size bounds, external data confined to the model's
folder, exactly one float input, one (N, K) output. Errors name the file and what is wrong."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

from .errors import ModelFileError

MAX_MODEL_BYTES = 4 * 1024**3


@dataclass
class ModelFile:
    path: Path | None
    model: onnx.ModelProto
    sha256: str
    input_name: str
    input_dims: list  # including the batch dim; ints or symbolic strings
    output_name: str
    num_classes: int

    @property
    def batch_dim(self):
        return self.input_dims[0]


def read_model(source: str | os.PathLike | onnx.ModelProto | bytes) -> ModelFile:
    """Load and validate a classifier. ``source``: a path, serialized bytes, or a ModelProto."""
    path = None
    if isinstance(source, onnx.ModelProto):
        model, data = source, source.SerializeToString()
        where = "model"
    elif isinstance(source, bytes):
        data, where = source, "model bytes"
        model = _parse(data, where)
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ModelFileError(f"{where}: no such model file")
        data = read_model_bytes(path)
        model = _parse(data, where)
        _load_external_data(model, path.parent, where)
    digest = hashlib.sha256(data).hexdigest()
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ModelFileError(f"{where}: not a valid ONNX model: {first}") from e
    return _describe(path, model, digest, where)


def read_model_bytes(path: Path) -> bytes:
    """The bytes of a model file, refusing missing files and files over the size limit."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: {size} bytes exceeds the {MAX_MODEL_BYTES}-byte limit")
    return path.read_bytes()


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError on truncated or corrupt bytes
        raise ModelFileError(f"{where}: not an ONNX model (corrupt or truncated protobuf: {e})") from e
    if not model.HasField("graph") or not model.graph.node:
        raise ModelFileError(f"{where}: not an ONNX model (no graph or an empty graph)")
    return model


def _load_external_data(model: onnx.ModelProto, folder: Path, where: str) -> None:
    """External tensors may only live in files inside the model's folder."""
    root = folder.resolve()
    tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    for t in tensors:
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if not location:
            raise ModelFileError(f"{where}: initializer {t.name!r} has external data without a location")
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise ModelFileError(
                f"{where}: initializer {t.name!r} points at external data {location!r} outside the "
                "model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelFileError(f"{where}: external data file {location!r} for {t.name!r} is missing")
    if tensors:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(root))
        except Exception as e:
            raise ModelFileError(f"{where}: could not read external data: {e}") from e


def _all_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def _describe(path, model, digest, where) -> ModelFile:
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelFileError(
            f"{where}: a classifier must have exactly one input, found {len(inputs)}: {names}"
        )
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        dtype = TensorProto.DataType.Name(inp.type.tensor_type.elem_type)
        raise ModelFileError(
            f"{where}: input {inp.name!r} has dtype {dtype}; onnxplain needs float32 "
            "inputs (differentiable); embed token ids outside the model"
        )
    dims = _dims(inp)
    if dims is None or len(dims) < 2:
        raise ModelFileError(f"{where}: input {inp.name!r} needs a known rank >= 2 (batch first), got {dims}")
    if len(g.output) != 1:
        raise ModelFileError(
            f"{where}: a classifier must have exactly one output (the logits), found "
            f"{[o.name for o in g.output]}"
        )
    out = g.output[0]
    odims = _dims(out)
    if odims is None or len(odims) != 2 or not isinstance(odims[1], int) or odims[1] < 2:
        raise ModelFileError(
            f"{where}: output {out.name!r} has shape {odims}; a classifier output must be (batch, K) "
            "logits with a static K >= 2"
        )
    if out.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelFileError(f"{where}: output {out.name!r} must be float32 logits")
    return ModelFile(path, model, digest, inp.name, dims, out.name, odims[1])


def _dims(vi):
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch") for d in t.shape.dim]
