"""What this app adds to MONAI Label's HTTP server: checked train requests and the review page.

MONAI Label builds its FastAPI server before it creates the app, and offers no hook for
routes; :func:`install` runs when the server switches the app to server mode and puts this
app's routes in front of the stock ones (Starlette serves the first matching route):

- ``POST /train/{model}`` and ``POST /train/``: the request is checked against the allow-list
  of lib.train_request first (HTTP 422 on a field outside it, nothing run), then handed to
  MONAI Label's own task runner, which trains in a process of its own; ``run_sync`` waits for it
  (HTTP 500 with the last output lines when it fails);
- ``GET /review/image?image=<id>``: the study image as an 8-bit PNG (any format the bundle
  reads, e.g. figshare's JPEG or a NIfTI slice), for the review page;
- ``PUT /datastore/label`` (the authenticated user kept as the label's annotator),
  ``PUT /datastore/label/info`` (not the annotator) and ``GET /review/history?image=<id>``
  (lib.history: every save of a label);
- ``/review/``: the review page (``apps/monailabel/review/``: static HTML and JavaScript
  against the app's own REST API).

Authentication: the routes take MONAI Label's own role checks (``MONAI_LABEL_AUTH_ENABLE``),
with the token checks of lib.auth in place of MONAI Label's (:func:`lib.auth.install`).
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Optional

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from monailabel.config import settings
from monailabel.endpoints import train as stock_train
from monailabel.endpoints.user.auth import RBAC, User
from PIL import Image

from robustmri.data.readers import read_image

from lib import auth, history, security
from lib.train_request import validate_train_request

logger = logging.getLogger(__name__)

#: ``--conf`` key: comma-separated web origins (``https://viewer.example.org``) whose pages may call the server.
CORS_CONF = "cors_origins"

#: The review page's files (index.html, review.js, review.css).
PAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "review")


def restrict_cors(server: FastAPI, origins: list[str]) -> bool:
    """Let only ``origins`` make cross-origin browser calls (MONAI Label's CORS middleware, set up in place).

    MONAI Label 0.8.5 builds its CORS middleware with every origin allowed, with credentials,
    unless ``MONAI_LABEL_CORS_ORIGINS`` is set, and its ``start_server`` then fails at start-up
    (it logs the settings with ``json.dumps``, which cannot write the parsed URLs). The app
    therefore sets the built middleware's origins itself. Returns whether the middleware was found.
    """
    layer = server.middleware_stack
    while layer is not None and not isinstance(layer, CORSMiddleware):
        layer = getattr(layer, "app", None)
    if layer is None:
        return False
    layer.__init__(layer.app, allow_origins=origins, allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    return True


def preview_png(path: str) -> bytes:
    """The image at ``path`` (robustmri.data.readers) scaled to 0..255 by its own range, as PNG bytes."""
    pixels = np.asarray(read_image(path), dtype=np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    buffer = io.BytesIO()
    Image.fromarray((scaled * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_task(task: dict, poll_s: float = 0.5) -> dict:
    """Wait for a task of MONAI Label's runner to end; HTTP 500 with its last output lines unless it is DONE.

    Training always runs in the runner's task process (``python -m monailabel.interfaces.utils.app``),
    also for ``run_sync``: in the server process it would compete with the requests being answered.
    """
    while task.get("status") in ("SUBMITTED", "RUNNING"):
        time.sleep(poll_s)
    if task.get("status") != "DONE":
        lines = " | ".join(list(task.get("details") or [])[-5:])
        raise HTTPException(status_code=500, detail=f"{task.get('status')}: the task ended without success: {lines}")
    return task


def routes(app) -> APIRouter:
    """This app's routes; ``app`` is the RobustMRIApp (its models, tracking settings and datastore)."""
    router = APIRouter()
    router.include_router(history.routes(app))
    models = tuple(app.train_models())

    # plain functions, not coroutines: FastAPI runs them in its thread pool, so waiting for a run_sync
    # training never holds up the event loop that answers every other request
    @router.post("/train/{model}", summary="Run Training Task for specific model (request fields checked)")
    def train_model(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                    enqueue: Optional[bool] = False, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        validate_train_request({"model": model, **(params or {})}, models, app.tracking_settings)
        task = stock_train.run_model(model, params, False, enqueue)
        return wait_for_task(task) if run_sync else task

    @router.post("/train/", include_in_schema=False, deprecated=True)
    def train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                  user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        for model, request in (params or {}).items():
            if model not in models:
                raise HTTPException(status_code=422, detail=f"train request: {model!r}: not a model of this app "
                                                            f"({', '.join(models)})")
            validate_train_request(request, models, app.tracking_settings)
        started = stock_train.run(params, False)
        for result in started.values():
            if run_sync and result["result"] is not None:
                wait_for_task(result["result"])
        return started

    @router.get("/review/image", summary="Study image as an 8-bit PNG (for the review page)")
    def review_image(image: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        datastore = app.datastore()
        if image not in datastore.list_images():
            raise HTTPException(status_code=404, detail=f"image {image!r}: no such image in the studies")
        path = datastore.get_image_uri(image)
        try:
            content = preview_png(path)
        except Exception as err:  # an unreadable study file: say which and why
            raise HTTPException(status_code=422, detail=f"{os.path.basename(path)}: cannot show ({err})") from err
        return Response(content=content, media_type="image/png", headers={"Cache-Control": "no-store"})

    return router


def install(server: FastAPI, app, argv: list[str]) -> None:
    """Close the server down (lib.security: exposure, Host, cross-site requests, closed routes, caps), put this
    app's routes in front of MONAI Label's and serve the review page at ``/review/``."""
    security.install(server, app, argv)
    origins = [o.strip().rstrip("/") for o in str(app.conf.get(CORS_CONF, "")).split(",") if o.strip()]
    if server.middleware_stack is None:
        server.middleware_stack = server.build_middleware_stack()
    if not restrict_cors(server, origins):
        raise RuntimeError("MONAI Label's CORS middleware not found: cannot restrict the origins allowed to call "
                           "this server (a MONAI Label version this app does not know)")
    logger.info("cross-origin calls allowed from: %s", ", ".join(origins) or "no other origin")
    security.put_in_front(server, routes(app))
    auth.install(server)
    server.mount("/review", StaticFiles(directory=PAGE_DIR, html=True), name="review")
    server.openapi_schema = None  # rebuilt with these routes on the next /openapi.json
    logger.info("review page at /review/; train requests checked against the allow-list")
