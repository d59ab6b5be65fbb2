"""The HTML reports opened in a real headless browser (Debian's chromium driven by playwright):
a screenshot is taken and every image must have rendered (naturalWidth > 0, as many as written).

`.ci/run` installs chromium (apt) and sets ONNXPLAIN_REQUIRE_BROWSER=1, so there a missing browser
is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from tests.untrusted_models import linear_model, save, weights

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = os.environ.get("ONNXPLAIN_CHROMIUM") or shutil.which("chromium")
    if path is None:
        if os.environ.get("ONNXPLAIN_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install chromium; .ci/run does it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    return path


@pytest.fixture
def reports(tmp_path):
    w, b = weights()
    model = save(linear_model(w, b, labels=["cat", "dog", "fish"]), tmp_path / "m.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(photos / f"p{i}.png")
    methods = ["-m", "saliency", "-m", "gradient_x_input"]
    assert main(["explain", str(model), str(photos), *methods, "-o", str(tmp_path / "ex"), "--quiet"]) == 0
    assert main(["audit", str(model), str(photos), *methods, "--out", str(tmp_path / "au"), "--quiet"]) == 0
    return {"explain": tmp_path / "ex" / "report.html", "audit": tmp_path / "au" / "report.html"}


def test_reports_render_every_image_in_chromium(reports, tmp_path):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            for name, path in reports.items():
                written = path.read_text().count("<img ")
                assert written == 6  # 3 images × 2 methods
                page.goto(path.as_uri())
                page.wait_for_load_state("load")
                widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth)")
                assert len(widths) == written and all(w and w > 0 for w in widths), (name, widths)
                shot = tmp_path / f"{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                img = np.asarray(Image.open(shot).convert("RGB"))
                assert img.shape[0] > 200 and img.std() > 5  # something was drawn, not a blank page
        finally:
            browser.close()
