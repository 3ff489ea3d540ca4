"""The DICOM node's speed against a real PACS (Orthanc on loopback): latency and studies per hour.

    python scripts/bench_node.py --model model.onnx --public_key signing.pub.pem --out bench_node.json
    python scripts/bench_node.py --model model.onnx --allow_demo_model --repeats 2 --burst 3 --n_slices 4

Starts Orthanc and ``robustmri-node`` (``--study_timeout`` s, default 2) on free 127.0.0.1 ports, then measures
(:mod:`robustmri.bench.node_speed`): latency, from the end of ``storescu`` of one ``n_slices``-slice
``image_size`` x ``image_size`` T1 post-contrast study to its SR stored in Orthanc, less the study timeout, over
``--repeats`` studies (median, min, max; one warm-up study first, reported apart); throughput, ``--burst`` such
studies sent back to back, first send to last SR, as studies per hour. Real figshare slices when the data set is
found (``--dataset_dir``), else the embedded synthetic phantom. Writes the JSON ``--out`` and prints a markdown
table. Needs Orthanc and dcmtk's storescu. A benchmark, not a test: run it with the machine otherwise idle.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import fire

from robustmri.bench.dicom_fixtures import series_images
from robustmri.bench.node_speed import markdown_table, measure_node

FIGSHARE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shared",
                                        "data", "figshare-brain-tumor"))


def main(model: str, public_key: str = "", allow_unsigned: bool = False, allow_demo_model: bool = False,
         study_timeout: float = 2.0, repeats: int = 5, burst: int = 20, n_slices: int = 24, image_size: int = 512,
         dataset_dir: str = FIGSHARE, out: str = "bench_node.json"):
    """Measure, write ``out`` and print the table."""
    if not os.path.isfile(str(model)):
        sys.exit(f"bench_node: --model {model}: no such file")
    if public_key and not os.path.isfile(str(public_key)):
        sys.exit(f"bench_node: --public_key {public_key}: no such file")
    for name, value in (("repeats", repeats), ("burst", burst), ("n_slices", n_slices), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            sys.exit(f"bench_node: --{name} must be an integer >= 1, not {value!r}")
    if not isinstance(study_timeout, (int, float)) or isinstance(study_timeout, bool) or not study_timeout >= 0:
        sys.exit(f"bench_node: --study_timeout must be a number >= 0, not {study_timeout!r}")
    options = ((("--public_key", public_key) if public_key else ()) + (("--allow_unsigned",) if allow_unsigned else ())
               + (("--allow_demo_model",) if allow_demo_model else ()))
    images, source = series_images(n_slices, image_size, dataset_dir)
    tmp = tempfile.mkdtemp(prefix="bench-node-")
    try:
        report = measure_node(model, tmp, images, options, study_timeout=float(study_timeout), repeats=repeats,
                              burst=burst, series=f"{n_slices} slices of {image_size} x {image_size}, "
                                                  f"MR Image Storage, {source}")
    except (RuntimeError, TimeoutError) as error:  # the studies and the node's and Orthanc's logs stay to read
        sys.exit(f"bench_node: {str(error).splitlines()[0]} (logs kept in {tmp})")
    shutil.rmtree(tmp)
    with open(out, "w") as handle:
        handle.write(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    fire.Fire(main)
