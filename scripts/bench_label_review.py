"""MONAI Label app speed: influence scoring of a figshare-sized study set, and the review page's time to the next image.

    python scripts/bench_label_review.py --out label_review_bench.json
    python scripts/bench_label_review.py --n_images 2300 --spatial_size 256 --reviews 30

Builds a study folder in a temporary directory from the figshare slices (symbolic links to
the JPEGs, one ``<id>.label.json`` per image with the figshare class and its pseudonymous
patient group; ``n_images`` drawn with a fixed seed), a temporary bundle (the repository's
configs and an untrained checkpoint of the paper's network at ``spatial_size``, recorded in
its model_metadata.json as training records it: speed does not depend on the weights), and
starts the app with the README's command on 127.0.0.1. Then:

1. scoring: wall time of ``POST /scoring/influence_review?run_sync=true`` (every labelled
   image, the feature pass and the solve), as the annotator's server runs it;
2. the review page: headless Chromium (Debian chromium, chromium-driver; selenium) opens
   ``/review/`` and keeps ``reviews`` labels in a row with the K key; each time the page records
   the time from asking for the next image to the image and the model's probabilities on
   screen (``document.body.dataset.shownMs``). Without a browser, the same requests are timed
   from Python (next image, its label, its PNG, infer) and reported as such.

The server is stopped by its PID at the end, and the temporary folder removed. A benchmark,
not a test: run it on an idle machine; numbers depend on the machine and its load.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import fire
import torch

from robustmri.bench.machine import cpu_name
from robustmri.engine.model_metadata import METADATA_FILE, model_metadata
from robustmri.networks import PaperCNN
from robustmri.outputs import write_json
from robustmri.review.label_review import write_label_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
FIGSHARE = os.path.normpath(os.path.join(ROOT, os.pardir, "shared", "data", "figshare-brain-tumor"))
CLASS_NAMES = ("meningioma", "glioma", "pituitary")


def make_studies(data_dir: str, folder: str, n_images: int, seed: int) -> int:
    """``n_images`` figshare slices (links) with their labels; returns the number written."""
    with open(os.path.join(data_dir, "labels.csv")) as handle:
        rows = list(csv.DictReader(handle))
    random.Random(seed).shuffle(rows)
    rows = rows[:n_images]
    os.makedirs(os.path.join(folder, "labels", "final"))
    for row in rows:
        image_id = f"fig{int(row['index']):04d}"
        source = os.path.join(data_dir, row["file"])
        os.symlink(source, os.path.join(folder, image_id + os.path.splitext(source)[1]))
        write_label_file(os.path.join(folder, "labels", "final", f"{image_id}.label.json"), row["label_name"],
                         group=row["group"])
    return len(rows)


def make_bundle(folder: str, spatial_size: int, padding: int) -> str:
    shutil.copytree(os.path.join(ROOT, "bundle", "configs"), os.path.join(folder, "configs"))
    os.makedirs(os.path.join(folder, "models"))
    torch.manual_seed(0)
    network = PaperCNN(spatial_size=spatial_size, padding=padding)
    torch.save(network.state_dict(), os.path.join(folder, "models", "model.pt"))
    write_json(os.path.join(folder, "models", METADATA_FILE),
               model_metadata({}, spatial_size, padding, network, CLASS_NAMES, preprocess="head"))
    return folder


def call(url: str, method: str = "GET", timeout: float = 3600, raw: bool = False):
    # the app refuses a state-changing request without X-Requested-With (apps/monailabel/README.md)
    headers = {} if method == "GET" else {"X-Requested-With": "robustmri"}
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return body if raw else json.loads(body.decode())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_times(base: str, reviews: int) -> tuple[list[float], str]:
    """Time to the next image on the review page (ms), keeping ``reviews`` labels with the K key."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return python_times(base, reviews), "python requests (selenium not installed)"
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        return python_times(base, reviews), "python requests (chromium / chromedriver not found)"
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    times, previous = [], None
    try:
        driver.get(f"{base}/review/")
        for _ in range(reviews + 1):
            def shown(d, previous=previous):
                body = d.find_element(By.TAG_NAME, "body")
                image_id = body.get_attribute("data-image-id")
                ready = image_id and image_id != previous and all(
                    b.is_enabled() for b in d.find_elements(By.CSS_SELECTOR, "#buttons button"))
                return (image_id, float(body.get_attribute("data-shown-ms"))) if ready else False
            previous, ms = WebDriverWait(driver, 600).until(shown)
            times.append(ms)
            driver.find_element(By.TAG_NAME, "body").send_keys("k")
    finally:
        driver.quit()
    return times, "headless Chromium (selenium), the page's own measurement"


