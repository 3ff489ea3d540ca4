"""The MONAI Label app: served for real (``monailabel start_server`` on 127.0.0.1), and its tasks in process.

Needs the ``[label]`` extra (``make test`` installs it); skipped, and counted, without it.
The rest of the suite never imports monailabel.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from robustmri import INTENDED_USE
from robustmri.data.preprocessing import PREPROCESSING
from robustmri.data.readers import read_image
from robustmri.engine.workflow import execute, load_workflow
from robustmri.networks import PaperCNN
from robustmri.review.orders import DEFAULT_ORDER, DEFAULT_ORDER_REASON, ORDERS

pytest.importorskip("monailabel", reason="MONAI Label is the optional [label] extra")

from label_server import (  # noqa: E402  (tests/apps/label_server.py, after the skip)
    APP,
    BROKEN,
    CLASS_NAMES,
    ServerError,
    stop,
)
from label_server import edit_config as _edit_config  # noqa: E402
from label_server import free_port as _free_port  # noqa: E402
from label_server import make_bundle as _make_bundle  # noqa: E402
from label_server import make_studies as _make_studies  # noqa: E402
from label_server import request as _request  # noqa: E402
from label_server import tail as _tail  # noqa: E402
from label_server import wait as _wait  # noqa: E402

DEADLINE_S = 150


def _bundle_inference(bundle, image, output_file):
    """Probabilities of ``image`` from the bundle's own inference workflow (inference.json, no overrides)."""
    execute(load_workflow(bundle, ["inference.json"], {"input_files": str(image), "output_file": str(output_file),
                                                       "device": "cpu"}, workflow_type="infer"))
    predictions = json.loads(output_file.read_text())["predictions"]
    assert len(predictions) == 1, predictions
    return predictions[0]["probabilities"]


