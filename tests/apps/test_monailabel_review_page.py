"""The review page in a real browser: headless Chromium driven by Selenium against the app's server on loopback.

Skipped (and counted) without selenium (the ``dev`` extra) or without Chromium and its driver
(Debian ``chromium`` and ``chromium-driver``, the README's system packages). Bounded in time:
the server (label_server.running_server) and the browser are stopped in ``finally`` blocks.
Set ``ROBUSTMRI_SCREENSHOTS=<folder>`` to keep the page's screenshots (docs/images/ has them).
"""

import json
import os
import shutil
import time

import pytest

from robustmri.review.orders import DEFAULT_ORDER, ORDERS

pytest.importorskip("monailabel", reason="MONAI Label is the optional [label] extra")
pytest.importorskip("selenium", reason="selenium is in the dev extra")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from label_server import (  # noqa: E402  (tests/apps/label_server.py)
    CLASS_NAMES,
    copy_app,
    free_port,
    make_bundle,
    make_studies,
    request,
    running_server,
    server_command,
    tail,
)

DEADLINE_S = 120
WAIT_S = 60
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # the system driver only: Selenium Manager downloads nothing
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,760", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


def _shown(driver, previous=None):
    """Wait until the page shows an image other than ``previous`` (or its message); the shown id or None."""
    def ready(d):
        body = d.find_element(By.TAG_NAME, "body")
        image_id = body.get_attribute("data-image-id")
        if image_id and image_id != previous and d.find_element(By.ID, "review").is_displayed() and \
                body.find_element(By.ID, "buttons").find_element(By.TAG_NAME, "button").is_enabled():
            return image_id
        message = d.find_element(By.ID, "message")
        return "message" if message.is_displayed() and message.text else False
    found = WebDriverWait(driver, WAIT_S).until(ready)
    return None if found == "message" else found


def _screenshot(driver, name):
    folder = os.environ.get("ROBUSTMRI_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        driver.save_screenshot(os.path.join(folder, name))


@pytest.mark.slow
@pytest.mark.monailabel
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_an_annotator_reviews_three_images_in_the_browser(tmp_path):
    studies = make_studies(tmp_path / "studies")
    bundle = make_bundle(tmp_path / "bundle")
    app = copy_app(tmp_path / "app")
    port = free_port()
    deadline = time.monotonic() + DEADLINE_S
    final = studies / "labels" / "final"
    groups = {p.name: json.loads(p.read_text())["group"] for p in final.glob("*.label.json")}
    with running_server(server_command(app, studies, port, bundle), tmp_path, deadline, port) as (base, _, log):
        driver = _browser()
        try:
            # before any scoring the page says what to do, instead of showing nothing
            driver.get(f"{base}/review/")
            assert _shown(driver) is None and not driver.find_element(By.ID, "review").is_displayed()
            message = driver.find_element(By.ID, "message").text
            assert "no labelled image has been scored yet" in message and "POST /scoring/influence_review" in message
            _screenshot(driver, "review_page_before_scoring.png")

            scoring = request(f"{base}/scoring/influence_review?run_sync=true", "POST", timeout=WAIT_S)
            assert scoring["scored"] == 12
            order = [entry["id"] for entry in scoring["most_suspicious"]]  # rank 1 first
            driver.get(f"{base}/review/")
            shown, saved = None, {}
            for step in range(3):
                shown = _shown(driver, shown)
                assert shown == order[step], (shown, order)  # the most suspicious not yet reviewed
                current = json.loads((final / f"{shown}.label.json").read_text())["label"]
                assert driver.find_element(By.ID, "current-label").text == current
                assert driver.find_element(By.ID, "suspicion").text.startswith(f"Suspicion: rank {step + 1} of 12")
                assert driver.find_element(By.ID, "explanation").text == ORDERS[DEFAULT_ORDER].explanation
                rows = driver.find_elements(By.CSS_SELECTOR, "#probabilities tbody tr")
                assert [r.get_attribute("data-label") for r in rows] == list(CLASS_NAMES)
                percents = [float(r.find_elements(By.TAG_NAME, "td")[2].text.rstrip(" %")) for r in rows]
                assert sum(percents) == pytest.approx(100, abs=0.2)
                assert driver.execute_script("return document.getElementById('image').naturalWidth") == 64
                assert driver.find_element(By.ID, "pending").text == str(12 - step)
                assert driver.find_element(By.ID, "reviewed").text == str(step)
                assert float(driver.find_element(By.TAG_NAME, "body").get_attribute("data-shown-ms")) > 0
                other = next(name for name in CLASS_NAMES if name != current)
                if step == 0:  # a class button, with the mouse: a correction
                    _screenshot(driver, "review_page.png")
                    driver.find_element(By.CSS_SELECTOR, f"#buttons button[data-label='{other}']").click()
                    saved[shown] = other
                elif step == 1:  # "keep", with the keyboard
                    driver.find_element(By.TAG_NAME, "body").send_keys("k")
                    saved[shown] = current
                else:  # a class by its number key: another correction
                    driver.find_element(By.TAG_NAME, "body").send_keys(str(CLASS_NAMES.index(other) + 1))
                    saved[shown] = other
            last = _shown(driver, shown)
            assert last == order[3]
            assert [driver.find_element(By.ID, k).text for k in ("reviewed", "pending", "corrected")] == ["3", "9", "2"]
        except Exception:
            print(tail(log))
            raise
        finally:
            driver.quit()
    for image_id, label in saved.items():  # the saved label files, with the patient group kept
        assert json.loads((final / f"{image_id}.label.json").read_text()) == {
            "label": label, "group": groups[f"{image_id}.label.json"]}
    assert sorted(p.name for p in final.iterdir()) == sorted(groups)  # no stray files
