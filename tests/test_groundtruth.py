"""Pointing-game boxes from a JSON file (`onnxplain evaluate --boxes`), placed on the input grid.

Reference: the geometry of the centre crop and resize in closed form, and the hand-built linear
classifier whose saliency map peaks where its weights do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.errors import InputError
from engine.groundtruth import box_to_input, boxes_for_images, read_boxes_file
from tests.untrusted_models import FEATURES, SHAPE, linear_model, save


def test_box_to_input_follows_the_crop_and_the_resize():
    # a 448x448 source shown at 224: source pixels 2i, 2i+1 -> input pixel i
    assert box_to_input([0, 0, 1, 1], (0, 0, 448, 448), (224, 224)) == [0, 0, 0, 0]
    assert box_to_input([100, 50, 199, 149], (0, 0, 448, 448), (224, 224)) == [50, 25, 99, 74]
    # a box straddling the crop is clipped to it; one outside it is empty
    assert box_to_input([0, 0, 7, 7], (0, 4, 8, 12), (4, 4)) == [0, 0, 3, 1]
    assert box_to_input([0, 12, 7, 15], (0, 4, 8, 12), (4, 4)) is None
    # upsampling: one source pixel covers several input pixels
    assert box_to_input([1, 1, 1, 1], (0, 0, 4, 4), (16, 16)) == [4, 4, 7, 7]


def _write(tmp_path, data) -> str:
    p = tmp_path / "boxes.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


@pytest.mark.parametrize(
    "data, message",
    [
        ("[1, 2]", "JSON object"),
        ("{not json", "not a JSON boxes file"),
        ({"a.png": [[3, 3, 1, 5]]}, "max >= min"),
        ({"a.png": [[0, 0, 1]]}, "x_min, y_min, x_max, y_max"),
        ({"a.png": [[0, 0, 1, True]]}, "x_min, y_min, x_max, y_max"),
        ({"a.png": "0 0 1 1"}, "list of"),
    ],
)
def test_bad_boxes_files_are_named_errors(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(InputError, match=message) as e:
        read_boxes_file(path)
    assert "boxes.json" in str(e.value)


def test_an_image_without_boxes_is_an_error_not_a_silent_miss():
    rec = [{"path": "photos/b.png", "decoded": {"crop": (0, 0, 4, 4), "resized_to": (4, 4)}}]
    with pytest.raises(InputError, match="no boxes for image 'photos/b.png'"):
        boxes_for_images({"a.png": []}, rec, "boxes.json")
    # the path as given wins over the file name
    got = boxes_for_images({"photos/b.png": [[0, 0, 0, 0]], "b.png": [[3, 3, 3, 3]]}, rec, "f")
    assert got == [[[0, 0, 0, 0]]]


@pytest.fixture
def peaked_model(tmp_path):
    """Linear classifier, class 0 on top, whose class-0 weights peak at input pixel (row 1, col 2),
    so the saliency of the top class points there (the probability's gradient is
    p0 (w0 - sum_j p_j w_j): the peak must be class 0's alone)."""
    rng = np.random.default_rng(1)
    w = rng.uniform(-0.1, 0.1, (FEATURES, 3)).astype(np.float32)
    c, h, wd = SHAPE
    for ch in range(c):
        w[ch * h * wd + 1 * wd + 2, 0] = 5.0
    return save(linear_model(w, np.array([3.0, 0.0, 0.0], np.float32)), tmp_path / "m.onnx")


def test_evaluate_with_boxes_scores_hits_and_misses(peaked_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    # 8 wide x 16 tall: resized to 4x8, centre crop keeps source rows 4..11 -> crop (0, 4, 8, 12);
    # input pixel (row 1, col 2) is source rows 6-7, cols 4-5
    for name in ("hit", "miss"):
        Image.fromarray(rng.integers(0, 256, (16, 8, 3), np.uint8)).save(photos / f"{name}.png")
    boxes = _write(tmp_path, {"hit.png": [[4, 6, 5, 7]], "miss.png": [[0, 4, 1, 5], [0, 12, 7, 15]]})
    out = tmp_path / "ev"
    args = ["evaluate", str(peaked_model), str(photos), "-m", "saliency", "--metric", "pointing_game"]
    args += ["--boxes", boxes, "--param", "pointing_game.tolerance=0.5", "-o", str(out), "--json"]
    assert main(args) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["saliency"]["pointing_game ↑"] == pytest.approx(0.5)
    results = json.loads((out / "results.json").read_text())
    rows = [r for r in results["results"] if r["metric"] == "pointing_game"]
    assert [r["extra"]["point"] for r in rows] == [[1, 2], [1, 2]]  # both maps peak at the weights'
    by_image = {r["image"]["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_image["hit.png"]["boxes"] == [[2, 1, 2, 1]] and by_image["hit.png"]["score"] == 1.0
    assert by_image["miss.png"]["boxes"] == [[0, 0, 0, 0]] and by_image["miss.png"]["score"] == 0.0
    assert by_image["hit.png"]["image"]["decoded"]["crop"] == [0, 4, 8, 12]


def test_boxes_usage_errors(peaked_model, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img)
    boxes = _write(tmp_path, {"other.png": []})
    base = ["evaluate", str(peaked_model), str(img), "-m", "saliency"]
    assert main([*base, "--metric", "deletion", "--boxes", boxes]) == 2
    assert "add --metric pointing_game" in capsys.readouterr().err
    assert main([*base, "--metric", "pointing_game", "--boxes", boxes]) == 1
    assert "no boxes for image" in capsys.readouterr().err
