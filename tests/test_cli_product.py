"""The explain job end to end (folder output, heatmaps, records, HTML) and `onnxplain annotate`.

Reference: the hand-built linear classifier (logits x·W + b), whose gradient × input map is
x · W[:, k] in closed form.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from PIL import Image

import engine
from engine.cli import main
from tests.untrusted_models import SHAPE, linear_model, save, weights


@pytest.fixture
def setup(tmp_path):
    w, b = weights()
    model = save(linear_model(w, b, labels=["cat", "dog", "fish"]), tmp_path / "m.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b", "a"):
        Image.fromarray(rng.integers(0, 256, (9, 7, 3), np.uint8)).save(photos / f"{name}.png")
    (photos / "notes.txt").write_text("not an image")
    extra = tmp_path / "c.jpg"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(extra, quality=95)
    return model, photos, extra, w


def test_explain_to_a_folder_writes_heatmaps_records_and_a_report(setup, tmp_path, capsys):
    model, photos, extra, w = setup
    out = tmp_path / "out"
    args = [
        "explain",
        str(model),
        str(photos),
        str(tmp_path / "*.jpg"),
        "-m",
        "gradient_x_input",
        "-m",
        "saliency",
        "--target",
        "fish",
        "--output",
        "logit",
        "-o",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert "report.html" in capsys.readouterr().out
    for method in ("gradient_x_input", "saliency"):
        for stem in ("a", "b", "c"):
            png = Image.open(out / method / f"{stem}.png")
            assert png.mode == "RGB" and png.size[0] >= 4
    data = np.load(out / "gradient_x_input" / "maps.npz")
    x = data["inputs"]
    assert x.shape == (3, *SHAPE)  # a.png, b.png (sorted, notes.txt skipped), then c.jpg
    np.testing.assert_allclose(data["attributions"], x * w[:, 2].reshape(SHAPE), rtol=1e-6, atol=1e-7)
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["gradient_x_input", "saliency"]
    r = records[1]
    assert r["params"] == {
        "abs": engine.methods.method_parameters("saliency")["abs"]
    }  # the default, recorded
    assert r["targets"] == [{"class": 2, "label": "fish"}] * 3
    assert [i["path"].rsplit("/", 1)[-1] for i in r["images"]] == ["a.png", "b.png", "c.jpg"]
    assert set(r["versions"]) == {"onnxplain", "onnxruntime", "onnx", "numpy", "python"}
    assert len(r["images"][0]["sha256"]) == 64 and r["model_sha256"] == engine.load(model).sha256
    html = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 6
    assert 'src="http' not in html and "href=" not in html  # self-contained


def test_explain_record_reproduces_the_maps(setup, tmp_path):
    model, photos, _, _ = setup
    out = tmp_path / "out"
    assert (
        main(
            [
                "explain",
                str(model),
                str(photos),
                "-m",
                "integrated_gradients",
                "--param",
                "steps=4",
                "--param",
                "integrated_gradients.baseline=white",
                "-o",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    data = np.load(out / "integrated_gradients" / "maps.npz")
    record = json.loads(str(data["record"]))
    assert record["params"]["steps"] == 4 and record["params"]["baseline"] == "white"
    again = engine.explain(
        engine.load(model),
        data["inputs"],
        record["method"],
        target=[t["class"] for t in record["targets"]],
        output=record["output"],
        **record["params"],
    )
    np.testing.assert_array_equal(again, data["attributions"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-o", "maps.png"], "give a folder"),
        (["-m", "saliency", "-m", "gradient_x_input", "-o", "x.npz"], "a .npz holds one method's maps"),
        (["--param", "steps"], "expected NAME=VALUE"),
        (["--param", "grad_cam.layer=x"], "not one of the chosen methods"),
        (["--param", "saliency.steps=3"], "saliency has no parameter steps"),
    ],
)
def test_explain_usage_errors(setup, tmp_path, monkeypatch, capsys, extra, message):
    model, photos, _, _ = setup
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["explain", str(model), str(photos), *extra]
    if "-m" not in extra:
        args += ["-m", "saliency"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_empty_glob_and_folder_are_errors(setup, tmp_path, capsys):
    model, *_ = setup
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(model), str(tmp_path / "*.webp"), "-o", str(tmp_path / "o")]) == 1
    assert "no file matches" in capsys.readouterr().err
    assert main(["explain", str(model), str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 1
    assert "no image files" in capsys.readouterr().err


def test_annotate_bakes_normalisation_and_writes_metadata(tmp_path):
    """A bare model that expects normalised input, annotated: the copy on [0, 1] images equals the
    original on (x - mean) / std, and carries layout, range and labels."""
    w, b = weights()
    bare = linear_model(w, b)
    del bare.metadata_props[:]
    src = save(bare, tmp_path / "bare.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\nfish\n")
    out = tmp_path / "annotated.onnx"
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    assert (
        main(
            [
                "annotate",
                str(src),
                "-o",
                str(out),
                "--mean",
                *map(str, mean),
                "--std",
                *map(str, std),
                "--labels",
                str(labels),
            ]
        )
        == 0
    )
    clf, orig = engine.load(out), engine.load(src)
    assert clf.labels == ["cat", "dog", "fish"] and clf.layout == "NCHW" and clf.input_range == (0.0, 1.0)
    assert clf.info.preprocessing["baked"] is True
    x = np.random.default_rng(1).uniform(0, 1, (2, *SHAPE)).astype(np.float32)
    m = np.array(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.array(std, np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(clf.predict(x), orig.predict((x - m) / s), rtol=1e-5, atol=1e-5)
    assert not clf.notes or all("inferred" not in n for n in clf.notes)
    assert onnx.load(str(src)).metadata_props == bare.metadata_props  # the source is untouched


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mean", "0.5"], "--mean and --std go together"),
        (["--mean", "0.5", "0.5", "--std", "1", "1"], "give 1 or 3 values"),
        (["--mean", "0.5", "--std", "0"], "positive"),
        (["--range", "1", "0"], "LOW must be below HIGH"),
    ],
)
def test_annotate_errors(tmp_path, capsys, extra, message):
    src = save(linear_model(*weights()), tmp_path / "m.onnx")
    assert main(["annotate", str(src), "-o", str(tmp_path / "o.onnx"), *extra]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()
    assert main(["annotate", str(src), "-o", str(src)]) == 2  # never over its own source


def test_export_torch_and_keras_from_the_command_line(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    src = tmp_path / "net.py"
    src.write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(4 * 6 * 6, 5)).eval()\n"
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "t.onnx"
    args = ["export", "torch", f"{src}:build", "-o", str(out), "--input-shape", "3", "8", "8"]
    assert (
        main([*args, "--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2", "0.25", "--labels", str(labels)])
        == 0
    )
    clf = engine.load(out)
    assert clf.labels == list("abcde") and clf.layout == "NCHW"
    x = np.random.default_rng(0).uniform(size=(2, 3, 8, 8)).astype(np.float32)
    import importlib.util

    spec = importlib.util.spec_from_file_location("net", src)
    net_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net_mod)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.2, 0.25]).view(1, 3, 1, 1)
    want = net_mod.build()((torch.tensor(x) - mean) / std).detach().numpy()
    np.testing.assert_allclose(clf.predict(x), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert main(["export", "torch", f"{src}:nope", "-o", str(tmp_path / "n.onnx"), "--input-shape", "3"]) == 2
    assert "has no attribute nope" in capsys.readouterr().err

    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(), keras.layers.Dense(4)]
    )
    model.save(tmp_path / "k.keras")
    assert main(["export", "keras", str(tmp_path / "k.keras"), "-o", str(tmp_path / "k.onnx")]) == 0
    xk = np.random.default_rng(1).uniform(size=(2, 6, 6, 3)).astype(np.float32)
    got = engine.load(tmp_path / "k.onnx").predict(xk)
    np.testing.assert_allclose(got, model(xk).numpy(), rtol=1e-4, atol=1e-5)


def test_progress_bar_draws_on_a_terminal_only():
    import io

    from engine.progress import ProgressBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        bar = ProgressBar(stream, width=4)
        for done in range(3):
            bar("saliency", done, 2)
    assert log.getvalue() == ""
    lines = tty.getvalue()
    assert lines.count("\r\x1b[K") == 3 and lines.endswith("\n")
    assert "[##..] 1/2" in lines and "[####] 2/2" in lines


def test_shared_colour_scale_puts_every_image_of_a_method_on_one_scale(setup, tmp_path):
    from engine.report.heatmap import shared_scale

    model, photos, extra, w = setup
    out = tmp_path / "shared"
    assert main(["explain", str(model), str(photos), "-m", "saliency", "--output", "logit", "--target", "0",
                 "--scale", "shared", "-o", str(out), "--quiet"]) == 0  # fmt: skip
    record = json.loads((out / "results.json").read_text())[0]
    assert record["colour_scale"] == "shared"
    # Saliency of a fixed logit of a linear model is |W[:, 0]| for every image: one scale makes
    # the two heatmaps identical (their own scales would too; a doubled map must not be).
    a = np.abs(w[:, 0]).reshape(3, 4, 4).astype(np.float64)
    h1, h2 = shared_scale([a, 2 * a], "NCHW")
    s = a.sum(0)
    vmax = np.percentile(np.concatenate([s.ravel(), 2 * s.ravel()]), 99)
    np.testing.assert_allclose(h1, np.clip(s / vmax, 0, 1))
    np.testing.assert_allclose(h2, np.clip(2 * s / vmax, 0, 1))
    assert h1.max() < h2.max()
    pngs = [Image.open(out / "saliency" / f"{n}.png") for n in ("a", "b")]
    assert all(p.size == pngs[0].size for p in pngs)
