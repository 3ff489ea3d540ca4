"""The review page in a real browser: headless Chromium driven by Selenium against the app's server on loopback.

One server start: before scoring, the score button and its progress, three reviews (mouse, keys, unsure with
a note), undo, back, the history files and label info on disk, zoom and window/level on the canvas, and the
layout at a phone's width.

Skipped (and counted) without selenium (the ``dev`` extra) or without Chromium and its driver
(Debian ``chromium`` and ``chromium-driver``, the README's system packages). Bounded in time:
the server (label_server.running_server) and the browser are stopped in ``finally`` blocks.
Set ``ROBUSTMRI_SCREENSHOTS=<folder>`` to keep the page's screenshots (docs/images/ has them).
"""

import json
import os
import re
import shutil
import time

import pytest

from robustmri import INTENDED_USE
from robustmri.review.orders import DEFAULT_ORDER, DEFAULT_ORDER_REASON, ORDERS

pytest.importorskip("monailabel", reason="MONAI Label is the optional [label] extra")
pytest.importorskip("selenium", reason="selenium is in the dev extra")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
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

DEADLINE_S = 240
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


HISTORY_FIELDS = ("old", "new", "unsure", "note", "action")
#: Wraps the page's fetch: records every call (window.__calls) and answers those listed in window.__stubs
#: ({path, method, status, body}) itself, as a server with authentication on would.
FETCH_RECORDER = """(() => {
  const real = window.fetch.bind(window);
  window.__calls = [];
  window.fetch = (url, init = {}) => {
    const method = init.method || "GET";
    window.__calls.push({url: String(url), method, headers: init.headers || {}});
    const stub = (window.__stubs || []).find((s) => String(url).includes(s.path) && s.method === method);
    return stub ? Promise.resolve(new Response(JSON.stringify(stub.body),
      {status: stub.status, headers: {"Content-Type": "application/json"}})) : real(url, init);
  };
})();"""
#: The page's help for each 401 reason of the authentication contract.
AUTH_HELP = {"no token": "paste your access token", "token rejected": "get a new token",
             "token expired": "sign in again"}


def _history(final, image_id):
    path = final / f"{image_id}.history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _canvas(driver):
    """The canvas's pixels (a data URL) and its displayed width in CSS pixels."""
    return driver.execute_script("const c = document.getElementById('image');"
                                 "return [c.toDataURL(), c.getBoundingClientRect().width, c.width];")


def _check_view(driver):
    """Zoom (button, key) changes the canvas's displayed size; window/level (drag, key R resets) its pixels."""
    pixels, width, source = _canvas(driver)
    assert source == 64  # the source resolution, not a fixed display size
    driver.find_element(By.ID, "zoom-in").click()
    assert _canvas(driver)[1] == pytest.approx(width * 1.25, rel=0.02)
    driver.find_element(By.TAG_NAME, "body").send_keys("-")
    assert _canvas(driver)[1] == pytest.approx(width, rel=0.02)
    ActionChains(driver).click_and_hold(driver.find_element(By.ID, "image")).move_by_offset(-120, -40).release().perform()
    assert float(driver.find_element(By.ID, "window").get_attribute("value")) < 255
    assert _canvas(driver)[0] != pixels
    driver.find_element(By.TAG_NAME, "body").send_keys("r")
    assert _canvas(driver)[0] == pixels
    driver.find_element(By.ID, "zoom-fit").click()


def _check_disagreement(driver, current):
    rows = driver.find_elements(By.CSS_SELECTOR, "#probabilities tbody tr")
    assert [r.get_attribute("data-label") for r in rows] == list(CLASS_NAMES)
    percents = [float(r.find_elements(By.TAG_NAME, "td")[2].text.rstrip(" %")) for r in rows]
    assert sum(percents) == pytest.approx(100, abs=0.2)
    predicted = CLASS_NAMES[percents.index(max(percents))]
    banner = driver.find_element(By.ID, "disagreement")
    expected = (f"Label {current}, model agrees {max(percents):.1f} %" if predicted == current
                else f"Label {current}, model says {predicted} {max(percents):.1f} %")
    assert banner.text == expected and banner.get_attribute("class") == ("agree" if predicted == current else "disagree")


def _with_stubs(driver, base, *stubs):
    """Load the page with the server's answers to ``stubs`` replaced (the recorder is installed before)."""
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                    {"source": f"window.__stubs = {json.dumps(list(stubs))};"})
    driver.get(f"{base}/review/")
    return script["identifier"]


