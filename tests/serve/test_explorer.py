"""The latent explorer (GET /) in a real headless Chromium, through selenium: the page loads
everything from the server, a slider moved with the keyboard changes the decoded image (canvas
pixels before/after), and so do a class button and the interpolation slider. The image on the
canvas equals the server's own decode of the latent the page holds.

Needs Debian's /usr/bin/chromium and /usr/bin/chromedriver (CI installs them: apt-get install
chromium chromium-driver); skipped with that reason where they are absent.
docs/explorer.png comes from tests/serve/explorer_screenshot.py (same browser setup, a trained
model).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.serving.explorer import explorer_info
from tests.serve.test_server import NPY, load_npy, npy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is missing")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium"
                " chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def chromium(width: int = 1000, height: int = 760):
    """Headless Debian chromium under selenium's chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def decodes(driver) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-decodes"))


def after(driver, count: int) -> int:
    """Wait until the page has drawn more than `count` images and no decode is pending."""
    WebDriverWait(driver, 20).until(lambda d: decodes(d) > count and d.execute_script(
        "return !state.inflight"))
    return decodes(driver)


def _canvas(driver) -> np.ndarray:
    """The canvas pixels (H, W, 4) uint8, read through toDataURL (PNG)."""
    from PIL import Image

    url = driver.execute_script("return document.getElementById('image').toDataURL()")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_explorer_sliders_classes_and_interpolation_change_the_image(server, browser):
    srv = server("cvae-mlp")
    browser.get(srv.url + "/")
    drawn = after(browser, 0)
    info = browser.execute_script("return state.info")
    assert info["model"]["conditional"] and info["explorer"]["dims"] == list(range(8))
    before = _canvas(browser)
    assert before.shape == (28, 28, 4)

    # The canvas shows the server's decode of the page's own latent and class.
    z = np.array(browser.execute_script("return Array.from(state.z)"), np.float32)[None]
    label = browser.execute_script("return state.label")
    want = load_npy(httpx.post(f"{srv.url}/v1/decode?labels={label}", content=npy(z),
                               headers=NPY))
    expected = np.clip(np.round(want[0, 0] * 255), 0, 255).astype(np.uint8)
    assert np.abs(before[..., 0].astype(int) - expected).max() <= 1

    slider = browser.find_elements(By.CSS_SELECTOR, "#sliders input")[0]
    slider.send_keys(Keys.END)  # a real key press: the value jumps to +3
    drawn = after(browser, drawn)
    assert browser.execute_script("return state.z[0]") == pytest.approx(3.0)
    moved = _canvas(browser)
    assert np.abs(moved.astype(int) - before.astype(int)).max() > 0

    other = (label + 3) % 10
    browser.find_element(By.CSS_SELECTOR, f"#classes button[data-label='{other}']").click()
    drawn = after(browser, drawn)
    relabelled = _canvas(browser)
    assert np.abs(relabelled.astype(int) - moved.astype(int)).max() > 0

    browser.find_element(By.ID, "endpoints").click()
    drawn = after(browser, drawn)
    start = _canvas(browser)
    browser.find_element(By.ID, "t").send_keys(Keys.END)  # t = 1: the second endpoint
    drawn = after(browser, drawn)
    end = _canvas(browser)
    assert np.abs(end.astype(int) - start.astype(int)).max() > 0
    b = np.array(browser.execute_script("return Array.from(state.ends[1])"))
    np.testing.assert_allclose(browser.execute_script("return Array.from(state.z)"), b,
                               atol=1e-5)
    assert browser.find_element(By.ID, "status").text.startswith("decoded in")


def test_the_page_and_its_assets_are_served_locally(server):
    srv = server("cvae-mlp")
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing remote
    for asset, kind in (("explorer.js", "javascript"), ("explorer.css", "text/css")):
        r = httpx.get(f"{srv.url}/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "https://" not in r.text


def test_sliders_follow_the_kl_report_when_the_run_has_one(tmp_path):
    kl = np.random.default_rng().random(12).round(4).tolist()
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "test.json").write_text(json.dumps({"kl_per_dim": kl}))
    (tmp_path / "export").mkdir()
    info = explorer_info(tmp_path / "export", (12,), "gaussian", max_sliders=5)
    assert info["dims"] == sorted(range(12), key=lambda i: -kl[i])[:5]
    assert info["kl"] == [kl[i] for i in info["dims"]]
    assert info["source"].endswith("evaluation/test.json")
    assert explorer_info(tmp_path / "export", (3, 4, 4), "gaussian", 5)["dims"] == [0, 1, 2, 3, 4]
    assert explorer_info(tmp_path, (4, None, None), "gaussian")["latent_size"] is None
