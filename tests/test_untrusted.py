"""Untrusted model files and images, careless users: the bad-input matrix of issue #8.

Each case runs through the API and/or the CLI and asserts the error type, that the message
names the fault (file, option, variable, shape), and that nothing was written or left behind.
References are closed forms: the hand-built linear classifier of ``untrusted_models`` has
logits x·W + b and logit gradient W[:, k].
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.cli import main
from engine.errors import (
    BuilderError,
    ImageError,
    InputError,
    ModelFileError,
    OnnxplainError,
    OverwriteError,
    RuntimeFailure,
)
from tests.untrusted_models import SHAPE, linear_model, logits, save, weights

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 5, 3), np.uint8)).save(path)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------- 1. reading outside the folder


def test_subgraph_external_data_is_read_from_the_model_folder_never_the_cwd(tmp_path, monkeypatch):
    """The regression: an If-branch initializer naming secret.txt used to be read from the current
    directory by onnxruntime. Now it is resolved against the model's folder, where it is missing."""
    w, b = weights()
    cwd, models = tmp_path / "cwd", tmp_path / "models"
    cwd.mkdir(), models.mkdir()
    (cwd / "secret.txt").write_bytes(np.arange(3, dtype=np.float32).tobytes() * 1000)
    monkeypatch.chdir(cwd)
    path = save(linear_model(w, b, bias_in_if=True, bias_location="secret.txt"), models / "m.onnx")
    with pytest.raises(
        ModelFileError, match=r"'secret\.txt' for .*'then_branch': initializer 'B' is missing"
    ):
        engine.load(path)
    data = path.read_bytes()
    with pytest.raises(ModelFileError, match="external data.*base_dir"):
        engine.load(data)  # bytes: no folder at all unless the caller names one
    import onnx

    with pytest.raises(ModelFileError, match="external data.*base_dir"):
        engine.load(onnx.load_from_string(data))
    # The same file in the model's own folder is read, and its bytes are the bias.
    bias = np.array([0.5, -1.0, 2.0], np.float32)
    (models / "secret.txt").write_bytes(bias.tobytes())
    x = np.random.default_rng(1).uniform(0, 1, (2, *SHAPE)).astype(np.float32)
    for clf in (engine.load(path), engine.load(data, base_dir=models)):
        np.testing.assert_allclose(clf.predict(x), logits(w, bias, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "location, message",
    [
        ("/etc/passwd", "outside the model's folder"),
        ("../secret.bin", "outside the model's folder"),
        ("sub/../../secret.bin", "outside the model's folder"),
        ("link.bin", "outside the model's folder"),  # a symlink pointing out of the folder
        ("bad\x00name", "outside the model's folder"),
        ("pipe.bin", "not a regular file"),
        ("short.bin", "reads bytes 0..576 of 'short.bin', which has 8"),
        (".", "outside the model's folder"),
    ],
)
def test_external_data_locations_are_confined(tmp_path, location, message):
    w, b = weights()
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(w.tobytes())
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    os.mkfifo(folder / "pipe.bin")
    (folder / "short.bin").write_bytes(b"12345678")
    path = save(linear_model(w, b, w_location=location), folder / "m.onnx")
    with pytest.raises(ModelFileError, match=message) as err:
        engine.load(path)
    assert "m.onnx" in str(err.value) and "initializer 'W'" in str(err.value)


# --------------------------------------------------------------------- 2. stale gradients


def _gradient_of_logit(clf, x, k):
    return clf.gradient(x, k, output="logit")[1]


def test_changed_external_weights_change_the_cache_key_and_the_gradient(tmp_path, fresh_cache):
    w, b = weights()
    path = save(linear_model(w, b, w_location="weights.bin"), tmp_path / "m.onnx")
    (tmp_path / "weights.bin").write_bytes(w.tobytes())
    x = np.random.default_rng(2).uniform(0, 1, (2, *SHAPE)).astype(np.float32)
    first = engine.load(path)
    np.testing.assert_allclose(
        _gradient_of_logit(first, x, 1), np.broadcast_to(w[:, 1].reshape(SHAPE), x.shape)
    )
    standalone = tmp_path / "g.onnx"
    engine.compile.compile_to_file(path, standalone)
    w2 = (w * 3 + 1).astype(np.float32)
    (tmp_path / "weights.bin").write_bytes(w2.tobytes())  # the .onnx file is unchanged
    second = engine.load(path)
    assert second.sha256 != first.sha256
    np.testing.assert_allclose(second.predict(x), logits(w2, b, x), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        _gradient_of_logit(second, x, 1), np.broadcast_to(w2[:, 1].reshape(SHAPE), x.shape), rtol=1e-6
    )
    with pytest.raises(InputError, match="sha256"):  # the standalone model is bound to the old weights
        engine.load(path, gradient_model=standalone)


# --------------------------------------------------------------------- 3. outputs never overwrite inputs


@pytest.fixture
def linear_file(tmp_path):
    w, b = weights()
    return save(linear_model(w, b, labels=["cat", "dog", "fish"]), tmp_path / "m.onnx")


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink", "relative"])
def test_compile_refuses_to_overwrite_its_model(linear_file, tmp_path, how, monkeypatch, capsys):
    out = {"same": linear_file, "hardlink": tmp_path / "h.onnx", "symlink": tmp_path / "s.onnx"}.get(how)
    if how == "hardlink":
        os.link(linear_file, out)
    elif how == "symlink":
        out.symlink_to(linear_file)
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path("./sub/../m.onnx")
        (tmp_path / "sub").mkdir()
    before = _files(tmp_path)
    assert main(["compile", str(linear_file), "-o", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert _files(tmp_path) == before
    with pytest.raises(OverwriteError):
        engine.compile.compile_to_file(linear_file, out)


def test_compile_refuses_to_overwrite_external_data(tmp_path, capsys):
    w, b = weights()
    path = save(linear_model(w, b, w_location="weights.bin"), tmp_path / "m.onnx")
    (tmp_path / "weights.bin").write_bytes(w.tobytes())
    before = _files(tmp_path)
    assert main(["compile", str(path), "-o", str(tmp_path / "weights.bin")]) == 2
    assert "weights.bin" in capsys.readouterr().err and _files(tmp_path) == before


@pytest.mark.parametrize("victim", ["model", "image", "data"])
def test_explain_refuses_to_overwrite_an_input(tmp_path, victim, capsys):
    w, b = weights()
    path = save(linear_model(w, b, w_location="weights.bin"), tmp_path / "m.onnx")
    (tmp_path / "weights.bin").write_bytes(w.tobytes())
    img = _image(tmp_path / "a.png")
    out = {"model": path, "image": img, "data": tmp_path / "weights.bin"}[victim]
    before = _files(tmp_path)
    assert main(["explain", str(path), str(img), "-m", "saliency", "-o", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert _files(tmp_path) == before


# --------------------------------------------------------------------- 4. terminal injection


def test_labels_with_escape_sequences_are_printed_escaped(tmp_path, capsys):
    w, b = weights()
    w[:, 2] += 5  # class 2 wins, so its label is printed first
    evil = "fish\x1b[2J\x1b]0;owned\x07\u202e"
    path = save(linear_model(w, b, labels=["cat", "dog", evil]), tmp_path / "m.onnx")
    img = _image(tmp_path / "a.png")
    assert main(["predict", str(path), str(img), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "fish\\x1b[2J\\x1b]0;owned\\x07\\u202e" in out
    assert main(["info", str(path)]) == 0
    assert "\x1b" not in capsys.readouterr().out


# --------------------------------------------------------------------- CLI: options, exit codes


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--params", "{steps: 3"], 2, "--params is not valid JSON"),
        (["--params", "[1, 2]"], 2, "--params must be a JSON object"),
        (["--params", '{"stepz": 3}'], 2, "none of the chosen has parameter stepz (saliency takes abs)"),
        (["--target", "7"], 2, "--target 7 is out of range: the model has 3 classes"),
        (["--target", "unicorn"], 2, "neither a class index nor one of the model's labels"),
        (["-m", "no_such_method"], 2, "-m/--method 'no_such_method' is not a method"),
    ],
)
def test_cli_option_errors_name_the_option(linear_file, tmp_path, capsys, extra, code, message):
    img = _image(tmp_path / "a.png")
    out = tmp_path / "maps.npz"
    args = ["explain", str(linear_file), str(img), "-o", str(out), "-m", "saliency", *extra]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_target_accepts_a_label(linear_file, tmp_path):
    img = _image(tmp_path / "a.png")
    for target in ("dog", "1"):
        out = tmp_path / f"{target}.npz"
        assert (
            main(
                [
                    "explain",
                    str(linear_file),
                    str(img),
                    "-m",
                    "gradient_x_input",
                    "-o",
                    str(out),
                    "--target",
                    target,
                    "--output",
                    "logit",
                ]
            )
            == 0
        )
        record = json.loads(str(np.load(out)["record"]))
        assert record["target"] == 1
        x = np.load(out)["inputs"]
        w, _ = weights()
        np.testing.assert_allclose(np.load(out)["attributions"], x * w[:, 1].reshape(SHAPE), rtol=1e-6)


@pytest.mark.parametrize("top", ["0", "-1", "x"])
def test_cli_top_must_be_positive(linear_file, tmp_path, capsys, top):
    with pytest.raises(SystemExit) as e:
        main(["predict", str(linear_file), str(_image(tmp_path / "a.png")), "--top", top])
    assert e.value.code == 2 and "--top" in capsys.readouterr().err


@pytest.mark.parametrize(
    "var, value, message",
    [
        ("ONNXPLAIN_MEMORY_BUDGET", "-5", "ONNXPLAIN_MEMORY_BUDGET='-5' must be a byte count"),
        ("ONNXPLAIN_MEMORY_BUDGET", "lots", "ONNXPLAIN_MEMORY_BUDGET='lots'"),
        ("ONNXPLAIN_THREADS", "two", "ONNXPLAIN_THREADS='two' must be an integer"),
        ("ONNXPLAIN_PROVIDERS", "FooExecutionProvider", "ONNXPLAIN_PROVIDERS: unknown execution provider"),
    ],
)
def test_environment_variables_are_named_when_wrong(linear_file, monkeypatch, capsys, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        engine.load(linear_file)
    assert main(["info", str(linear_file)]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"providers": ["FooExecutionProvider"]}, "unknown execution provider"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"threads": -1}, "threads"),
    ],
)
def test_bad_load_options(linear_file, kwargs, message):
    with pytest.raises(InputError, match=message):
        engine.load(linear_file, **kwargs)


def test_corrupt_protobuf_is_one_line_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0f garbage")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.onnx" in err and err.count("\n") == 1


def test_runtime_failures_are_wrapped(tmp_path, capsys):
    """A graph onnxruntime accepts at load but fails at run (Reshape to an impossible shape)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"], name="bad_reshape"),
            helper.make_node("ReduceMean", ["r"], ["logits"], axes=[2], keepdims=0, name="mean"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(np.array([-1, 2, 7], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key="onnxplain.layout", value='"NCHW"')
    path = save(model, tmp_path / "r.onnx")
    clf = engine.load(path)
    with pytest.raises(RuntimeFailure, match="r.onnx"):
        clf.predict(np.zeros((1, *SHAPE), np.float32))
    assert main(["predict", str(path), str(_image(tmp_path / "a.png"))]) == 1
    err = capsys.readouterr().err
    assert "r.onnx" in err and "bad_reshape" in err and err.count("\n") == 1


def test_interrupt_exits_130(linear_file, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "explain", interrupted)
    assert (
        main(["explain", str(linear_file), str(_image(tmp_path / "a.png")), "-o", str(tmp_path / "o.npz")])
        == 130
    )
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "o.npz").exists()


# --------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    "props, message",
    [
        ({"onnxplain.labels": "[not json"}, "onnxplain.labels"),
        ({"onnxplain.labels": '["a", 3, "c"]'}, "labels"),
        ({"onnxplain.labels": '["a", "b"]'}, "2 labels.*3 classes"),
        ({"onnxplain.input_range": '"wide"'}, "input_range"),
        ({"onnxplain.preprocessing": '{"mean": ["x"]}'}, "preprocessing.mean"),
        ({"onnxplain.layout": '"NCWH"'}, "layout"),
    ],
)
def test_bad_metadata_names_the_file_and_key(tmp_path, props, message):
    w, b = weights()
    path = save(linear_model(w, b, metadata=props), tmp_path / "m.onnx")
    with pytest.raises(ModelFileError, match=message) as err:
        engine.load(path)
    assert "m.onnx" in str(err.value)


# --------------------------------------------------------------------- size bounds and non-regular files


def test_size_bounds(tmp_path, monkeypatch):
    import engine.modelfile as mf

    w, b = weights()
    path = save(linear_model(w, b, w_location="weights.bin"), tmp_path / "m.onnx")
    (tmp_path / "weights.bin").write_bytes(w.tobytes())
    monkeypatch.setattr(mf, "MAX_MODEL_BYTES", path.stat().st_size + w.nbytes - 1)
    with pytest.raises(ModelFileError, match="exceed the .*-byte limit"):
        engine.load(path)
    monkeypatch.undo()
    monkeypatch.setattr(mf, "MAX_NODES", 2)
    with pytest.raises(ModelFileError, match="nodes"):
        engine.load(path)


def test_named_pipes_are_refused_without_blocking(tmp_path, linear_file, capsys):
    os.mkfifo(tmp_path / "x.png")
    os.mkfifo(tmp_path / "p.onnx")
    with pytest.raises(ModelFileError, match="p.onnx: not a regular file"):
        engine.load(tmp_path / "p.onnx")
    assert main(["predict", str(linear_file), str(tmp_path / "x.png")]) == 1
    assert "x.png: not a regular file" in capsys.readouterr().err


def test_image_pixel_limit_and_extreme_aspect_ratio(tmp_path, linear_file, monkeypatch):
    from engine.images import read_images

    wide = tmp_path / "wide.png"
    Image.new("RGB", (4_000_000, 1), (64, 128, 255)).save(wide)  # a few KB on disk
    x, records = read_images([wide], SHAPE, "NCHW")  # crop first: no 896M-pixel intermediate
    np.testing.assert_allclose(x[0, :, 0, 0], np.array([64, 128, 255]) / 255.0, rtol=1e-6)
    assert records[0].size == (4_000_000, 1) and records[0].resized_to == (4, 4)
    monkeypatch.setenv("ONNXPLAIN_MAX_IMAGE_PIXELS", "1000000")
    with pytest.raises(
        ImageError, match=r"wide.png: 4000000×1 = 4000000 pixels exceeds .*ONNXPLAIN_MAX_IMAGE_PIXELS"
    ):
        read_images([wide], SHAPE, "NCHW")


@pytest.mark.parametrize(
    "content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00", b"GIF89a" + b"\x00" * 20, b"not an image"]
)
def test_broken_images_name_the_file(tmp_path, content):
    from engine.images import read_images

    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(ImageError, match="bad.png"):
        read_images([bad], SHAPE, "NCHW")


# --------------------------------------------------------------------- input values


def test_float64_beyond_float32_is_refused_before_the_cast(linear_file):
    clf = engine.load(linear_file)
    x = np.full((1, *SHAPE), 0.5)
    x[0, 1, 2, 3] = 1e300
    with pytest.raises(InputError, match=r"beyond the float32 range.*\(0, 1, 2, 3\)"):
        clf.predict(x)
    with pytest.raises(InputError, match="beyond the float32 range"):
        engine.explain(clf, x, "saliency")


def test_values_outside_the_input_range_warn_with_the_range(linear_file):
    from engine.checked import InputRangeWarning

    clf = engine.load(linear_file)
    with pytest.warns(InputRangeWarning, match=r"outside the model's input range \[0, 1\]"):
        engine.explain(clf, np.full((1, *SHAPE), 255.0, np.float32), "saliency")


class _Dropped:
    """A ClassifierLike whose gradient lost its batch axis (would broadcast into a fake map)."""

    layout, input_shape, num_classes, input_range, batch_size = "NCHW", SHAPE, 3, (0.0, 1.0), None

    def __init__(self, fault):
        self.fault = fault
        self.w, self.b = weights()

    def predict(self, x):
        out = logits(self.w, self.b, x).astype(np.float32)
        return out[:, :2] if self.fault == "logits" else out

    def gradient(self, x, target, output="logit", rule="gradient", *, return_logits=False):
        g = np.broadcast_to(self.w[:, 0].reshape(SHAPE), x.shape).astype(np.float32)
        scores = logits(self.w, self.b, x)[:, 0].astype(np.float32)
        if self.fault == "batch":
            g = g[0]
        elif self.fault == "nan":
            g = g.copy()
            g[0, 0, 0, 0] = np.nan
        elif self.fault == "dtype":
            g = g.astype(np.int32)
        return scores, g


@pytest.mark.parametrize(
    "fault, message",
    [
        ("batch", r"gradient\(\) gradient has shape \(3, 4, 4\); expected \(2, 3, 4, 4\)"),
        ("nan", "NaN/Inf"),
        ("dtype", "floating point"),
        ("logits", r"predict\(\) has shape \(2, 2\); expected \(2, 3\)"),
    ],
)
def test_methods_check_what_a_classifier_like_returns(fault, message):
    x = np.random.default_rng(0).uniform(0, 1, (2, *SHAPE)).astype(np.float32)
    with pytest.raises(InputError, match=message):
        engine.explain(
            _Dropped(fault),
            x,
            "saliency" if fault != "logits" else "integrated_gradients",
            target=None if fault == "logits" else 0,
        )


def test_a_request_that_cannot_fit_is_an_input_error(monkeypatch):
    import engine.methods as methods

    def huge(model, x, target=None, *, output="probability", steps=10**8):
        raise MemoryError("Unable to allocate 7.45 TiB")

    monkeypatch.setitem(methods.METHODS, "saliency", huge)
    with pytest.raises(InputError, match="does not fit in memory.*fewer images, steps"):
        engine.explain(_Dropped("none"), np.zeros((1, *SHAPE), np.float32), "saliency")


# --------------------------------------------------------------------- images: bit depth, orientation


def test_sixteen_bit_png_is_scaled_by_its_depth(tmp_path):
    from engine.images import read_images

    quarter = np.full((8, 8), 65535 // 4, np.uint16)
    Image.fromarray(quarter).save(tmp_path / "q.png")
    x, records = read_images([tmp_path / "q.png"], SHAPE, "NCHW")
    np.testing.assert_allclose(x, (65535 // 4) / 65535, rtol=1e-6)  # 0.25, not clipped to 1.0
    assert records[0].scale == "/65535" and records[0].mode.startswith("I")


def test_exif_orientation_is_applied_and_recorded(tmp_path):
    from engine.images import read_images

    rng = np.random.default_rng(4)
    upright = rng.integers(0, 256, (4, 8, 3), np.uint8)  # 4 tall, 8 wide
    stored = np.rot90(upright, k=1)  # how a camera stores it: rotated; EXIF 6 says "rotate back"
    img = Image.fromarray(np.ascontiguousarray(stored))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "o.png", exif=exif)
    x, records = read_images([tmp_path / "o.png"], (3, 4, 8), "NCHW")
    np.testing.assert_array_equal(np.rint(x[0].transpose(1, 2, 0) * 255).astype(np.uint8), upright)
    assert records[0].orientation == 6


def test_explain_record_says_how_each_image_was_decoded(linear_file, tmp_path):
    img = tmp_path / "rgba.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 6, 4), np.uint8)).save(img)
    out = tmp_path / "maps.npz"
    assert main(["explain", str(linear_file), str(img), "-m", "saliency", "-o", str(out)]) == 0
    (image,) = json.loads(str(np.load(out)["record"]))["images"]
    decoded = image["decoded"]
    assert decoded["mode"] == "RGBA" and "alpha dropped" in decoded["converted"]
    assert decoded["size"] == [6, 9] and decoded["resized_to"] == [4, 4]
    left, top, right, bottom = decoded["crop"]
    assert (left, right) == (0, 6) and bottom - top == pytest.approx(6)


# --------------------------------------------------------------------- files: umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(linear_file, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / f"maps{umask}.npz"
        assert (
            main(
                [
                    "explain",
                    str(linear_file),
                    str(_image(tmp_path / "a.png")),
                    "-m",
                    "saliency",
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode


# --------------------------------------------------------------------- builder faults


def _fake_builder(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    "body, message",
    [
        ("echo 'Welcome to my shell!'\n", "not a worker answer: Welcome to my shell!"),
        ("echo '[1, 2]'\n", "not a worker answer"),
        ("echo oops >&2; exit 3\n", "exited with 3: oops.*builder install --force"),
        ("printf '\\033[2Jhi'\n", r"not a worker answer: \\x1b\[2Jhi"),
    ],
)
def test_a_foreign_builder_is_a_clear_error(tmp_path, monkeypatch, body, message):
    from engine.compile import builder

    monkeypatch.setenv("ONNXPLAIN_BUILDER_PYTHON", str(_fake_builder(tmp_path, body)))
    with pytest.raises(BuilderError, match=message):
        builder.version()


def test_a_hanging_builder_times_out(tmp_path, monkeypatch):
    import time

    from engine.compile import builder

    monkeypatch.setenv("ONNXPLAIN_BUILDER_PYTHON", str(_fake_builder(tmp_path, "exec sleep 30\n")))
    monkeypatch.setenv("ONNXPLAIN_BUILDER_TIMEOUT", "1")
    start = time.monotonic()
    with pytest.raises(BuilderError, match="did not answer within 1 s.*ONNXPLAIN_BUILDER_TIMEOUT"):
        builder.version()
    assert time.monotonic() - start < 15


def test_builder_install_never_accepts_a_half_made_folder(tmp_path, monkeypatch):
    from engine.compile import builder

    half = tmp_path / "venv"
    (half / "bin").mkdir(parents=True)
    (half / "bin" / "python").write_text("")  # a venv killed mid-install: no marker
    with pytest.raises(BuilderError, match="not a complete onnxplain builder.*--force"):
        builder.install(half)
    monkeypatch.setattr(builder, "BUILDER_REQUIREMENTS", [])  # pip fails: nothing to install
    with pytest.raises(BuilderError, match="pip could not install"):
        builder.install(half, force=True)
    assert (half / "bin" / "python").read_text() == ""  # the old folder is untouched
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == ["venv"]  # no staging folder left


# --------------------------------------------------------------------- cache faults


def test_corrupt_cache_entries_are_rebuilt_and_the_cache_is_capped(
    linear_file, tmp_path, fresh_cache, monkeypatch, capsys
):
    from engine.compile import cache

    x = np.random.default_rng(5).uniform(0, 1, (1, *SHAPE)).astype(np.float32)
    w, b = weights()
    expected = np.broadcast_to(w[:, 2].reshape(SHAPE), x.shape)
    np.testing.assert_allclose(_gradient_of_logit(engine.load(linear_file), x, 2), expected, rtol=1e-6)
    (entry,) = cache.entries()
    onnx_file = cache.cache_dir() / f"{entry.key}.onnx"
    good = onnx_file.read_bytes()
    onnx_file.write_bytes(good[: len(good) // 2])  # truncated by a full disk
    np.testing.assert_allclose(_gradient_of_logit(engine.load(linear_file), x, 2), expected, rtol=1e-6)
    assert onnx_file.read_bytes() == good
    # A second model: over a cap of one entry the least recently used goes.
    other = save(linear_model(*weights(seed=1)), tmp_path / "other.onnx")
    monkeypatch.setenv("ONNXPLAIN_CACHE_MAX_BYTES", str(len(good) + 10))
    engine.load(other).gradient(x, 0)
    assert [e.record["source"] for e in cache.entries()] == [str(other)]
    assert main(["cache", "list"]) == 0 and "other.onnx" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and cache.entries() == []


def test_scratch_folders_of_dead_processes_are_removed(linear_file, fresh_cache):
    from engine.compile import scratch

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = scratch.cache_root() / "scratch" / f"build-{int(dead.stdout)}-abcd"
    stale.mkdir(parents=True)
    (stale / "half.onnx").write_bytes(b"x" * 100)
    engine.load(linear_file).gradient(np.zeros((1, *SHAPE), np.float32), 0)
    assert not stale.exists()
    assert list((scratch.cache_root() / "scratch").iterdir()) == []


_KILLED_COMPILE = """
import numpy as np, sys
import engine
clf = engine.load(sys.argv[1])
clf.gradient(np.zeros((1, 3, 4, 4), np.float32), 0)
print("done")
"""


def _metadata_difference(a: bytes, b: bytes) -> str:
    """What differs between two compiled models: the graph, or which metadata entries."""
    import onnx

    ma, mb = onnx.load_from_string(a), onnx.load_from_string(b)
    if ma.graph != mb.graph:
        return "the graphs differ"
    pa = {p.key: p.value for p in ma.metadata_props}
    pb = {p.key: p.value for p in mb.metadata_props}
    out = []
    for k in sorted(set(pa) | set(pb)):
        if pa.get(k) != pb.get(k):
            try:
                ja, jb = json.loads(pa[k]), json.loads(pb[k])
                out += [f"{k}.{f}: {ja.get(f)} != {jb.get(f)}" for f in ja if ja.get(f) != jb.get(f)]
            except (KeyError, TypeError, ValueError, AttributeError):
                out.append(f"{k}: {pa.get(k)} != {pb.get(k)}")
    return "; ".join(out)


def test_sigkill_during_compile_then_compile_again(linear_file, tmp_path, fresh_cache):
    """Killed at several points of a compile, the next compile gives the same bits as a clean one
    and the cache holds exactly one valid entry, no temporary files and no scratch folders."""
    import time

    from engine.compile import cache

    env = {**os.environ, "ONNXPLAIN_CACHE_DIR": str(fresh_cache), "PYTHONPATH": str(ROOT)}
    clean = subprocess.run(
        [sys.executable, "-c", _KILLED_COMPILE, str(linear_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr
    (entry,) = cache.entries()
    reference = (cache.cache_dir() / f"{entry.key}.onnx").read_bytes()
    for delay in (0.3, 1.0, 2.0, 3.5):
        cache.clear()
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_COMPILE, str(linear_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        time.sleep(delay)
        os.killpg(proc.pid, 9)  # the builder subprocess dies with it
        proc.wait()
        again = subprocess.run(
            [sys.executable, "-c", _KILLED_COMPILE, str(linear_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0, again.stderr
        found = cache.entries()
        assert len(found) == 1
        got = (cache.cache_dir() / f"{found[0].key}.onnx").read_bytes()
        assert got == reference, (delay, _metadata_difference(reference, got))
        leftovers = [
            p.name
            for p in cache.cache_dir().iterdir()
            if p.suffix not in (".onnx", ".json") and p.name != ".lock"
        ]
        assert leftovers == [], (delay, leftovers)
        scratch = fresh_cache / "scratch"
        assert not scratch.exists() or list(scratch.iterdir()) == []


# --------------------------------------------------------------------- every failure is ours


def test_every_onnxplain_error_is_one_hierarchy():
    import engine.errors as errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), OnnxplainError)