def python_times(base: str, reviews: int) -> list[float]:
    """The page's requests for one image, in the page's order, timed from Python (ms); the label kept."""
    import uuid

    times = []
    for _ in range(reviews + 1):
        started = time.perf_counter()
        sample = call(f"{base}/activelearning/most_suspicious", "POST")
        image_id = sample["id"]
        label = call(f"{base}/datastore/label?label={image_id}&tag=final")
        call(f"{base}/datastore/label/info?label={image_id}&tag=final")
        call(f"{base}/datastore/image/info?image={image_id}")
        call(f"{base}/review/image?image={image_id}", raw=True)
        call(f"{base}/review/history?image={image_id}&tag=final")
        call(f"{base}/infer/brain_tumour?image={image_id}&output=json", "POST")
        times.append(1000 * (time.perf_counter() - started))
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"{image_id}.label.json\""
                f"\r\nContent-Type: application/json\r\n\r\n{json.dumps(label)}\r\n--{boundary}--\r\n").encode()
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/datastore/label?image={image_id}&tag=final", method="PUT", data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "X-Requested-With": "robustmri"}),
            timeout=600).read()
    return times


def main(n_images: int = 2300, spatial_size: int = 256, reviews: int = 30, seed: int = 0,
         network_padding: int | None = None, data_dir: str = FIGSHARE, out: str = "", keep: bool = False) -> None:
    """Score ``n_images`` figshare slices through the app and time ``reviews`` next images on the review page
    (``network_padding``: 0 at 256 px as the paper's recipe, else 2 as train.json)."""
    padding = network_padding if network_padding is not None else (0 if spatial_size >= 256 else 2)
    if not os.path.isfile(os.path.join(data_dir, "labels.csv")):
        raise SystemExit(f"{data_dir}: figshare data not found (labels.csv); give --data_dir")
    work = tempfile.mkdtemp(prefix="label_review_bench_")
    studies, bundle, app = (os.path.join(work, name) for name in ("studies", "bundle", "app"))
    count = make_studies(data_dir, studies, n_images, seed)
    make_bundle(bundle, spatial_size, padding)
    shutil.copytree(os.path.join(ROOT, "apps", "monailabel"), app,
                    ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    executable = os.path.join(os.path.dirname(sys.executable), "monailabel")
    command = [executable, "start_server", "--app", app, "--studies", studies, "--host", "127.0.0.1", "--port",
               str(port), "--conf", "models", "brain_tumour", "--conf", "bundle_path", bundle]
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log_path = os.path.join(work, "server.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                   start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited ({process.returncode}); log: {log_path}")
            try:
                call(f"{base}/info/", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - started > 300:
                    raise SystemExit(f"server not up after 300 s; log: {log_path}")
                time.sleep(1)
        start_s = time.monotonic() - started
        print(f"server up in {start_s:.1f} s; scoring {count} labelled images at {spatial_size} px ...", flush=True)
        started = time.perf_counter()
        scoring = call(f"{base}/scoring/influence_review?run_sync=true", "POST")
        scoring_s = time.perf_counter() - started
        print(f"scored {scoring['scored']} ({len(scoring['skipped'])} skipped) in {scoring_s:.1f} s", flush=True)
        times, how = page_times(base, reviews)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0], "cuda": torch.cuda.is_available(),
            "n_images": count, "spatial_size": spatial_size, "server_start_s": round(start_s, 1),
            "scoring_s": round(scoring_s, 1), "scored": scoring["scored"], "skipped": len(scoring["skipped"]),
            "next_image": {"how": how, "first_ms": round(times[0]),
                           "median_ms": round(statistics.median(times[1:])) if len(times) > 1 else None,
                           "max_ms": round(max(times[1:])) if len(times) > 1 else None, "n": len(times) - 1},
        }
        print(json.dumps(result, indent=2))
        if out:
            write_json(out, result)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