def _write_tracking_settings(path, log_dir):
    """A MONAI tracking settings file that needs no mlflow (a TensorBoard handler writing to ``log_dir``);
    the server names it with ``--conf tracking_settings``, the only file a train request may name."""
    path.write_text(json.dumps({
        "handlers_id": {"trainer": {"id": "train#trainer", "handlers": "train#handlers"}},
        "configs": {"trainer": {"_target_": "TensorBoardStatsHandler", "log_dir": str(log_dir),
                                "tag_name": "tracked_loss",
                                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"}}}))
    return path


def _score_unless_busy(base):
    try:
        return _request(f"{base}/scoring/influence_review?run_sync=true", "POST")
    except ServerError as err:
        if "HTTP 429" in str(err):  # "Scoring Task is Already Running"
            return None
        raise


@pytest.mark.slow
@pytest.mark.monailabel
def test_server_infers_scores_and_serves_the_most_suspicious_label(tmp_path):
    studies = _make_studies(tmp_path / "studies")
    # a local bundle: no --conf spatial_size/network_padding below, they come from models/model_metadata.json
    bundle = _make_bundle(tmp_path / "bundle")
    app = tmp_path / "app"  # start_server creates model/, logs/, bin/ in the app folder: keep them out of the repo
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin"))

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    command = [os.path.join(os.path.dirname(sys.executable), "monailabel"), "start_server", "--app", str(app),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "models",
               "brain_tumour", "--conf", "bundle_path", str(bundle), "--conf", "tracking_settings",
               str(_write_tracking_settings(tmp_path / "tracking.json", tmp_path / "tracking"))]
    log_path = tmp_path / "server.log"
    deadline = time.monotonic() + DEADLINE_S
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                   start_new_session=True)
    try:
        _exercise(base, deadline, process, log_path, bundle, studies, tmp_path)
    except ServerError as err:
        pytest.fail(f"{err}\nserver log:\n{_tail(log_path)}")
    finally:
        stop(process)


def _exercise(base, deadline, process, log_path, bundle, studies, tmp_path):
    """/info/, infer on a study image, ISP training, influence scoring, then the active-learning strategy."""
    info = _wait(lambda: _request(f"{base}/info/", timeout=5), deadline, "/info/", process, log_path)
    assert info["models"]["brain_tumour"]["type"] == "classification"
    assert set(info["strategies"]) >= {"most_suspicious"} and "influence_review" in info["scoring"]
    assert info["trainers"]["brain_tumour"]["config"]["max_epochs"] == 40  # the bundle's epochs
    assert info["labels"] == list(CLASS_NAMES) and info["train_stats"] == {"brain_tumour": {}}
    with pytest.raises(ServerError) as err:  # nothing scored yet: 409 and what to do, not an empty 200
        _request(f"{base}/activelearning/most_suspicious", "POST")
    assert err.value.status == 409
    detail = json.loads(err.value.body)["detail"]
    assert "POST /scoring/influence_review" in detail["message"] and "POST /train/brain_tumour" in detail["message"]
    assert detail["progress"] == {"labelled": 12, "scored": 0, "pending": 0, "reviewed": 0, "corrected": 0}

    # infer: inference.json's preprocessing, network and softmax, so the bundle's own workflow agrees
    result = _request(f"{base}/infer/brain_tumour?image=case03&output=json", "POST")
    probabilities = result["probabilities"]
    assert list(probabilities) == list(CLASS_NAMES)
    assert abs(sum(probabilities.values()) - 1.0) < 1e-5
    assert result["class"] == max(probabilities, key=probabilities.get)
    expected = _bundle_inference(bundle, studies / "case03.png", tmp_path / "bundle_predictions.json")
    assert probabilities == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ServerError, match="HTTP 500"):  # raised, not classified as a black image
        _request(f"{base}/infer/brain_tumour?image={BROKEN[:-4]}&output=json", "POST")
    error = f"{studies / BROKEN}: cannot classify (not a readable image"
    _wait(lambda: error in _tail(log_path, 10**6), deadline, "the infer error in the server log", process, log_path)

    # train: the stock overrides (train#trainer#max_epochs, train#handlers with the pretrained
    # checkpoint's loader) and experiment tracking, here with a settings file that needs no mlflow
    tracking_dir, tracking = tmp_path / "tracking", tmp_path / "tracking.json"  # see _write_tracking_settings
    assert not (bundle / "models" / "model_best_val.pt").exists()
    _request(f"{base}/train/brain_tumour?run_sync=true", "POST", timeout=120,
             body={"max_epochs": 2, "influence_epoch": 1, "val_split": 0.34, "device": "cpu",
                   "tracking": str(tracking)})  # the settings file named by --conf tracking_settings
    assert (bundle / "models" / "model_best_val.pt").is_file()  # the bundle's ISP run wrote its checkpoints
    with open(bundle / "eval" / "influence_summary.json") as handle:
        summary = json.load(handle)
    assert summary["method"] == "ISP" and summary["epoch"] == 1 and summary["n_train"] + summary["n_val"] == 12
    with open(bundle / "eval" / "history.json") as handle:
        assert len(json.load(handle)) == 2  # train#trainer#max_epochs, not the bundle's 40 epochs
    assert glob.glob(str(tracking_dir / "events.out.tfevents.*")), "the tracking handler did not run"
    executed = sorted(glob.glob(str(bundle / "eval" / "config_*.json")))  # saved by MONAI's tracking
    assert len(executed) == 1
    with open(executed[0]) as handle:
        config = json.load(handle)
    assert config["train"]["trainer"]["max_epochs"] == 2 and config["epochs"] == 40
    loader = config["train"]["handlers"][0]
    assert loader["_target_"] == "CheckpointLoader" and loader["load_path"] == str(bundle / "models" / "model.pt")
    assert config["train"]["handlers"][-1]["log_dir"] == str(tracking_dir)
    assert (config["spatial_size"], config["network_padding"]) == (64, 2)  # as model.pt was trained
    with open(bundle / "eval" / "history.json") as handle:
        history = json.load(handle)
    stats = _request(f"{base}/info/")["train_stats"]["brain_tumour"]  # the last training's metrics
    assert stats["epochs"] == 2 and stats["last_epoch"] == history[-1] and stats["method"] == "ISP"
    assert stats["best_val_accuracy"] == max(h["val_accuracy"] for h in history)
    assert stats["n_train"] + stats["n_val"] == 12

    # training starts a background scoring run; score again, synchronously, once it is done
    scoring = _wait(lambda: _score_unless_busy(base), deadline, "the post-training scoring", process, log_path)
    assert scoring["scored"] == 12 and scoring["skipped"] == []
    assert scoring["damping"] == 0.01  # isp.json's influence_damping
    assert scoring["order"] == DEFAULT_ORDER
    sample = _request(f"{base}/activelearning/most_suspicious", "POST")
    infos = {f"case{k:02d}": _request(f"{base}/datastore/image/info?image=case{k:02d}")["influence_review"]
             for k in range(12)}
    assert sample["id"] == min(infos, key=lambda image_id: infos[image_id]["rank"])
    assert sample["score"] == sample["influence_score"] == pytest.approx(infos[sample["id"]]["score"])
    assert sample["rank"] == 1 and sample["of"] == 12 and sample["percentile"] == pytest.approx(100 / 12, abs=0.01)
    assert sample["pending"] == 12 and sample["reviewed"] == 0
    assert sample["order"] == DEFAULT_ORDER and sample["explanation"] == ORDERS[DEFAULT_ORDER].explanation
    assert sample["order_reason"] == DEFAULT_ORDER_REASON
    assert sorted(info["rank"] for info in infos.values()) == list(range(1, 13))
    for info in infos.values():  # what the page shows without another infer call
        assert info["order"] == DEFAULT_ORDER and list(info["probabilities"]) == list(CLASS_NAMES)
        assert sum(info["probabilities"].values()) == pytest.approx(1, abs=1e-6)
        assert info["predicted"] == max(info["probabilities"], key=info["probabilities"].get)
    assert sample["predicted"] == infos[sample["id"]]["predicted"]


# ---- the app's tasks in process: no server, the same classes start_server builds ----

@pytest.fixture
def app_lib(monkeypatch):
    """The app's ``lib`` package importable (as start_server makes it), and forgotten afterwards."""
    monkeypatch.syspath_prepend(APP)
    yield
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        del sys.modules[name]


def _datastore(studies):
    from monailabel.config import settings
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore(str(studies), extensions=[*settings.MONAI_LABEL_DATASTORE_FILE_EXT, "*.label.json"],
                          auto_reload=False)


@pytest.mark.monailabel
def test_infer_task_raises_on_an_unreadable_image_and_matches_the_bundle_with_a_monai_densenet(tmp_path, app_lib):
    from monai.networks.nets import DenseNet

    from lib.infers.classification import ClassificationInfer

    studies = _make_studies(tmp_path / "studies")
    network_def = {"_target_": "monai.networks.nets.DenseNet", "spatial_dims": 2, "in_channels": 1,
                   "out_channels": "@num_classes", "init_features": 8, "growth_rate": 8, "block_config": [2, 2],
                   "bn_size": 2}
    torch.manual_seed(0)
    network = DenseNet(spatial_dims=2, in_channels=1, out_channels=3, init_features=8, growth_rate=8,
                       block_config=(2, 2), bn_size=2)
    bundle = _make_bundle(tmp_path / "bundle", network=network, network_def=network_def, padding=0)
    task = ClassificationInfer(str(bundle), {})
    assert task.is_valid() and isinstance(task.network, DenseNet)

    _, result = task({"image": str(studies / "case05.png"), "device": "cpu"})
    assert abs(sum(result["probabilities"].values()) - 1.0) < 1e-5
    expected = _bundle_inference(bundle, studies / "case05.png", tmp_path / "predictions.json")
    assert result["probabilities"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=rf"^{studies / BROKEN}: cannot classify \(not a readable image"):
        task({"image": str(studies / BROKEN), "device": "cpu"})


@pytest.mark.monailabel
def test_app_info_the_model_and_its_answers_state_the_intended_use(tmp_path, app_lib):
    """/info/ (the app's info, what the review page shows), the model's info and an infer result."""
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    app_class = get_class_of_subclass_from_file("main", os.path.join(APP, "main.py"), "MONAILabelApp")  # as served
    studies = _make_studies(tmp_path / "studies")
    bundle = _make_bundle(tmp_path / "bundle")
    app = app_class(str(tmp_path / "app"), str(studies), {"bundle_path": str(bundle)})
    info = app.info()
    assert info["intended_use"] == INTENDED_USE and INTENDED_USE in info["description"]
    assert info["models"]["brain_tumour"]["intended_use"] == INTENDED_USE
    _, result = app._infers["brain_tumour"]({"image": str(studies / "case01.png"), "device": "cpu"})
    assert result["intended_use"] == INTENDED_USE and result["class"] in CLASS_NAMES


@pytest.mark.monailabel
@pytest.mark.parametrize("preprocess", sorted(PREPROCESSING))
def test_infer_task_prepares_images_with_the_models_preprocessing(tmp_path, app_lib, preprocess):
    """Parity: the app's pre-transforms give the input training gives, and the bundle's probabilities."""
    from lib.infers.classification import ClassificationInfer

    studies = _make_studies(tmp_path / "studies")
    framed = studies / "framed.png"  # off-centre and not square: the two preprocessings differ on it
    pixels = np.asarray(Image.open(studies / "case03.png"))
    Image.fromarray(np.pad(pixels, ((2, 9), (20, 3)))).save(framed)
    bundle = _make_bundle(tmp_path / "bundle", preprocess=preprocess)
    task = ClassificationInfer(str(bundle), {})
    data = {"image": str(framed)}
    for transform in task.pre_transforms(data):
        data = transform(data)
    expected = PREPROCESSING[preprocess](read_image(str(framed)), 64)
    np.testing.assert_array_equal(np.asarray(data["image"])[0], expected)
    other = PREPROCESSING["head" if preprocess == "minmax" else "minmax"](read_image(str(framed)), 64)
    assert not np.allclose(expected, other, atol=0.05)
    _, result = task({"image": str(framed), "device": "cpu"})
    bundle_probabilities = _bundle_inference(bundle, framed, tmp_path / "predictions.json")
    assert list(result["probabilities"].values()) == pytest.approx(list(bundle_probabilities.values()), abs=1e-6)


@pytest.mark.monailabel
def test_infer_task_says_whether_the_image_is_assessable_and_gives_no_class_when_not(tmp_path, app_lib):
    from lib.infers.classification import ClassificationInfer
    from robustmri.abstention.fit import scores_of
    from robustmri.abstention.state import load_state

    studies = _make_studies(tmp_path / "studies")
    noise = studies / "noise.png"  # far from any training slice
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(noise)
    bundle = _make_bundle(tmp_path / "bundle")
    state = load_state(bundle / "models" / "model.pt")
    task = ClassificationInfer(str(bundle), {})
    _, study = task({"image": str(studies / "case03.png"), "device": "cpu"})
    _, far = task({"image": str(noise), "device": "cpu"})
    for result in (study, far):
        assert result["abstention"]["score"] == "mahalanobis" and result["abstention"]["threshold"] == state.threshold
        assert result["assessable"] == (result["abstention_score"] <= state.threshold)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)  # kept either way
    assert study["assessable"] and study["class"] in CLASS_NAMES and "reason" not in study
    assert not far["assessable"] and far["class"] is None and far["reason"].startswith("not assessable")
    # the score is the state's score of the image as the task prepares it
    data = {"image": str(noise)}
    for transform in task.pre_transforms(data):
        data = transform(data)
    expected = scores_of(state, task._get_network("cpu", None), torch.as_tensor(data["image"])[None])[0]
    assert far["abstention_score"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.monailabel
def test_infer_task_serves_the_site_checkpoint_named_by_conf_and_says_when_it_is_stale(tmp_path, app_lib, caplog):
    """``--conf checkpoint model_site.pt``: the calibrated weights, its abstention state and its record are served."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureTyped

    from lib.infers.classification import ClassificationInfer
    from robustmri.abstention.state import load_state
    from robustmri.data.transforms import LoadPreprocessd
    from robustmri.deploy.calibration import calibrate_site
    from robustmri.deploy.inference import file_items

    studies = _make_studies(tmp_path / "studies", n=40)
    bundle = _make_bundle(tmp_path / "bundle")
    models = bundle / "models"
    loader = DataLoader(Dataset(file_items(str(studies)), transform=Compose([
        LoadPreprocessd(keys="image", spatial_size=64, preprocess="minmax", on_error="mark"),
        EnsureTyped(keys="image", track_meta=False)])), batch_size=16)
    calibrate_site(PaperCNN(spatial_size=64, padding=2), str(models / "model.pt"), loader, CLASS_NAMES, min_images=30,
                   min_class_images=3)
    site_state = load_state(models / "model_site.pt")

    served = ClassificationInfer(str(bundle), {"checkpoint": "model_site.pt"})
    info = served.info()
    assert info["checkpoint"] == "model_site.pt"
    assert info["calibration"]["images"] == 40 and info["calibration"]["source_current"] is True
    _, result = served({"image": str(studies / "case03.png"), "device": "cpu"})
    assert result["abstention"]["threshold"] == site_state.threshold  # the site's state, not model.pt's
    # the probabilities are those of the calibrated weights
    site_network = PaperCNN(spatial_size=64, padding=2)
    site_network.load_state_dict(torch.load(models / "model_site.pt", weights_only=True))
    data = {"image": str(studies / "case03.png")}
    for transform in served.pre_transforms(data):
        data = transform(data)
    with torch.no_grad():
        expected = torch.softmax(site_network.eval()(torch.as_tensor(data["image"])[None]), 1)[0]
    assert list(result["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-6)
    home = ClassificationInfer(str(bundle), {})
    assert home.info()["checkpoint"] == "model.pt" and home.info()["calibration"] is None
    _, home_result = home({"image": str(studies / "case03.png"), "device": "cpu"})
    assert home_result["probabilities"] != result["probabilities"]

    # training (or an upload) replaces model.pt: the site checkpoint now holds older weights, and says so
    torch.manual_seed(7)
    torch.save(PaperCNN(spatial_size=64, padding=2).state_dict(), models / "model.pt")
    with caplog.at_level("WARNING"):
        stale = ClassificationInfer(str(bundle), {"checkpoint": "model_site.pt"})
    assert stale.info()["calibration"]["source_current"] is False
    assert "calibrate again" in caplog.text
    for name, error in (("../model.pt", ValueError), ("model_site", ValueError), ("missing.pt", FileNotFoundError)):
        with pytest.raises(error, match="--conf checkpoint"):
            ClassificationInfer(str(bundle), {"checkpoint": name})


@pytest.mark.monailabel
def test_review_scores_use_the_bundles_influence_damping(tmp_path, app_lib):
    from robustmri.influence import DEFAULT_DAMPING, self_influence_scores
    from robustmri.review.label_review import load_images

    from lib.scoring.influence_review import INFO_KEY, InfluenceReviewScoring, labelled_images

    studies = _make_studies(tmp_path / "studies")
    bundle = _make_bundle(tmp_path / "bundle")
    _edit_config(bundle, "isp.json", influence_damping=0.5)
    datastore = _datastore(studies)
    result = InfluenceReviewScoring(str(bundle), {"review_order": "self_influence"})({"device": "cpu"}, datastore)
    assert result["scored"] == 12 and result["damping"] == 0.5 and result["order"] == "self_influence"

    network = PaperCNN(spatial_size=64, padding=2)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    items, skipped = labelled_images(datastore, CLASS_NAMES)
    images, kept, _ = load_images(items, 64, preprocess="minmax")
    labels = [item.label for item in kept]
    stored = [datastore.get_image_info(item.image_id)[INFO_KEY]["score"] for item in kept]
    assert len(stored) == 12 and not skipped
    assert stored == pytest.approx(self_influence_scores(network.eval(), images, labels, 0.5).tolist(), rel=1e-4)
    default = self_influence_scores(network, images, labels, DEFAULT_DAMPING)
    assert not np.allclose(stored, default, rtol=1e-2)
    assert InfluenceReviewScoring(str(bundle), {"influence_damping": "0.2"}).damping() == 0.2  # --conf wins


@pytest.mark.monailabel
def test_review_order_is_chosen_by_name_and_the_strategy_serves_its_rank_1(tmp_path, app_lib):
    from robustmri.review.label_review import load_images

    from lib.activelearning.most_suspicious import MostSuspicious, order_reason
    from lib.scoring.influence_review import INFO_KEY, InfluenceReviewScoring, labelled_images

    studies = _make_studies(tmp_path / "studies")
    bundle = _make_bundle(tmp_path / "bundle")
    datastore = _datastore(studies)
    result = InfluenceReviewScoring(str(bundle), {"review_order": "loss"})({"device": "cpu"}, datastore)
    assert result["order"] == "loss"

    network = PaperCNN(spatial_size=64, padding=2)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    items, _ = labelled_images(datastore, CLASS_NAMES)
    images, kept, _ = load_images(items, 64, preprocess="minmax")
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(network.eval()(torch.from_numpy(images)),
                                                   torch.tensor([item.label for item in kept]), reduction="none")
    infos = [datastore.get_image_info(item.image_id)[INFO_KEY] for item in kept]
    assert [info["score"] for info in infos] == pytest.approx(losses.tolist(), rel=1e-4)
    assert [info["rank"] for info in infos] == (np.argsort(np.argsort(-losses.numpy(), kind="stable")) + 1).tolist()
    sample = MostSuspicious()({}, datastore)
    first = kept[int(losses.argmax())].image_id
    assert sample["id"] == first and sample["order"] == "loss" and sample["rank"] == 1
    assert sample["order_reason"] == order_reason("loss")
    assert order_reason(DEFAULT_ORDER) == DEFAULT_ORDER_REASON
    other = next(name for name in ("loss", "random") if name != DEFAULT_ORDER)
    assert order_reason(other).startswith(f"{other} was chosen with --conf review_order; the default, {DEFAULT_ORDER}")
    assert sample["explanation"] == ORDERS["loss"].explanation

    for conf, message in [("influence", "needs a trusted validation set"), ("margin", "unknown review order 'margin'")]:
        with pytest.raises(ValueError, match=f"--conf review_order: .*{message}") as err:
            InfluenceReviewScoring(str(bundle), {"review_order": conf})
        assert "\n" not in str(err.value)


@pytest.mark.monailabel
def test_train_task_runs_isp_json_with_monai_labels_nested_overrides_and_tracking(tmp_path, app_lib):
    """The overrides the task hands monai.bundle.run, applied as MONAI does (with mlflow tracking), not run."""
    from monai.bundle import ConfigWorkflow

    from lib.trainers.isp import ISPTrain

    studies = _make_studies(tmp_path / "studies")
    bundle = _make_bundle(tmp_path / "bundle")
    task = ISPTrain(str(bundle), {})
    assert task.bundle_config_path == str(bundle / "configs" / "isp.json")
    captured = {}
    task.run_single_gpu = lambda request, overrides: captured.update(overrides)
    task({"model": "brain_tumour", "max_epochs": 4, "val_split": 0.25, "device": "cpu", "tracking": "mlflow"},
         _datastore(studies))

    tracking = captured.pop("tracking")
    workflow = ConfigWorkflow(config_file=task.bundle_config_path, meta_file=task.bundle_metadata_path,
                              logging_file=False, tracking=tracking, **captured)
    parser = workflow.parser
    assert parser.get_parsed_content("train#trainer#max_epochs") == 4 and parser.get_parsed_content("epochs") == 40
    assert parser.get_parsed_content("isp#epoch") == 3  # isp.json's influence_epoch 30 of 40 epochs, scaled to 4
    handlers = [h["_target_"] for h in parser["train#handlers"]]
    assert handlers[0] == "CheckpointLoader" and handlers[-1] == "MLFlowHandler"
    assert parser["train#handlers"][0]["load_path"] == str(bundle / "models" / "model.pt")
    assert parser.get_parsed_content("split_fractions") == [0.75, 0.25, 0.0]
    assert (parser.get_parsed_content("spatial_size"), parser.get_parsed_content("network_padding")) == (64, 2)
    data = parser.get_parsed_content("data")  # the bundle's data layer, from the labels.csv the task wrote
    assert len(data.train) + len(data.val) == 12 and not data.test
    assert {item["label"] for item in data.train + data.val} <= {0, 1, 2}

    captured.clear()
    task({"model": "brain_tumour", "max_epochs": 4, "device": "cpu", "pretrained": False}, _datastore(studies))
    targets = [h["_target_"] for h in captured["train#handlers"]]
    assert "CheckpointLoader" not in targets and "robustmri.engine.checkpoint.SaveFinalModel" in targets
    assert captured["influence_epoch"] == 3 and captured["split_fractions"] == [0.8, 0.2, 0.0]
