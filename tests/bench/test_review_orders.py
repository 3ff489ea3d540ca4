"""The review-order analysis (robustmri.bench.review_orders) on hand-made runs and a tiny benchmark folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from robustmri.bench.review_orders import decide, evaluate_benchmark, markdown_table
from robustmri.bench.runs import run_key
from robustmri.outputs import write_json


def _run(rate, seed, precision: dict) -> dict:
    return {"rate": rate, "seed": seed,
            "orders": {name: {"at_k": {"flipped": {"precision": p, "recall": p}}} for name, p in precision.items()}}


def _runs(offsets: list[float]) -> list[dict]:
    """Two rates x 3 seeds; self-influence = loss + the seed's offset; influence always perfect."""
    return [_run(rate, seed, {"random": rate, "loss": 0.6, "confident_learning": 0.5,
                              "self_influence": 0.6 + offsets[seed], "influence": 1.0})
            for rate in (0.1, 0.2) for seed in range(3)]


def test_rule_takes_the_better_order_when_the_interval_excludes_zero():
    decision = decide(_runs([0.1, 0.2, 0.3]))
    assert (decision["best"], decision["runner_up"], decision["chosen"]) == ("self_influence", "loss", "self_influence")
    assert decision["means"]["self_influence"] == pytest.approx(0.8)  # influence (1.0) is measured, never chosen
    assert decision["difference"]["n"] == 6 and decision["difference"]["positive"] == 6
    assert decision["difference"]["ci"][0] > 0 and decision["resolved"]
    assert "self_influence found the most wrong labels" in decision["reason"]


def test_rule_takes_the_cheaper_order_when_the_interval_includes_zero():
    decision = decide(_runs([0.3, -0.2, 0.05]))  # mean +0.05, signs disagree
    assert (decision["best"], decision["runner_up"], decision["chosen"]) == ("self_influence", "loss", "loss")
    assert decision["difference"]["ci"][0] < 0 < decision["difference"]["ci"][1] and not decision["resolved"]
    assert decision["difference"]["mde"] > 0
    assert "not told apart" in decision["reason"] and decision["reason"].endswith("so the cheaper, loss")


def _write_run(out, rate, seed, n=20, with_values=True):
    """A run whose loss ranks the wrong labels first and whose self-influence finds exactly one in its first k."""
    record = {"method": "audit", "noise": "none", "test_noise_fraction": 1.0, "label_noise_rate": rate, "seed": seed}
    with open(out / "runs.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if not with_values:
        return
    n_wrong = int(round(rate * n))
    true = np.arange(n) % 2
    labels = true.copy()
    labels[:n_wrong] = 1 - labels[:n_wrong]  # the first n_wrong labels are wrong
    losses = np.linspace(0.1, 0.5, n)
    losses[:n_wrong] = 3.0  # largest loss: found first
    self_influence = -np.linspace(0.01, 0.02, n)
    self_influence[0], self_influence[1:n_wrong] = -1.0, 0.0  # wrong label 0 first, the others last
    p_given = np.exp(-losses)
    probabilities = np.stack([np.where(labels == c, p_given, 1 - p_given) for c in (0, 1)], axis=1)
    write_json(out / "runs" / run_key(record) / "eval" / "audit_values.json", {
        "ids": list(range(n)), "labels": labels.tolist(), "true_labels": true.tolist(), "losses": losses.tolist(),
        "scores": np.zeros(n).tolist(), "self_influence": self_influence.tolist(),
        "probabilities": probabilities.tolist()})


@pytest.fixture
def bench_folder(tmp_path):
    out = tmp_path / "bench"
    (out / "runs").mkdir(parents=True)
    for rate in (0.1, 0.2):
        for seed in range(3):
            _write_run(out, rate, seed)
    _write_run(out, 0.2, 3, with_values=False)  # finished, but its audit left no values: left out
    write_json(out / "protocol.json", {"protocol": {"profile": "review_order_cpu"}})
    return out


def test_benchmark_folder_is_evaluated_run_by_run(bench_folder):
    runs = evaluate_benchmark(str(bench_folder))
    assert [(r["rate"], r["seed"]) for r in runs] == [(0.1, 0), (0.1, 1), (0.1, 2), (0.2, 0), (0.2, 1), (0.2, 2)]
    first = runs[0]
    assert first["n"] == 20 and first["wrong_labels"] == 2 and first["k"] == {"flipped": 2, "0.05": 1, "0.1": 2}
    assert first["orders"]["loss"]["at_k"]["flipped"] == {"precision": 1.0, "recall": 1.0}
    assert first["orders"]["self_influence"]["at_k"]["flipped"] == {"precision": 0.5, "recall": 0.5}
    assert runs[3]["orders"]["self_influence"]["at_k"]["flipped"]["precision"] == 0.25  # 1 of 4 at r = 0.2
    assert runs[3]["orders"]["loss"]["at_k"]["0.1"] == {"precision": 1.0, "recall": 0.5}  # k = 2 of 4 wrong
    curve = first["orders"]["loss"]["recall_curve"]
    assert curve[0] == 0.0 and curve[10] == 1.0  # 10 % of 20 = the 2 wrong labels, both found
    decision = decide(runs)
    assert decision["chosen"] == "loss" and decision["runs"] == 6
    table = markdown_table(runs, decision)
    assert "| self_influence | 50.0 ± 0.0 (3) | -50.0 [-50.0, -50.0], 0/3; MDE 0.0 |" in table


@pytest.mark.slow  # a new interpreter
def test_script_writes_summary_table_and_figure(bench_folder, tmp_path):
    docs = tmp_path / "docs"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_review_order.py"), "--bench",
                             str(bench_folder), "--out", str(docs)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["runs_found"] == 6 and printed["runs_expected"] == 15 and printed["complete"] is False
    assert printed["chosen"] == "loss"
    summary = json.loads((docs / "summary.json").read_text())
    assert summary["decision"]["chosen"] == "loss" and len(summary["per_run"]) == 6
    assert summary["comparison_vs_chosen"]["flipped"]["precision"]["all"]["self_influence"]["vs_reference"]["n"] == 6
    assert (docs / "table.md").read_text().startswith("| order |")
    assert (docs / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"
