"""Write docs/explorer.png: the latent explorer of a served model in headless Chromium.

    python tests/serve/explorer_screenshot.py runs/cvae/export --out docs/explorer.png

Starts the real server in this process (tests/serve/conftest.ThreadServer) on a free loopback
port, opens GET / with the browser setup of tests/serve/test_explorer.py, presses a class
button, moves the first slider and the interpolation slider, and saves the page. Not a test
(pytest does not collect it): the committed screenshot is looked at by a person.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from engine.serving.model import ServeConfig  # noqa: E402
from tests.serve.conftest import ThreadServer  # noqa: E402
from tests.serve.test_explorer import after, chromium  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", help="what python -m engine.serve would serve")
    ap.add_argument("--out", default=str(ROOT / "docs" / "explorer.png"))
    ap.add_argument("--label", type=int, default=7, help="class button to press (conditional)")
    args = ap.parse_args(argv)
    server = ThreadServer(ServeConfig(args.artifact)).start()
    driver = chromium(1000, 800)
    try:
        driver.get(server.url + "/")
        drawn = after(driver, 0)
        label = f"#classes button[data-label='{args.label}']"
        buttons = driver.find_elements(By.CSS_SELECTOR, label)
        if buttons:
            buttons[0].click()
            drawn = after(driver, drawn)
        driver.find_element(By.ID, "t").send_keys(*[Keys.ARROW_RIGHT] * 35)
        drawn = after(driver, drawn)
        driver.find_elements(By.CSS_SELECTOR, "#sliders input")[0].send_keys(
            *[Keys.ARROW_RIGHT] * 120)
        after(driver, drawn)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