def _check_auth_and_roles(driver, base):
    """The three 401 reasons get their own help and the token form; a role without training hides Train."""
    for reason, words in AUTH_HELP.items():
        script = _with_stubs(driver, base, {"path": "/info/", "method": "GET", "status": 401, "body": {"detail": reason}})
        WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "token-form").is_displayed())
        help_text = driver.find_element(By.ID, "auth-help")
        assert help_text.get_attribute("data-reason") == reason and words in help_text.text, help_text.text
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})
    _with_stubs(driver, base, {"path": "/review/whoami", "method": "GET", "status": 200, "body": {
        "username": "ana", "roles": ["monailabel-annotator"], "can": {"train": False, "score": True, "label": True}}})
    assert _shown(driver) is not None
    assert not driver.find_element(By.ID, "train").is_displayed() and driver.find_element(By.ID, "score").is_displayed()
    assert driver.find_element(By.ID, "whoami").text == "signed in as ana (monailabel-annotator)"


def _check_narrow(driver):
    """At 390 x 844 (a phone): no sideways scroll, the class buttons on screen without scrolling."""
    driver.set_window_size(390, 844)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return window.innerWidth") <= 400)
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    layout = driver.execute_script(
        "const b = [...document.querySelectorAll('#buttons button')].map(e => e.getBoundingClientRect());"
        "return {scroll: document.documentElement.scrollWidth, inner: innerWidth, height: innerHeight, "
        "right: Math.max(...b.map(r => r.right)), bottom: Math.max(...b.map(r => r.bottom))};")
    assert layout["inner"] <= 400 and layout["scroll"] <= layout["inner"], layout
    assert layout["right"] <= layout["inner"] and layout["bottom"] <= layout["height"], layout
    print("layout at 390 x 844:", layout)
    _screenshot(driver, "monailabel_review_page_narrow.png")


