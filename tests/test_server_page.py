"""The page ``trainfer serve`` shows at ``/``, in a real headless browser (Debian's Chromium, driven by
Playwright): a file chosen on the page is predicted, the typed result shown (a sequence model's
decoded text and score too), the heat map drawn.

Skipped only when Chromium (``/usr/bin/chromium``, or ``TRAINFER_CHROMIUM``) or Playwright is absent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_process import post, running_server
from serving_models import save_bundle, write_pngs
from test_sequence_generation import LABELS as TOKENS
from test_sequence_generation import SETTINGS, images, tiny_model

import trainfer
from trainfer import Predictor

pytest.importorskip("fastapi")
pytest.importorskip("captum")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("TRAINFER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
pytestmark = pytest.mark.slow

LABELS = ["cat", "dog", "eel"]
#: What Chromium refused under the page's Content-Security-Policy, in any test of this module.
CSP_REFUSALS: list[str] = []
#: Chromium's advice on the page's markup (``[DOM] Password field is not contained in a form``), in any test.
DOM_ADVICE: list[str] = []


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    bundle = save_bundle(root / "tiny", seed=5, labels=LABELS)
    s2s = trainfer.save(
        tiny_model(), root / "s2s", task="sequence", labels=TOKENS, decoder=SETTINGS, example_inputs=images(1)
    )
    yesno = save_bundle(root / "yesno", seed=6, task="binary", outputs=1, final="sigmoid")
    with running_server(str(bundle), str(s2s), str(yesno)) as server:
        yield server, bundle, root


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.set_default_timeout(60_000)
            page.on("console", lambda message: _note_refusal(message.text))
            yield page
        finally:
            browser.close()


def _note_refusal(text: str) -> None:
    """Keep what Chromium refused under the page's Content-Security-Policy and its advice on the markup
    (it says both on the console)."""
    if "Content Security Policy" in text:
        CSP_REFUSALS.append(text)
    if text.startswith("[DOM]"):
        DOM_ADVICE.append(text)


def _open(page, url: str) -> None:
    page.goto(url + "/")
    # selectors, not wait_for_function: its polling evaluates a string, which the page's CSP refuses (no 'unsafe-eval')
    page.wait_for_selector("#model option:nth-child(3)", state="attached")


def _predict_on_page(page, url: str, model: str, image) -> None:
    """Choose ``model`` on the page, drop ``image`` on it, and wait for its result (no error shown)."""
    _open(page, url)
    page.select_option("#model", model)
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#result table")
    assert page.inner_text("#error") == ""


def test_the_page_predicts_a_chosen_image_and_draws_its_heat_map(served, page):
    server, bundle, root = served
    image = write_pngs(root / "images", 1, seed=11)[0]
    expected = Predictor.load(bundle).predict([str(image)], top_k=3)[0]
    _open(page, server.url)
    assert page.locator("#model").input_value() == "tiny"
    page.check("#explain")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#heatmap:not([hidden])")
    assert page.inner_text("#error") == ""
    rows = page.locator("#result table tr").all_inner_texts()
    shown = [(cells.split()[0], float(cells.split()[-1])) for cells in rows]
    assert [label for label, _ in shown] == [label for label, _ in expected.top_k]
    np.testing.assert_allclose([p for _, p in shown], [p for _, p in expected.top_k], atol=1e-4)
    assert page.inner_text("#result h3") == image.name

    explained = post(f"{server.url}/v2/models/tiny/explain?filename=x.png", image.read_bytes())
    heatmap = np.array(json.loads(explained[1])["heatmap"])
    shot = Image.open(io.BytesIO(page.locator("#heatmap").screenshot())).convert("RGB")
    cells = heatmap.shape[0]
    size = shot.width / cells  # pixelated rendering: each heat-map cell is a square block
    centres = [
        [shot.getpixel((int((j + 0.5) * size), int((i + 0.5) * size)))[0] for j in range(cells)] for i in range(cells)
    ]
    np.testing.assert_allclose(np.array(centres) / 255, heatmap, atol=0.02)  # red channel = attribution share
    legend = page.locator("#legend").inner_text()
    assert "0: none" in legend and "1: strongest" in legend and "either sign" in legend
    ramp = Image.open(io.BytesIO(page.locator("#ramp").screenshot())).convert("RGB")
    ends = [ramp.getpixel((x, ramp.height // 2)) for x in (0, ramp.width - 1)]
    np.testing.assert_allclose(ends, [(0, 80, 255), (255, 0, 0)], atol=8)  # the map's colours of 0 and 1
    full = Image.open(io.BytesIO(page.screenshot(full_page=True)))
    assert full.width == 900 and np.unique(np.asarray(full.convert("L"))).size > 16  # text, bars, preview and heat map


def test_the_page_asks_a_classifier_for_at_most_its_classes(served, page):
    server, _, root = served
    image = write_pngs(root / "images", 1, seed=12)[0]
    _open(page, server.url)
    page.fill("#topk", str(len(LABELS) + 2))  # the server refuses more than the 3 classes: the page asks for 3
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#result table")
    assert page.inner_text("#error") == ""
    assert len(page.locator("#result table tr").all_inner_texts()) == len(LABELS)


def test_the_page_shows_a_bad_file_as_the_servers_one_line_error(served, page, tmp_path):
    server, _, _ = served
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    _open(page, server.url)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not(:empty)")
    assert page.inner_text("#error").startswith("400: cannot read image 'broken.png'")
    assert page.locator("#result table").count() == 0


def test_the_page_shows_a_decoded_sequence_its_score_and_n_best(served, page):
    server, _, root = served
    image = write_pngs(root / "strings", 1, seed=12)[0]  # 8 x 8, resized to the bundle's 8 x 64
    expected = Predictor.load(root / "s2s").predict([str(image)], top_k=3)[0]
    _predict_on_page(page, server.url, "s2s", image)
    rows = [cells.split("\t") for cells in page.locator("#result table tr").all_inner_texts()]
    assert rows[:3] == [
        ["text", expected.text],
        ["score", f"{expected.score:.4f}"],
        ["finished", str(expected.finished).lower()],
    ]
    shown = [(name, value.rsplit(" (", 1)) for name, value in rows[3:]]
    assert [(name, text) for name, (text, _) in shown] == [(f"#{i + 1}", t) for i, (t, _) in enumerate(expected.n_best)]
    np.testing.assert_allclose(
        [float(s.rstrip(")")) for _, (_, s) in shown], [s for _, s in expected.n_best], atol=1e-4
    )
    assert page.locator("#result td.sequence").inner_text() == expected.text


def test_the_page_predicts_with_a_binary_model_sending_no_top_k(served, page):
    """The server refuses top_k for a binary model (400): the page sends it only to models that rank."""
    server, _, root = served
    image = write_pngs(root / "binary", 1, seed=13)[0]
    expected = Predictor.load(root / "yesno").predict([str(image)])[0]
    _predict_on_page(page, server.url, "yesno", image)
    probability, decision = page.locator("#result table tr").all_inner_texts()[0].split("\t")
    assert float(probability.removeprefix("p = ")) == pytest.approx(expected.probability, abs=1e-4)
    assert decision == f"decision: {str(expected.decision).lower()}"


def test_the_page_shows_its_top_k_box_only_for_a_model_it_sends_top_k_to(served, page):
    """The box showed for binary and regression models, which are sent no top_k."""
    server, _, _ = served
    _open(page, server.url)
    assert page.locator("#topk").is_visible()
    page.select_option("#model", "yesno")
    page.wait_for_selector("#topk", state="hidden")
    page.select_option("#model", "tiny")
    page.wait_for_selector("#topk", state="visible")


def test_the_page_runs_under_its_content_security_policy_with_nothing_refused(served, page):
    """Its inline script and style are allowed by digest (the style applies: the top-k box is 4rem
    wide), no test on this page met a refusal, and Chromium had no advice on its markup (the API key's
    password box was in no form). Pressing Enter in the key box submits nothing (``form-action 'none'``)."""
    server, _, _ = served
    _open(page, server.url)
    assert page.evaluate("getComputedStyle(document.getElementById('topk')).width") == "64px"
    page.fill("#key", "k" * 24)
    page.press("#key", "Enter")
    page.wait_for_selector("#model option:nth-child(3)", state="attached")
    assert page.url == server.url + "/"
    assert CSP_REFUSALS == [] and DOM_ADVICE == []
