"""MONAI Label app: the robustmri brain-tumour classifier with label review (wrong labels first).

Start (from the repository root, virtual environment active), on this machine only:

    monailabel start_server --app apps/monailabel --studies /path/to/studies --host 127.0.0.1 --port 8000 \
        --conf models brain_tumour

and open http://127.0.0.1:8000/review/ (the review page). Serving beyond loopback is an explicit
choice with MONAI Label's authentication and restricted CORS origins (README.md beside this file):
the server exits at start-up if the address it binds (the last ``--host``/``-i``, as MONAI Label
parses it, and its listening sockets) is not loopback while authentication is off.

Closed by default (lib/security.py; README.md, "What the server refuses"): a ``Host`` outside
the allow-list is 400; a POST, PUT, PATCH or DELETE without ``X-Requested-With`` is 403; label
tags are ``final``, ``original`` or a plain name (422), label files at most ``max_label_bytes``
(413); inference takes study image ids only (404 for anything else, no uploads); model upload
and delete are off unless ``allow_model_upload``; routes this app does not use (sessions,
batch, proxy, OHIF, WSI, reload, study image upload/delete) are 403. Training runs in MONAI
Label's task process, so the server keeps answering.

``--conf`` keys: ``models`` (comma-separated; this app serves ``brain_tumour``), ``bundle_path``
(default: the repository's ``bundle/``, a local bundle source: nothing is downloaded),
``noise`` (added to training images; default "none"), and overrides of the bundle ids
``spatial_size``, ``network_padding`` (default: as the checkpoint was trained, from
``models/model_metadata.json``), ``influence_damping`` (default: isp.json's), ``review_order`` (the order
the review page serves labelled images in, robustmri.review.orders; default: the one measured best) and
``tracking_settings`` (a MONAI tracking settings file on this machine that train requests may
name as ``tracking``; a request can name nothing else but ``mlflow`` or ``none``),
``serve_unauthenticated``, ``cors_origins``, ``allowed_hosts`` (host names clients use besides
loopback and the bound host), ``max_label_bytes`` (default 65536) and ``allow_model_upload``
(default false).
Train requests are checked against an allow-list (lib/train_request.py), label uploads against
the bundle's classes (lib/datastore.py).
Every task reads the bundle through lib/bundle.py. See README.md beside this file for the
annotator's workflow.
"""

import logging
import os
import sys
from typing import Dict

import requests
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

from robustmri import INTENDED_USE, __version__
from robustmri.review.label_review import LABEL_SUFFIX

from lib import security, server
from lib.activelearning.most_suspicious import MostSuspicious
from lib.bundle import INFER_CONFIG, class_names, read_config
from lib.datastore import ClassLabelDatastore, label_size_limit
from lib.infers.classification import ClassificationInfer
from lib.scoring.influence_review import InfluenceReviewScoring, configured_order
from lib.trainers.isp import ISPTrain

logger = logging.getLogger(__name__)

MODEL_NAME = "brain_tumour"
DEFAULT_BUNDLE = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "bundle"))


class RobustMRIApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        models = [m.strip() for m in conf.get("models", MODEL_NAME).split(",") if m.strip()]
        unknown = sorted(set(models) - {MODEL_NAME})
        if unknown:
            raise ValueError(f"--conf models: unknown model(s) {unknown}; this app serves {MODEL_NAME!r}")
        configured_order(conf)  # an unusable --conf review_order stops the start, before any work
        self.bundle_dir = os.path.realpath(conf.get("bundle_path", DEFAULT_BUNDLE))
        if not os.path.isfile(os.path.join(self.bundle_dir, "configs", "metadata.json")):
            raise FileNotFoundError(f"{self.bundle_dir}: not a bundle folder (no configs/metadata.json); "
                                    "set --conf bundle_path")
        logger.info("bundle: %s", self.bundle_dir)
        self.class_names = class_names(read_config(self.bundle_dir, INFER_CONFIG, conf))
        self.max_label_bytes = label_size_limit(conf)
        self.tracking_settings = conf.get("tracking_settings", "")
        if self.tracking_settings and not os.path.isfile(self.tracking_settings):
            raise FileNotFoundError(f"--conf tracking_settings {self.tracking_settings}: no such file")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="robustmri",
                         description="Brain tumour type (meningioma, glioma, pituitary) from a 2D MRI slice, "
                                     f"with label review (wrong labels first). {INTENDED_USE}",
                         version=__version__, labels=list(self.class_names))
        # scoring is a full feature pass and solve: run it after training, not after every request
        self._auto_update_scoring = False

    def info(self):
        # /info/ is what a client (the review page, a viewer's plug-in) reads first: it states the intended use
        return {**super().info(), "intended_use": INTENDED_USE}

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        fastapi_app = sys.modules.get("monailabel.app")  # the running server, where there is one
        if mode and fastapi_app is not None:
            server.install(fastapi_app.app, self, sys.argv)

    def train_models(self) -> list:
        return list(self._trainers)

    def infer_models(self) -> list:
        return list(self._infers)

    def model_network(self, model: str):
        """A new instance of the network ``model`` serves (inference.json's ``network_def``), untrained."""
        if model not in self._infers:
            raise KeyError(f"{model!r}: not a model of this app")
        return read_config(self.bundle_dir, INFER_CONFIG, self.conf).get_parsed_content("network_def",
                                                                                         instantiate=True)

    def infer(self, request, datastore=None):
        # MONAI Label would read any existing path named as the image: only study images are classified
        security.require_study_image(datastore or self.datastore(), request.get("image"))
        return super().infer(request, datastore)

    def _local_request(self, url, params, action):
        # the task process asks the server to score after training: a state-changing request like any other
        response = requests.post(f"http://127.0.0.1:{settings.MONAI_LABEL_SERVER_PORT}{url}", json=params or {},
                                 headers={security.REQUESTED_WITH: "robustmri"}, timeout=60)
        if response.status_code != 200:
            logger.error("%s not started: HTTP %d %s", action, response.status_code, response.text[:500])
            return None
        return response.json()

    def train(self, request):
        result = super().train(request)
        try:
            self.async_scoring("influence_review")
        except Exception as err:  # the model is trained either way; scoring can be asked for again
            logger.warning("influence review not started after training (%s); POST /scoring/influence_review", err)
        return result

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        # labels are <image id>.label.json files of the bundle's classes, checked at upload
        return ClassLabelDatastore(self.studies, self.class_names, max_label_bytes=self.max_label_bytes,
                                   extensions=[*settings.MONAI_LABEL_DATASTORE_FILE_EXT, f"*{LABEL_SUFFIX}"],
                                   auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                   read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> Dict[str, InferTask]:
        task = ClassificationInfer(self.bundle_dir, self.conf)
        if not task.is_valid():
            logger.warning("no checkpoint at %s/models/model.pt: train first (POST /train/%s)", self.bundle_dir,
                           MODEL_NAME)
        return {MODEL_NAME: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {MODEL_NAME: ISPTrain(self.bundle_dir, self.conf)}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"influence_review": InfluenceReviewScoring(self.bundle_dir, self.conf)}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"most_suspicious": MostSuspicious(), "random": Random()}
