"""What this app adds to MONAI Label's HTTP server: checked train requests and the review page.

MONAI Label builds its FastAPI server before it creates the app, and offers no hook for
routes; :func:`install` runs when the server switches the app to server mode and puts this
app's routes in front of the stock ones (Starlette serves the first matching route):

- ``POST /train/{model}`` and ``POST /train/``: the request is checked against the allow-list
  of lib.train_request first (HTTP 422 on a field outside it, nothing run), then handed to
  MONAI Label's own train endpoint;
- ``GET /review/image?image=<id>``: the study image as an 8-bit PNG (any format the bundle
  reads, e.g. figshare's JPEG or a NIfTI slice), for the review page;
- ``PUT /datastore/label`` (the authenticated user kept as the label's annotator),
  ``PUT /datastore/label/info`` (not the annotator) and ``GET /review/history?image=<id>``
  (lib.history: every save of a label);
- ``/review/``: the review page (``apps/monailabel/review/``: static HTML and JavaScript
  against the app's own REST API).

Authentication: the routes take MONAI Label's own role checks (``MONAI_LABEL_AUTH_ENABLE``),
so they are as open or as closed as the stock ones.
"""

from __future__ import annotations

import io
import logging
import os
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

from lib import history
from lib.train_request import validate_train_request

logger = logging.getLogger(__name__)

#: Host names that reach this machine only.
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: ``--conf`` key that accepts serving beyond loopback without MONAI Label's authentication.
OPEN_NETWORK_CONF = "serve_unauthenticated"
#: ``--conf`` key: comma-separated web origins (``https://viewer.example.org``) whose pages may call the server.
CORS_CONF = "cors_origins"

#: The review page's files (index.html, review.js, review.css).
PAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "review")


def command_option(argv: list[str], name: str, default: str) -> str:
    """The value of ``--<name>`` in a ``monailabel start_server`` command line, else ``default``."""
    for k, arg in enumerate(argv):
        if arg == f"--{name}" and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


def bound_host(argv: list[str]) -> str:
    """The ``--host`` of a ``monailabel start_server`` command line (MONAI Label's default: 0.0.0.0)."""
    return command_option(argv, "host", "0.0.0.0")


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


def check_exposure(host: str, auth_enabled: bool, conf: dict) -> None:
    """Refuse to serve beyond loopback with authentication off, unless the user said so.

    MONAI Label binds 0.0.0.0 by default with authentication off: anyone on the network could
    read the studies, download the weights, delete labels and start training. Serving beyond
    loopback takes ``MONAI_LABEL_AUTH_ENABLE=true`` (with its Keycloak realm) or, knowingly,
    ``--conf serve_unauthenticated true`` (e.g. behind an authenticating reverse proxy).
    """
    if host in LOOPBACK or auth_enabled or str(conf.get(OPEN_NETWORK_CONF, "")).lower() == "true":
        return
    raise RuntimeError(f"refusing to serve on {host} with authentication off: start with --host 127.0.0.1 "
                       f"(this machine only), or enable MONAI Label's authentication (MONAI_LABEL_AUTH_ENABLE=true) "
                       f"and list the web clients' origins with --conf {CORS_CONF}, or accept the exposure with --conf "
                       f"{OPEN_NETWORK_CONF} true (apps/monailabel/README.md, 'Serving beyond this machine')")


def preview_png(path: str) -> bytes:
    """The image at ``path`` (robustmri.data.readers) scaled to 0..255 by its own range, as PNG bytes."""
    pixels = np.asarray(read_image(path), dtype=np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    buffer = io.BytesIO()
    Image.fromarray((scaled * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def routes(app) -> APIRouter:
    """This app's routes; ``app`` is the RobustMRIApp (its models, tracking settings and datastore)."""
    router = APIRouter()
    router.include_router(history.routes(app))
    models = tuple(app.train_models())

    @router.post("/train/{model}", summary="Run Training Task for specific model (request fields checked)")
    async def train_model(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                          enqueue: Optional[bool] = False,
                          user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        validate_train_request({"model": model, **(params or {})}, models, app.tracking_settings)
        return stock_train.run_model(model, params, run_sync, enqueue)

    @router.post("/train/", include_in_schema=False, deprecated=True)
    async def train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        for model, request in (params or {}).items():
            if model not in models:
                raise HTTPException(status_code=422, detail=f"train request: {model!r}: not a model of this app "
                                                            f"({', '.join(models)})")
            validate_train_request(request, models, app.tracking_settings)
        return stock_train.run(params, run_sync)

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
    """Check the exposure (:func:`check_exposure`), put this app's routes in front of MONAI Label's and serve
    the review page at ``/review/``."""
    check_exposure(bound_host(argv), settings.MONAI_LABEL_AUTH_ENABLE, app.conf)
    origins = [o.strip().rstrip("/") for o in str(app.conf.get(CORS_CONF, "")).split(",") if o.strip()]
    if server.middleware_stack is None:
        server.middleware_stack = server.build_middleware_stack()
    if not restrict_cors(server, origins):
        raise RuntimeError("MONAI Label's CORS middleware not found: cannot restrict the origins allowed to call "
                           "this server (a MONAI Label version this app does not know)")
    logger.info("cross-origin calls allowed from: %s", ", ".join(origins) or "no other origin")
    first_new = len(server.router.routes)
    server.include_router(routes(app), prefix=settings.MONAI_LABEL_API_STR)
    added = server.router.routes[first_new:]
    del server.router.routes[first_new:]
    server.router.routes[0:0] = added
    server.mount("/review", StaticFiles(directory=PAGE_DIR, html=True), name="review")
    server.openapi_schema = None  # rebuilt with these routes on the next /openapi.json
    logger.info("review page at /review/; train requests checked against the allow-list")
