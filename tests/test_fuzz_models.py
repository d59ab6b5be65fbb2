"""Property-based fuzzing of model files (hypothesis): the only outcomes allowed are a result or
one of onnxplain's own errors — never another exception type, never a read outside the folder.

Derandomised (same cases every run). ``ONNXPLAIN_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_models.py``
runs a longer search (``make fuzz``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import engine
from engine.errors import OnnxplainError
from tests.untrusted_models import SHAPE, external, linear_model, weights

EXAMPLES = int(os.environ.get("ONNXPLAIN_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
W, B = weights()
X = np.random.default_rng(0).uniform(0, 1, (2, *SHAPE)).astype(np.float32)
SECRET = b"TOPSECRET" * 64


def _outcome(source, **kwargs):
    """Load and predict; a result must be (2, K) finite logits, anything raised must be ours."""
    try:
        clf = engine.load(source, **kwargs)
        out = clf.predict(X)
    except OnnxplainError as e:
        assert str(e), "an error must say what is wrong"
        return None
    assert out.shape == (2, clf.num_classes) and out.dtype == np.float32
    return out


@pytest.fixture(scope="module")
def arena(tmp_path_factory) -> Path:
    """A model folder beside a secret the models must never read."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "secret.bin").write_bytes(SECRET)
    folder = root / "models"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(W.tobytes() + B.tobytes())
    (folder / "escape.bin").symlink_to(root / "secret.bin")
    return folder


@FUZZ
@given(data=st.data())
def test_mutated_bytes_are_a_result_or_our_error(data):
    base = bytearray(linear_model(W, B, labels=["a", "b", "c"]).SerializeToString())
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"] if base else ["insert"]))
        at = data.draw(st.integers(0, max(len(base) - 1, 0)))
        if kind == "flip":
            base[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del base[at:]
        elif kind == "insert":
            base[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif base:
            del base[at : at + data.draw(st.integers(1, 8))]
    _outcome(bytes(base))


_LOCATIONS = st.one_of(
    st.sampled_from(
        [
            "weights.bin",
            "escape.bin",
            "../secret.bin",
            "/etc/passwd",
            "./weights.bin",
            "sub/../weights.bin",
            "weights.bin\x00",
            "",
            ".",
            "..",
            "models/../../secret.bin",
            "missing.bin",
            "weights.bin/",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
)


@FUZZ
@given(
    location=_LOCATIONS,
    offset=st.one_of(st.just(0), st.integers(-10, 10**12)),
    length=st.one_of(st.none(), st.integers(-10, 10**12), st.just(W.nbytes)),
    depth=st.integers(0, 4),
    in_memory=st.booleans(),
)
def test_external_data_anywhere_never_leaves_the_folder(arena, location, offset, length, depth, in_memory):
    model = _nested(location, offset, length, depth)
    if in_memory:
        out = _outcome(model.SerializeToString(), base_dir=arena)
    else:
        path = arena / "m.onnx"
        path.write_bytes(model.SerializeToString())
        out = _outcome(path)
    if out is not None:  # whatever was read came from inside the folder: weights.bin's bytes
        resolved = (arena / location).resolve()
        assert resolved.is_relative_to(arena.resolve()), location
        assert not np.isin(np.frombuffer(SECRET[:36], np.float32), out).any()


def _nested(location: str, offset: int, length: int | None, depth: int) -> onnx.ModelProto:
    """The linear model whose weight lives at ``location``, declared ``depth`` If levels deep."""
    model = linear_model(W, B)
    w = external("W", W, "weights.bin")
    del w.external_data[:]
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="offset", value=str(offset))
    if length is not None:
        w.external_data.add(key="length", value=str(length))
    if depth == 0:
        del model.graph.initializer[0]
        model.graph.initializer.insert(0, w)
        return model
    # Replace the MatMul's W by the output of `depth` nested Ifs whose innermost branch holds W.
    inner_out = f"w{depth}"
    branch = helper.make_graph(
        [helper.make_node("Identity", ["W"], [inner_out], name=f"id{depth}")],
        f"b{depth}",
        [],
        [helper.make_tensor_value_info(inner_out, TensorProto.FLOAT, list(W.shape))],
        initializer=[w],
    )
    for level in range(depth - 1, 0, -1):
        out = f"w{level}"
        node = helper.make_node(
            "If", ["cond"], [out], name=f"if{level}", then_branch=branch, else_branch=branch
        )
        branch = helper.make_graph(
            [node], f"b{level}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(W.shape))]
        )
    g = model.graph
    del g.initializer[0]  # the plain W
    g.initializer.append(helper.make_tensor("cond", TensorProto.BOOL, [], [True]))
    g.node.insert(
        0, helper.make_node("If", ["cond"], ["W"], name="if0", then_branch=branch, else_branch=branch)
    )
    return model


_META_KEYS = st.sampled_from(
    [
        "onnxplain.labels",
        "onnxplain.layout",
        "onnxplain.input_range",
        "onnxplain.preprocessing",
        "onnxplain.source_framework",
        "onnxplain.export_max_abs_diff",
        "onnxplain.other",
    ]
)
_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    props=st.dictionaries(
        _META_KEYS,
        st.one_of(
            _JSONISH.map(repr), st.text(max_size=30), _JSONISH.map(lambda v: __import__("json").dumps(v))
        ),
        max_size=4,
    ),
    dims=st.lists(st.one_of(st.integers(-2, 50), st.text(max_size=3)), min_size=0, max_size=5),
)
def test_random_metadata_and_input_shapes_are_a_result_or_our_error(props, dims):
    model = linear_model(W, B)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    if dims:
        shape = model.graph.input[0].type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d
    _outcome(model)
