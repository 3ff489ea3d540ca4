"""The paper's Table 1 on one protocol: methods x training noise x seeds, mean +- std test accuracy.

Every method is its bundle config (``configs/<method>.json`` of the bundle, plus overrides for the
variants, :mod:`robustmri.bench.profiles`), trained in this process on protocol data that is built
once per (seed, noise, p, split) and copied into each run, so for a given seed every method sees the
same patient-grouped split and the same noise realisation. Each run's test accuracy is reported for
the best-validation checkpoint and the last-epoch one; test accuracy never chooses anything. A
finished run is appended to ``<out>/runs.jsonl`` at once, so an interrupted benchmark loses nothing:
running the same command again skips finished runs and resumes the interrupted one where it stopped
(from its last completed epoch, the bundle's ``resume``; a run whose training had finished is only
evaluated; :mod:`robustmri.bench.runs`).

Writes ``results.json``, ``results.md`` (tables), ``accuracy_best.png``, ``accuracy_last.png`` and
``validation_curves.png`` into the output folder; per run, the bundle's own outputs (history,
influence scores, pictures) under ``<out>/runs/<run>/``. ``scripts/benchmark.py`` is its command line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm.auto import tqdm

from robustmri.bench.machine import describe_machine, run_provenance
from robustmri.bench.profiles import (
    BENCHMARK_PRECISION,
    LEAVE_OUT,
    LEGACY_RECIPE,
    METHOD_OUTPUTS,
    METHODS,
    PROFILES,
    RECIPE_SETTINGS,
    RECIPES,
    SHIFT_COMPARISONS,
    SHIFT_LEVERS,
    SHIFT_SPLITS,
    branchable,
    prefix_name,
    prefix_overrides,
)
from robustmri.bench.report import read_runs, write_report
from robustmri.bench.runs import (
    RUN_MARKER,
    as_list,
    best_val,
    data_fingerprint,
    jsonable,
    plan_runs,
    resume_point,
    run_key,
)
from robustmri.bench.selection import cross_selection, per_epoch_outcomes, selection_table
from robustmri.bench.shift_measures import (
    abstention_by_shift,
    abstention_tables,
    calibrated_by_shift,
    calibration_tables,
)
from robustmri.bench.shifts import (
    family_tables,
    lever_table,
    mean_over_shifts,
    shift_figure,
    shift_tables,
    shifted_test_sets,
    summary_table,
    synthetic_raw_images,
)
from robustmri.bench.stats import grouped_bootstrap_ci, headroom_table, paired_table, run_interval_table, stability
from robustmri.data.label_noise import noisy_label_record
from robustmri.data.protocol import build_protocol
from robustmri.data.shift_families import family_shifts
from robustmri.engine.workflow import execute, inject_protocol, load_workflow, protocol_arguments
from robustmri.evaluation.checkpoints import evaluate_checkpoints_on
from robustmri.outputs import read_json, write_json

logger = logging.getLogger("benchmark")

#: The noises a model trained on clean images (``--noises none``) is also tested under, at every ``eval_p``.
HEADROOM_NOISES = ("gaussian", "rician")


class Benchmark:
    """Train and test every method on one protocol; tables, plots and a resumable record.

    ``bundle_dir``: the bundle whose configs the runs train (``bundle/`` of the repository).
    """

    def __init__(self, bundle_dir: str | os.PathLike):
        self.bundle_dir = os.path.abspath(bundle_dir)

    def methods(self) -> dict:
        """The methods and variants that can run, with their config and overrides."""
        return {name: {"config": config, "overrides": overrides} for name, (config, overrides) in METHODS.items()}

    def run(self, out: str = "benchmark", profile: str = "cpu", dataset_dir: str | None = None,
            methods=None, noises=None, seeds=None, test_noise_fractions=(1.0,), label_noise_rates=None,
            device: str | None = None, keep_checkpoints: bool = False, **overrides) -> dict:
        """Run what is not yet in ``<out>/runs.jsonl``, then write the tables and plots.

        ``seeds``: a count (0..n-1) or a list; ``methods``: names from ``methods``;
        ``noises``: training image noise (``none`` for clean images); ``label_noise_rates``:
        symmetric label-flip rates of the training split (0 = clean labels); extra
        ``--key value`` pairs override bundle config ids for every run (e.g. ``--epochs 20``).
        """
        settings, methods, device, dataset_dir, out, config = _start(self.bundle_dir, profile, methods, device,
                                                                     dataset_dir, out, overrides, run=True)
        seeds = list(range(int(seeds if seeds is not None else settings["seeds"]))) if not isinstance(
            seeds, (list, tuple, str)) else [int(s) for s in as_list(seeds)]
        # what must match for runs in one output folder to be tabulated together
        recipe = settings.get("recipe", "product")
        eval_p = [float(p) for p in settings.get("eval_p", [])]
        protocol = {"profile": profile, "recipe": recipe, "eval_p": eval_p, **config, "dataset": _dataset_name(dataset_dir),
                    **({"eval_shifts": settings["eval_shifts"]} if settings.get("eval_shifts") else {}),
                    **({"shift_catalog": settings["shift_catalog"]} if settings.get("shift_catalog") else {}),
                    **({"shift_render_size": int(settings["shift_render_size"])}
                       if settings.get("shift_render_size") else {}),
                    "recipe_settings": recipe_settings(self.bundle_dir, recipe, config)}
        self._check_same_protocol(out, protocol)
        runs_path = os.path.join(out, "runs.jsonl")
        recorded = read_runs(runs_path)
        _check_same_precision(recorded, config["precision"], runs_path)
        host = describe_machine()
        self._save_protocol(out, protocol, host)

        done = {run_key(r) for r in recorded}
        noises = as_list(noises) or settings.get("noises", ["gaussian", "rician"])
        rates = [float(r) for r in (as_list(label_noise_rates) or settings.get("label_noise_rates", [0.0]))]
        planned = plan_runs(methods, noises, as_list(test_noise_fractions), seeds, rates)
        todo = [r for r in planned if run_key(r) not in done]
        logger.info("benchmark %s: %d runs planned, %d already done, machine %s", profile, len(planned),
                    len(planned) - len(todo), host)
        common = _common_config(config, dataset_dir, device)
        context = {"recipe": RECIPES[recipe], "eval_p": eval_p, "branch": bool(settings.get("branch")),
                   "data": {}, "prefix": {}, "eval_shifts": list(settings.get("eval_shifts", [])), "shift_sets": {},
                   "shift_catalog": settings.get("shift_catalog", "site"),
                   "shift_render_size": settings.get("shift_render_size"),
                   "shift_measures": list(settings.get("shift_measures", []))}
        started = time.perf_counter()
        progress = tqdm(todo, desc=f"benchmark ({profile})", unit="run", dynamic_ncols=True)
        failed = []
        for run in progress:
            progress.set_postfix_str(run_key(run))
            try:
                record = self._one(run, common, context, out, keep_checkpoints)
            except Exception as err:  # one failing run must not lose the others; it is retried next time
                logger.exception("%s failed", run_key(run))
                cause = err
                while cause.__cause__ is not None:  # MONAI wraps the method's own error
                    cause = cause.__cause__
                failed.append({**run, "error": f"{type(cause).__name__}: {cause}"})
                continue
            with open(runs_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            seconds = record["timings"]["train_s"]
            logger.info("%s: test accuracy best %.4f, last %.4f, %s", run_key(run), record["test"]["best"]["accuracy"],
                        record["test"]["last"]["accuracy"], "resumed" if seconds is None else f"{seconds:.0f} s")
        wall = time.perf_counter() - started
        self._save_protocol(out, protocol, host, wall_s=wall,
                            date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json(os.path.join(out, "failed.json"), failed)
        result = self.report(out) if read_runs(runs_path) else {"output": out, "runs": 0}
        if failed:
            raise RunsFailed(f"{len(failed)} of {len(todo)} runs failed (details in {out}/benchmark.log and "
                             f"{out}/failed.json); run the same command again to retry them", failed)
        return result

    def report(self, out: str = "benchmark") -> dict:
        """Tables and plots from ``<out>/runs.jsonl`` (also after an interrupted run)."""
        out = os.path.abspath(out)
        runs = read_runs(os.path.join(out, "runs.jsonl"))
        if not runs:
            raise UsageError(f"{out}/runs.jsonl holds no finished run; start one with `benchmark.py run`")
        info = read_json(os.path.join(out, "protocol.json"), missing={})
        header = (f"### Benchmark `{info.get('protocol', {}).get('profile', '?')}`\n\n"
                  f"- protocol: {json.dumps(info.get('protocol', {}))}\n- machine: {json.dumps(info.get('machine', {}))}\n"
                  f"- runs: {len(runs)}; wall time of the last invocation: {info.get('wall_s', 0) / 60:.1f} min\n\n")
        summary, markdown = write_report(runs, out, list(METHODS), header)
        if any("test_by_p" in run for run in runs):  # paired comparisons against naive training
            # a profile without plain naive runs (the honest shift bench) has nothing to pair with naive
            with_naive = any(run["method"] == "naive" for run in runs)
            paired = "\n\n".join([f"#### Paired against naive training, {tag} checkpoint\n\n"
                                    + paired_table(runs, baseline="naive", checkpoint=tag)
                                    for tag in ("last", "best") if with_naive]
                                   + [f"#### Headroom: naive trained on clean images (rows `naive, clean-trained`) "
                                      f"against naive trained on each noise, on the same noisy test images, {tag} "
                                      f"checkpoint; Δ is the headroom\n\n" + table
                                      for tag in ("last", "best") if (table := headroom_table(runs, checkpoint=tag))]
                                   + weight_average_tables(runs)
                                   + ["#### Naive training's stability\n\n```\n"
                                      + json.dumps(stability(runs), indent=1) + "\n```",
                                      "#### Each run, last checkpoint, p = 1\n\n" + run_interval_table(runs)])
            markdown = f"{markdown}\n\n{paired}\n"
        catalog = info.get("protocol", {}).get("shift_catalog", "site")
        if catalog == "families" and any("test_by_shift" in run for run in runs):
            # the shifts' tags (in range, out of range) are those of the size that rendered them
            shifts = family_shifts(int(info["protocol"].get("shift_render_size") or info["protocol"]["spatial_size"]))
            markdown += ("\n\n#### Site shifts by family and severity\n\n"
                         "Severity against the product's augmentation ranges (robustmri.data.shift_families); "
                         "a family left out of a configuration's training is a new family to it.\n\n"
                         "##### Test split\n\n" + family_tables(runs, shifts, LEAVE_OUT)
                         + "\n\n" + lever_table(runs, shifts, SHIFT_LEVERS)
                         + "\n\n##### Validation split\n\n"
                         + family_tables(runs, shifts, LEAVE_OUT, key="val_by_shift")
                         + "\n\n" + lever_table(runs, shifts, SHIFT_LEVERS, key="val_by_shift")
                         + "\n\n##### Every shift, test split\n\n" + shift_tables(runs, list(SHIFT_LEVERS.items()))
                         + "\n")
            if any(run.get("calibrated_by_shift") or run.get("abstention_by_shift") for run in runs):
                markdown += ("\n\n#### Site calibration under the shifts\n\n" + calibration_tables(runs, shifts)
                             + "\n\n#### Abstention under the shifts\n\n" + abstention_tables(runs) + "\n")
            shift_figure(runs, os.path.join(out, "shift_accuracy.png"))
        elif any("test_by_shift" in run for run in runs):
            noises = list(dict.fromkeys(r["noise"] for r in runs if "val_by_shift" in r))
            choice = "\n".join(f"- {noise}: " + ", ".join(
                f"{m} {v:.1f}" for m in dict.fromkeys(r["method"] for r in runs)
                if (v := mean_over_shifts(runs, m, noise)) is not None) for noise in noises)
            markdown += ("\n\n#### Site shifts\n\nValidation accuracy % averaged over every shift (the "
                         "unshifted split included), mean over seeds: the configuration is chosen on this\n\n"
                         + choice + "\n\n##### Test split, in short\n\n" + summary_table(runs)
                         + "\n\n##### Test split\n\n" + shift_tables(runs, SHIFT_COMPARISONS) +
                         "\n\n##### Validation split\n\n" + shift_tables(runs, SHIFT_COMPARISONS, key="val_by_shift")
                         + "\n")
            shift_figure(runs, os.path.join(out, "shift_accuracy.png"))
        with open(os.path.join(out, "results.md"), "w") as handle:
            handle.write(markdown)
        print(markdown)
        return {"output": out, "runs": len(runs), "methods": summary["methods"], "columns": summary["columns"]}

    def select(self, out: str = "bench/selection", profile: str = "cpu", dataset_dir: str | None = None,
               methods="naive", noises="gaussian", seeds=(100, 101, 102), ema_decay: float | None = 0.99,
               device: str | None = None, **overrides) -> dict:
        """Checkpoint selection rules compared on validation only, on tuning seeds (robustmri.bench.selection).

        Each (method, noise, seed) trains once in full on the profile's protocol and recipe, keeping the
        weights after every epoch; every rule picks an epoch on one half of the validation patients and is
        scored on the other half; with ``ema_decay`` (per iteration; None for none) the exponential moving
        average of the weights at the end is a candidate too. Appends to ``<out>/selection.jsonl`` (resumable) and writes ``selection.md``.
        The seeds must not be those of the profile's final table (0 .. seeds-1); the test split is never read.
        """
        seeds = [int(s) for s in as_list(seeds)]
        final = set(range(int(PROFILES[profile]["seeds"]))) if profile in PROFILES else set()
        if final & set(seeds):
            raise UsageError(f"tuning seeds {sorted(final & set(seeds))} are seeds of the {profile} profile's final "
                             f"table (0..{len(final) - 1}); choose others, e.g. 100,101,102")
        settings, methods, device, dataset_dir, out, config = _start(self.bundle_dir, profile, methods, device,
                                                                     dataset_dir, out, overrides)
        noises = as_list(noises)
        recipe = settings.get("recipe", "product")
        protocol = {"profile": profile, "recipe": recipe, **config, "dataset": _dataset_name(dataset_dir)}
        self._check_same_protocol(out, protocol, records="selection.jsonl")
        host = describe_machine()
        self._save_protocol(out, protocol, host)
        records_path = os.path.join(out, "selection.jsonl")
        done = {run_key(r) for r in read_runs(records_path)}
        todo = [r for r in plan_runs(methods, noises, [1.0], seeds) if run_key(r) not in done]
        common = _common_config(config, dataset_dir, device)
        context = {"recipe": RECIPES[recipe], "eval_p": [], "branch": False, "data": {}, "prefix": {}}
        started = time.perf_counter()
        for run in tqdm(todo, desc=f"selection ({profile})", unit="run", dynamic_ncols=True):
            run_dir = os.path.join(out, "runs", run_key(run))
            shutil.rmtree(run_dir, ignore_errors=True)
            workflow = self._workflow(run["method"], run, common, context["recipe"], run_dir)
            snapshots_path = os.path.join(run_dir, "models", "epochs.pt")
            workflow.parser["train#handlers"] = workflow.parser["train#handlers"] + [
                {"_target_": "robustmri.bench.selection.EpochSnapshots", "network": "@network",
                 "path": snapshots_path, "ema_decay": ema_decay}]
            built, fingerprint = self._data(workflow, run, context)
            inject_protocol(workflow, built)
            start = time.perf_counter()
            execute(workflow)
            data = workflow.parser.get_parsed_content("data")
            network = workflow.parser.get_parsed_content("network")
            snapshots = torch.load(snapshots_path, map_location="cpu", weights_only=True)
            correct, loss = per_epoch_outcomes(network, snapshots, data.val)
            fixed, ema_accuracy = {}, None
            if snapshots.get("ema_states"):  # the average of the weights, after each epoch
                ema_correct, _ = per_epoch_outcomes(network, snapshots, data.val, key="ema_states")
                fixed["ema"], ema_accuracy = ema_correct[-1], ema_correct.mean(axis=1).tolist()
            rules = cross_selection(correct, loss, [item["group"] for item in data.val], seed=run["seed"],
                                    fixed=fixed)
            record = {**run, "recipe": context["recipe"], "config": METHODS[run["method"]][0],
                      "data_fingerprint": fingerprint, "epochs": snapshots["epochs"], "n_val": len(data.val),
                      "val_accuracy": correct.mean(axis=1).tolist(), "val_loss": loss.mean(axis=1).tolist(),
                      "ema_decay": ema_decay, "ema_val_accuracy": ema_accuracy,
                      "rules": rules, "train_s": time.perf_counter() - start, **run_provenance(),
                      "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            shutil.rmtree(os.path.dirname(snapshots_path), ignore_errors=True)
            with open(records_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            logger.info("%s: held-out validation accuracy by rule %s", run_key(run),
                        {name: round(r["score"], 4) for name, r in rules.items()})
        self._save_protocol(out, protocol, host, wall_s=time.perf_counter() - started,
                            date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        records = read_runs(records_path)
        markdown = selection_table(records)
        with open(os.path.join(out, "selection.md"), "w") as handle:
            handle.write(markdown)
        print(markdown)
        return {"output": out, "runs": len(records)}

    # -- one run ------------------------------------------------------------------------

    def _workflow(self, method: str, run: dict, common: dict, recipe: list[str], run_dir: str, **extra):
        config, method_overrides = METHODS[method]
        bundle = self.bundle_dir
        files = [os.path.join(bundle, config)] + [os.path.join(bundle, "configs", r) for r in recipe]
        return load_workflow(bundle, files, {
            **common, **method_overrides, "noise": run["noise"], "test_noise_fraction": run["test_noise_fraction"],
            "seed": run["seed"], "ckpt_dir": os.path.join(run_dir, "models"), "output_dir": os.path.join(run_dir, "eval"),
            "label_noise": "symmetric" if run["label_noise_rate"] else "none",
            "label_noise_rate": run["label_noise_rate"], **extra}, drop_handlers=("ProgressBar",))

    def _data(self, workflow, run: dict, context: dict):
        """The protocol data for this run's arguments, built once (one data set in memory at a time)."""
        arguments = {**protocol_arguments(workflow), "test_noise_fractions": context["eval_p"],
                     # clean training is evaluated on every noise's test images: the headroom of each noise
                     "test_noises": HEADROOM_NOISES if run["noise"] == "none" and context["eval_p"] else ()}
        key = json.dumps(arguments, sort_keys=True, default=str)
        cache = context["data"]
        if key not in cache:
            cache.clear()
            context["prefix"].clear()
            start = time.perf_counter()
            data = build_protocol(**arguments)
            cache[key] = (data, data_fingerprint(data))
            logger.info("data for %s built in %.1f s: %s", run_key(run), time.perf_counter() - start, data.summary())
        return cache[key]

    def _prefix(self, run: dict, common: dict, context: dict, out: str, overrides: dict | None = None) -> dict:
        """Naive training up to the influence epoch, once per seed and noise: its state, history and best checkpoint.

        Kept on disk (``<out>/runs/prefix__...``, with ``prefix.json``), so a later invocation on the same
        protocol (e.g. with more methods) branches from the same prefix when its data are the same."""
        overrides = dict(overrides or {})
        name = prefix_name(overrides)
        key = (run["seed"], run["noise"], run["label_noise_rate"], name)
        if key in context["prefix"]:
            return context["prefix"][key]
        prefix_dir = os.path.join(out, "runs", run_key({**run, "method": name}))
        record_path = os.path.join(prefix_dir, "prefix.json")
        workflow = self._workflow("naive", run, common, context["recipe"], prefix_dir, **overrides)
        epoch = int(workflow.parser.get_parsed_content("influence_epoch") if "influence_epoch" in workflow.parser
                    else common["influence_epoch"])
        built, fingerprint = self._data(workflow, run, context)
        saved = read_json(record_path, missing={})
        if (saved.get("data_fingerprint") == fingerprint and saved.get("epoch") == epoch
                and all(os.path.isfile(saved.get(name) or "") for name in ("state", "best"))):
            logger.info("%s for seed %s, %s: reused from %s", name, run["seed"], run["noise"], prefix_dir)
            context["prefix"][key] = saved
            return saved
        state_path = os.path.join(prefix_dir, "models", "training_state.pt")
        identity = {"run": os.path.basename(prefix_dir), "epoch": epoch, "data_fingerprint": fingerprint,
                    "options": jsonable({**common, **overrides})}
        resumed = resume_point(prefix_dir, identity, state_path, epoch)
        workflow.parser["train#handlers"] = workflow.parser["train#handlers"] + [
            {"_target_": "robustmri.engine.training_state.SaveTrainingState", "path": state_path, "epoch": epoch,
             "stop": True}]
        workflow.parser["resume"] = resumed is not None
        inject_protocol(workflow, built)
        start = time.perf_counter()
        execute(workflow)
        history = read_json(os.path.join(prefix_dir, "eval", "history.json"), missing=[])
        prefix = {"state": state_path, "epoch": epoch, "history": history,
                  "best": os.path.join(prefix_dir, "models", "model_best_val.pt"),
                  # the wall time of the whole prefix is unknown when it was resumed
                  "train_s": time.perf_counter() - start if resumed is None else None,
                  "resumed_after_epoch": resumed, "best_val": best_val(history), "data_fingerprint": fingerprint}
        write_json(record_path, prefix)
        logger.info("%s for seed %s, %s: %d epochs%s", name, run["seed"], run["noise"], epoch,
                    f" in {prefix['train_s']:.0f} s" if resumed is None else f", resumed after epoch {resumed}")
        context["prefix"][key] = prefix
        return prefix

    def _one(self, run: dict, common: dict, context: dict, out: str, keep_checkpoints: bool) -> dict:
        """Train and evaluate one run. Interrupted (killed) before, it goes on where it stopped: a run whose training
        finished is only evaluated; one killed in training resumes from its last epoch's training state
        (``training_state.pt``, the bundle's ``resume``); a folder of another protocol or data starts afresh."""
        run_dir = os.path.join(out, "runs", run_key(run))
        ckpt_dir, output_dir = os.path.join(run_dir, "models"), os.path.join(run_dir, "eval")
        prefix = (self._prefix(run, common, context, out, prefix_overrides(run["method"]))
                  if context["branch"] and branchable(run["method"]) else None)
        workflow = self._workflow(run["method"], run, common, context["recipe"], run_dir)
        built, fingerprint = self._data(workflow, run, context)
        config, method_overrides = METHODS[run["method"]]
        identity = {"run": run_key(run), "config": config, "data_fingerprint": fingerprint, "recipe": context["recipe"],
                    "options": jsonable({**common, **method_overrides}),
                    "prefix": None if prefix is None else {"state": prefix["state"], "epoch": prefix["epoch"]}}
        marker = read_json(os.path.join(run_dir, RUN_MARKER), missing={}) if os.path.isdir(run_dir) else {}
        averaged = workflow.parser.get_parsed_content("ema_decay") is not None
        raw_path = os.path.join(ckpt_dir, "model_raw.pt")
        best = os.path.join(ckpt_dir, "model_best_val.pt")
        # last: the product's model (the weight average after the last epoch, or the raw weights without one)
        checkpoints = {"best": best, "last": os.path.join(ckpt_dir, "model.pt"), **({"last_raw": raw_path} if averaged else {})}
        trained = marker.get("trained") if marker.get("identity") == identity else None
        if trained is not None and not all(os.path.isfile(path) for path in checkpoints.values()):
            trained = None
        if trained is None:
            resumed = resume_point(run_dir, identity, os.path.join(ckpt_dir, "training_state.pt"),
                                    int(workflow.parser.get_parsed_content("epochs")))
            if prefix is not None and resumed is None:  # restored when the trainer starts, before any other handler
                workflow.parser["train#handlers"] = [{"_target_": "robustmri.engine.training_state.LoadTrainingState",
                                                      "path": prefix["state"]}] + workflow.parser["train#handlers"]
            if averaged:  # the raw last-epoch weights too, to measure what the weight average does
                workflow.parser["train#handlers"] = workflow.parser["train#handlers"] + [
                    {"_target_": "robustmri.engine.checkpoint.SaveFinalModel", "model": "@network", "path": raw_path}]
            workflow.parser["resume"] = resumed is not None
            inject_protocol(workflow, built)
            start = time.perf_counter()
            execute(workflow)
            # the run's wall time is unknown when it was resumed (or branched from a resumed prefix)
            train_s = time.perf_counter() - start if resumed is None else None
            trained = {"train_s": train_s, "resumed_after_epoch": resumed,
                       "wrong_training_labels": noisy_label_record(workflow.parser.get_parsed_content("data").train)[
                           "flipped"]}  # after any relabelling
            write_json(os.path.join(run_dir, RUN_MARKER), {"identity": identity, "trained": trained})
        else:
            inject_protocol(workflow, built)
            logger.info("%s: training had finished; evaluating", run_key(run))
        train_s = trained["train_s"]
        data = workflow.parser.get_parsed_content("data")
        network = workflow.parser.get_parsed_content("network")
        history = read_json(os.path.join(output_dir, "history.json"), missing=[])
        if prefix is not None:
            # as one uninterrupted run: the prefix's epochs lead the history, and its best checkpoint
            # stays the best unless a later epoch is strictly better (MONAI's CheckpointSaver rule)
            branch_best = best_val(history)
            history = prefix["history"] + history
            if branch_best <= prefix["best_val"]:
                checkpoints["best"] = prefix["best"]
            train_s = None if train_s is None or prefix["train_s"] is None else train_s + prefix["train_s"]
        # the test split as the method predicts it (test-time noise matching, ...); validation stayed plain
        inferer = workflow.parser.get_parsed_content("test_inferer") if "test_inferer" in workflow.parser else None
        reports = evaluate_checkpoints_on(network, checkpoints, data.test, data.class_names, inferer=inferer)
        by_p = _by_share(network, checkpoints, data.test_at, data.class_names, run["seed"], inferer)
        # a model trained on clean images, on the noisy test images of the runs trained on each noise
        by_noise = {noise: _by_share(network, checkpoints, variants, data.class_names, run["seed"], inferer)
                    for noise, variants in data.test_under.items()}
        by_shift = self._shifts(network, checkpoints["last"], data, workflow, run, context, out)
        outputs = {name: read_json(os.path.join(output_dir, name)) for name in METHOD_OUTPUTS
                   if os.path.isfile(os.path.join(output_dir, name))}
        influence = outputs.get("influence_summary.json", {})
        n2v = outputs.get("n2v_summary.json", {})
        if not keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return {**run, "config": config, "overrides": method_overrides, "recipe": context["recipe"],
                "branched_after_epoch": prefix["epoch"] if prefix is not None else None,
                "resumed_after_epoch": trained["resumed_after_epoch"],
                "precision": getattr(network, "robustmri_precision", None),
                "val_fraction": float(workflow.parser.get_parsed_content("split_fractions")[1]),
                "n": {name: len(data.split(name)) for name in ("train", "val", "test")},
                "data_fingerprint": fingerprint,
                "test": {tag: {k: r[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro",
                                                 "per_class")}
                         for tag, r in reports.items()},
                "test_by_p": by_p,
                **({"test_by_noise": by_noise} if by_noise else {}),
                **({"test_by_shift": by_shift[0]["test"], "val_by_shift": by_shift[0]["val"],
                    "shift_excluded": by_shift[1], "shift_catalog": context["shift_catalog"], **by_shift[2],
                    "preprocess": workflow.parser.get_parsed_content("preprocess")} if by_shift else {}),
                "history": history,
                "method_outputs": outputs,
                "wrong_training_labels": trained["wrong_training_labels"],
                "timings": {"train_s": train_s, "influence_s": influence.get("total_s"),
                            "n2v_s": (n2v.get("train_s", 0) + n2v.get("denoise_s", 0)) if n2v else None},
                **run_provenance(),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _shifts(self, network, checkpoint: str, data, workflow, run: dict, context: dict, out: str):
        """The model ``checkpoint`` on the validation and the test split under every site shift, prepared with
        the run's own preprocessing: ``{split: {shift: {accuracy, balanced_accuracy, n}}}`` and the count of
        slices left out per split, and for the profile's ``shift_measures`` methods the site calibration and
        abstention scores per shift (:mod:`robustmri.bench.shift_measures`; ``{}`` for other methods), or None
        when the profile asks for no shift. The validation results are what a choice between configurations
        may use; the test results are only reported."""
        if not context["eval_shifts"]:
            return None
        size = int(workflow.parser.get_parsed_content("spatial_size"))
        preprocess = workflow.parser.get_parsed_content("preprocess")
        results, excluded_counts, rendered = {}, {}, {}
        for split in SHIFT_SPLITS:
            items = data.split(split)
            key = (split, size, tuple(int(item["id"]) for item in items))
            if key not in context["shift_sets"]:
                if len(context["shift_sets"]) >= len(SHIFT_SPLITS):  # one seed's splits in memory at a time
                    context["shift_sets"].clear()
                start = time.perf_counter()
                catalog = context["shift_catalog"]
                render_size = int(context.get("shift_render_size") or size)
                # the first bench's cache folder stays where its records expect it
                folder = f"{size}px" if render_size == size else f"{size}px_rendered_{render_size}px"
                cache = os.path.join(out, "shifted", *([] if catalog == "site" else [catalog]), folder)
                context["shift_sets"][key] = shifted_test_sets(items, size, context["eval_shifts"], workers=2,
                                                               cache_dir=cache, catalog=catalog,
                                                               raw_images=_synthetic_raw(workflow, data),
                                                               render_size=render_size)
                logger.info("site-shift %s sets for seed %s: %d slices, %d left out, %.0f s", split, run["seed"],
                            len(items), len(context["shift_sets"][key][1]), time.perf_counter() - start)
            sets, excluded = context["shift_sets"][key]
            if preprocess not in sets:
                raise ValueError(f"the profile renders the shifted splits for {sorted(sets)}, not for the run's "
                                 f"preprocessing {preprocess!r}")
            results[split], rendered[split] = {}, sets[preprocess]
            for shift, shifted in sets[preprocess].items():
                report = evaluate_checkpoints_on(network, {"last": checkpoint}, shifted, data.class_names)["last"]
                results[split][shift] = {"accuracy": report["accuracy"],
                                         "balanced_accuracy": report["balanced_accuracy"], "n": report["n"]}
            excluded_counts[split] = len(excluded)
        measures = {}
        if run["method"] in context["shift_measures"]:
            start = time.perf_counter()
            measures["calibrated_by_shift"], measures["calibration_skipped"] = calibrated_by_shift(
                network, checkpoint, rendered["val"], rendered["test"], data.class_names)
            measures["abstention_by_shift"] = abstention_by_shift(
                network, checkpoint, data.split("train"), {"validation": data.split("val"), "test": data.split("test")},
                {"validation": rendered["val"], "test": rendered["test"]})
            logger.info("%s: site calibration and abstention scores under %d shifts, %.0f s", run_key(run),
                        len(rendered["test"]), time.perf_counter() - start)
        return results, excluded_counts, measures

    # -- bookkeeping --------------------------------------------------------------------

    @staticmethod
    def _check_same_protocol(out: str, protocol: dict, records: str = "runs.jsonl") -> None:
        previous = read_json(os.path.join(out, "protocol.json"), missing={}).get("protocol")
        if previous and "recipe_settings" in previous:  # settings recorded since: earlier runs had the legacy value
            previous = {**previous, "recipe_settings": {**LEGACY_RECIPE, **previous["recipe_settings"]}}
        if previous and "precision" not in previous:  # recorded before the protocol named it: every such run was fp32
            previous = {**previous, "precision": BENCHMARK_PRECISION}
        if previous and os.path.isfile(os.path.join(out, records)) and previous != protocol:
            changed = {k: (previous.get(k), protocol.get(k)) for k in set(previous) | set(protocol)
                       if previous.get(k) != protocol.get(k)}
            raise UsageError(f"{out} holds runs of another protocol (changed: {changed}); "
                             "use another --out folder, or delete it to start again")

    @staticmethod
    def _save_protocol(out: str, protocol: dict, host: dict, **finished) -> None:
        """``protocol.json``: the protocol and machine at the start; wall time and date added at the end."""
        write_json(os.path.join(out, "protocol.json"), {"protocol": protocol, "machine": host, **finished})


def _check_same_precision(runs: list[dict], precision: str, path: str) -> None:
    """Refuse to resume a folder holding a run trained in another precision than its protocol's: that run would
    count as done and be paired with the others (a record without one was trained before records named it, in fp32).
    ``auto`` lets each run choose, so nothing is checked."""
    if precision == "auto":
        return
    other = [run_key(r) for r in runs if (r.get("precision") or BENCHMARK_PRECISION) != precision]
    if other:
        raise UsageError(f"{path} holds {len(other)} run(s) trained in another precision than the protocol's "
                         f"{precision} (first: {other[0]}); remove those lines to run them again in {precision}")


def _start(bundle_dir: str, profile: str, methods, device, dataset_dir, out: str, overrides: dict, run: bool = False):
    """Checked settings of an invocation: the profile, its methods, device, data folder, output folder
    (created, logging into ``benchmark.log``) and the bundle config overrides of every run. ``run``: the
    profile's own runs, which branch where the profile says so (:func:`_check_branching`)."""
    if profile not in PROFILES:
        raise UsageError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    settings = PROFILES[profile]
    methods = as_list(methods) or settings["methods"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    unknown = sorted(key for key in overrides if key.split("#")[0] not in _config_ids(bundle_dir, methods))
    if unknown:  # e.g. ``run --help``: fire hands unknown flags to ``**overrides``
        raise UsageError(f"unknown option(s) {', '.join('--' + k for k in unknown)}: neither an option of this command "
                         "nor a bundle config id of its methods (options: `python scripts/benchmark.py run -- --help`)")
    if run:
        _check_branching(profile, methods, {**settings["config"], **overrides})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset_dir = os.path.abspath(dataset_dir) if dataset_dir else None
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    _log_to(os.path.join(out, "benchmark.log"))
    return settings, methods, device, dataset_dir, out, {"precision": BENCHMARK_PRECISION, **settings["config"],
                                                         **overrides}


def _check_branching(profile: str, methods, config: dict) -> None:
    """Refuse a profile whose runs branch from a shared prefix of ``influence_epoch`` epochs when the runs are not
    longer than their prefix (a branch would start after its last epoch)."""
    if not PROFILES[profile].get("branch") or not any(branchable(m) for m in methods):
        return
    if "epochs" not in config or "influence_epoch" not in config:  # every branching profile sets both
        return
    epochs, influence_epoch = int(config["epochs"]), int(config["influence_epoch"])
    if epochs <= influence_epoch:
        raise UsageError(f"the {profile} profile's runs branch after influence_epoch {influence_epoch}, so --epochs "
                         f"{epochs} leaves them nothing to train: give --epochs above {influence_epoch}, or a lower "
                         "--influence_epoch")


class RunsFailed(RuntimeError):
    """Runs of an invocation failed (the others were recorded; the same command retries them); ``failed``: each
    failed run with its ``error``."""

    def __init__(self, message: str, failed: list[dict]):
        super().__init__(message)
        self.failed = failed


class UsageError(ValueError):
    """A command that cannot run as given: reported in one line (``benchmark.py: ...``), exit status 2."""


def _config_ids(bundle_dir: str, methods) -> set[str]:
    """The top-level config ids of the bundle configs of ``methods`` under every recipe (what ``--key value`` may set)."""
    ids = set()
    for config in dict.fromkeys(METHODS[m][0] for m in methods):
        for recipe in RECIPES.values():
            workflow = load_workflow(bundle_dir, [os.path.join(bundle_dir, config)]
                                     + [os.path.join(bundle_dir, "configs", r) for r in recipe], {})
            ids |= set(workflow.parser.get())
    return ids


def recipe_settings(bundle_dir: str, recipe: str, config: dict) -> dict:
    """The bundle's values of :data:`RECIPE_SETTINGS` under ``recipe`` and the profile's overrides."""
    workflow = load_workflow(bundle_dir, [os.path.join(bundle_dir, "configs", "train.json")]
                             + [os.path.join(bundle_dir, "configs", r) for r in RECIPES[recipe]], dict(config))
    return {key: workflow.parser[key] for key in RECIPE_SETTINGS}


def weight_average_tables(runs: list[dict]) -> list[str]:
    """Per method, the product's model (weight average, ``last``) paired against the raw last-epoch weights of the
    same run (``last_raw``); empty when the runs kept no average."""
    averaged = [r for r in runs if "last_raw" in r.get("test_by_p", {})]
    tables = []
    for method in dict.fromkeys(r["method"] for r in averaged):
        mine = [r for r in averaged if r["method"] == method]
        raw = [{**r, "method": f"{method}_raw", "test_by_p": {"last": r["test_by_p"]["last_raw"]}} for r in mine]
        tables.append(f"#### {method}: weight average (the model) against the raw last-epoch weights\n\n"
                      + paired_table(raw + mine, baseline=f"{method}_raw", checkpoint="last"))
    return tables


def _by_share(network, checkpoints: dict[str, str], variants: dict[float, list[dict]], class_names,
              seed: int, inferer=None) -> dict[str, dict[str, dict]]:
    """``{checkpoint tag: {p: accuracy, balanced accuracy, patient-grouped bootstrap interval, n}}`` on each
    variant of the test split (``{p: items}``), predicted through ``inferer`` (None: the network alone)."""
    by_p = {tag: {} for tag in checkpoints}
    for share, items in variants.items():
        groups = np.array([item["group"] for item in items])
        for tag, report in evaluate_checkpoints_on(network, checkpoints, items, class_names, with_correct=True,
                                                   inferer=inferer).items():
            low, high = grouped_bootstrap_ci(report.pop("correct"), groups, seed=seed)
            by_p[tag][f"{share:g}"] = {"accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"],
                                       "accuracy_ci95": [low, high], "n": report["n"]}
    return by_p


def _synthetic_raw(workflow, data):
    """The raw embedded synthetic slices by id (the protocol's generator, same arguments), or None for real data."""
    value = workflow.parser.get_parsed_content  # the protocol node itself is the built data by now
    return synthetic_raw_images(data, value("synthetic_patients"), value("spatial_size"), value("seed"))


def _dataset_name(dataset_dir: str | None) -> str:
    return dataset_dir or os.environ.get("BRAIN_TUMOR_DATA") or "embedded synthetic set"


def _common_config(config: dict, dataset_dir: str | None, device: torch.device) -> dict:
    """Bundle config overrides of every run of one invocation."""
    return {**config, "dataset_dir": dataset_dir or "", "device": f"$torch.device('{device}')", "num_workers": 0}


def _log_to(path: str) -> None:
    """Everything at INFO into the log file; the console keeps the progress bar and warnings."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in root.handlers):
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        root.addHandler(console)