@pytest.mark.slow
@pytest.mark.monailabel
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_an_annotator_reviews_undoes_and_goes_back_in_the_browser(tmp_path):
    studies = make_studies(tmp_path / "studies")
    bundle = make_bundle(tmp_path / "bundle")
    app = copy_app(tmp_path / "app")
    port = free_port()
    deadline = time.monotonic() + DEADLINE_S
    final = studies / "labels" / "final"
    groups = {p.name: json.loads(p.read_text())["group"] for p in final.glob("*.label.json")}
    originals = {name[:-len(".label.json")]: json.loads((final / name).read_text())["label"] for name in groups}
    note = "edge of the\nslice; ask Dr. Ng"
    with running_server(server_command(app, studies, port, bundle), tmp_path, deadline, port) as (base, _, log):
        driver = _browser()
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FETCH_RECORDER})
        try:
            # before any scoring the page says what to do, and offers the score button (auth off: all allowed)
            driver.get(f"{base}/review/")
            body = driver.find_element(By.TAG_NAME, "body")
            assert _shown(driver) is None and not driver.find_element(By.ID, "review").is_displayed()
            assert "no labelled image has been scored yet" in driver.find_element(By.ID, "message").text
            assert driver.find_element(By.ID, "accuracy").text == "model: not trained here yet (no validation accuracy)"
            assert driver.find_element(By.ID, "intended-use").text == f"Intended use: {INTENDED_USE}"
            assert driver.find_element(By.ID, "train").is_displayed()
            _screenshot(driver, "monailabel_review_page_before_scoring.png")

            # the score button starts asynchronous scoring, the page follows it to "done" and shows rank 1
            driver.find_element(By.ID, "score").click()
            WebDriverWait(driver, WAIT_S).until(
                lambda d: d.find_element(By.ID, "task-status").get_attribute("data-state") in ("done", "error"))
            status = driver.find_element(By.ID, "task-status")
            assert status.get_attribute("data-state") == "done", status.text
            order = sorted(originals, key=lambda i: request(f"{base}/datastore/image/info?image={i}")
                           ["influence_review"]["rank"])
            shown, saved = None, {}
            for step in range(3):
                shown = _shown(driver, shown)
                assert shown == order[step], (shown, order)  # the most suspicious not yet reviewed
                current = originals[shown]
                assert driver.find_element(By.ID, "current-label").text == current
                assert driver.find_element(By.ID, "suspicion").text.startswith(f"Suspicion: rank {step + 1} of 12")
                assert driver.find_element(By.ID, "explanation").text == ORDERS[DEFAULT_ORDER].explanation
                assert driver.find_element(By.ID, "order").text == f"Order: {DEFAULT_ORDER.replace('_', ' ')}."
                assert driver.find_element(By.ID, "order").get_attribute("title") == DEFAULT_ORDER_REASON
                _check_disagreement(driver, current)
                # scoring stored no abstention score: the page asks the model after showing the image
                WebDriverWait(driver, WAIT_S).until(lambda d: "assessable: abstention score" in d.find_element(
                    By.ID, "assessable").text.lower())
                assert re.fullmatch(r"(Assessable: abstention score [\d.]+ ≤|Not assessable: abstention score "
                                    r"[\d.]+ >) threshold [\d.]+.*", driver.find_element(By.ID, "assessable").text)
                assert driver.find_element(By.ID, "pending").text == str(12 - step)
                assert driver.find_element(By.ID, "reviewed").text == str(step)
                assert float(body.get_attribute("data-shown-ms")) > 0
                assert driver.find_element(By.ID, "history").text == "no save through this server yet"
                other = next(name for name in CLASS_NAMES if name != current)
                if step == 0:  # unsure (key U) with a note, then a class button with the mouse: a correction
                    _check_view(driver)
                    body.send_keys("u")
                    driver.find_element(By.ID, "note").send_keys(note)
                    driver.execute_script("window.scrollTo(0, 0);")
                    _screenshot(driver, "monailabel_review_page.png")
                    driver.find_element(By.CSS_SELECTOR, f"#buttons button[data-label='{other}']").click()
                    saved[shown] = other
                elif step == 1:  # "keep", with the keyboard
                    body.send_keys("k")
                    saved[shown] = current
                else:  # a class by its number key: another correction, undone below
                    body.send_keys(str(CLASS_NAMES.index(other) + 1))
                    saved[shown] = other
            assert _shown(driver, shown) == order[3]
            assert json.loads((final / f"{order[2]}.label.json").read_text())["label"] == saved[order[2]]

            # undo (Z): the last save is reverted on disk and its image shown again, with its history
            body.send_keys("z")
            assert _shown(driver, order[3]) == order[2]
            WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "status").text.startswith(
                f"{order[2]}: undone"))
            assert json.loads((final / f"{order[2]}.label.json").read_text())["label"] == originals[order[2]]
            assert driver.find_element(By.ID, "current-label").text == originals[order[2]]
            assert [li.text.split(" · ")[1] for li in driver.find_elements(By.CSS_SELECTOR, "#history li")] == [
                f"admin: undo, {saved[order[2]]} → {originals[order[2]]}", f"admin: {originals[order[2]]} → "
                f"{saved[order[2]]}"]
            # back (B): the image reviewed before it; N: on to the queue
            body.send_keys("b")
            assert _shown(driver, order[2]) == order[1]
            assert driver.find_element(By.ID, "queue").is_displayed()
            body.send_keys("n")
            assert _shown(driver, order[1]) == order[3]
            assert [driver.find_element(By.ID, k).text for k in ("reviewed", "pending", "corrected")] == ["3", "9", "1"]
            _check_narrow(driver)
            # every request that changes something carries the header a cross-origin page cannot send
            changing = [c for c in driver.execute_script("return window.__calls") if c["method"] != "GET"]
            assert {c["method"] for c in changing} == {"POST", "PUT"}
            assert all(c["headers"].get("X-Requested-With") == "robustmri-review" for c in changing), changing
            _check_auth_and_roles(driver, base)
        except Exception:
            print(tail(log))
            raise
        finally:
            driver.quit()
        first = request(f"{base}/datastore/label/info?label={order[0]}&tag=final")
        assert (first["label"], first["unsure"], first["note"], first["annotator"]) == (
            saved[order[0]], True, note, "admin")
        assert request(f"{base}/datastore/label/info?label={order[1]}&tag=final")["unsure"] is False
    # the label files, with the patient group kept, and one history line per save
    saved[order[2]] = originals[order[2]]
    for image_id, label in saved.items():
        assert json.loads((final / f"{image_id}.label.json").read_text()) == {
            "label": label, "group": groups[f"{image_id}.label.json"]}
    lines = {image_id: _history(final, image_id) for image_id in order}
    for line in (line for entries in lines.values() for line in entries):
        assert line["annotator"] == "admin" and line["ts"].endswith("+00:00")
    assert [tuple(e[k] for k in HISTORY_FIELDS) for e in lines[order[0]]] == [
        (originals[order[0]], saved[order[0]], True, note, "save")]
    assert [tuple(e[k] for k in HISTORY_FIELDS) for e in lines[order[1]]] == [
        (originals[order[1]], originals[order[1]], False, "", "save")]
    flipped = next(name for name in CLASS_NAMES if name != originals[order[2]])
    assert [tuple(e[k] for k in HISTORY_FIELDS) for e in lines[order[2]]] == [
        (originals[order[2]], flipped, False, "", "save"), (flipped, originals[order[2]], False, "", "undo")]
    assert all(not lines[i] for i in order[3:])  # nothing saved, no history
    assert sorted(p.name for p in final.iterdir()) == sorted(
        [*groups, *(f"{i}.history.jsonl" for i in order[:3])])  # no stray files
