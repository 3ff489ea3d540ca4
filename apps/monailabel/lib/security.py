"""What the server refuses: the app's defences in front of MONAI Label's HTTP server.

MONAI Label 0.8.5 serves every route it has to any client that reaches it: with authentication
off (its default) that is anyone on the network, and, through the annotator's browser, any web
page (a "simple" cross-origin request needs no CORS preflight; a rebound DNS name reads the
answers). :func:`install` runs when the server starts (lib.server.install) and closes that down:

- **exposure**: the address the server binds, as MONAI Label's own argument parser reads the
  command line (the last ``--host``/``-i`` wins), and the listening sockets once bound, must be
  loopback unless authentication is on or ``--conf serve_unauthenticated true``; otherwise the
  server exits with a one-line reason (:func:`check_exposure`, :func:`watch_listening_sockets`);
- :class:`Guard`, an ASGI middleware in front of every route: a Host header outside the
  allow-list is 400 (DNS rebinding); a closed route is 403 (:data:`CLOSED`); a POST, PUT, PATCH
  or DELETE without ``X-Requested-With`` is 403 (a browser sends a custom header cross-origin
  only after a CORS preflight, which the app refuses for unlisted origins); a ``tag`` outside the
  label tags is 422; a body over its cap is 413, from ``Content-Length`` before anything is read,
  and counted while it is read;
- routes in front of MONAI Label's: inference on study images only, with no uploaded file or
  session and only the ``params`` of :data:`INFER_PARAMS` (404 alike for a path, a missing file
  and an unknown id); model upload and delete only with ``--conf allow_model_upload true``, for
  the admin role, and an upload only if it loads into the bundle's network (else 422, the
  checkpoint untouched); editing image and label info and downloading the dataset for the admin
  role only.

apps/monailabel/README.md, "What the server refuses", lists each refusal and its answer.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Optional

import psutil
import torch
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.endpoints import datastore as stock_datastore
from monailabel.endpoints import infer as stock_infer
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import file_checksum
from starlette.datastructures import Headers, QueryParams

from lib import history
from lib.datastore import label_size_limit
from lib.label_tags import LABEL_TAG_RULE, valid_label_tag
from lib.train_request import CHECKPOINT_NAME, DEVICE

logger = logging.getLogger(__name__)

#: ``--conf`` key that accepts serving beyond loopback without MONAI Label's authentication.
OPEN_NETWORK_CONF = "serve_unauthenticated"
#: ``--conf`` key: comma-separated host names (and addresses) clients may use for this server, besides loopback.
ALLOWED_HOSTS_CONF = "allowed_hosts"
#: ``--conf`` key that turns on ``PUT``/``DELETE /model/<model>`` (admin role; uploads verified).
MODEL_UPLOAD_CONF = "allow_model_upload"
#: The header every state-changing request must carry (any non-empty value).
REQUESTED_WITH = "X-Requested-With"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Body cap of every request but a label or model upload: train, infer and scoring parameters are small JSON.
MAX_REQUEST_BYTES = 1 << 20
#: What a label upload may carry around the label file: the multipart headers and the ``params`` field
#: (a note of 2,000 characters, JSON-escaped).
FORM_ENVELOPE_BYTES = 16 << 10
#: Body cap of a model upload (where turned on).
MAX_MODEL_BYTES = 1 << 30
#: Inference ``params`` a client may send (any other would change what is read: ``image``, ``label``,
#: ``session``, ``save_label``/``label_tag`` write labels, ``model_filename`` names the checkpoint).
INFER_PARAMS = {"device": DEVICE, "model_filename": CHECKPOINT_NAME}
#: Exit status of a server that refuses to serve.
REFUSED_EXIT = 2

_API = re.escape(settings.MONAI_LABEL_API_STR.rstrip("/"))


def _route(pattern: str) -> re.Pattern:
    return re.compile(_API + pattern)


#: Stock routes a review and annotation deployment does not need: (methods or None for all, path, why).
CLOSED = (
    (None, _route(r"/session(/.*)?"), "sessions (images uploaded to the server) are not offered by this app: "
                                      "it classifies the study images"),
    (None, _route(r"/batch(/.*)?"), "batch inference is not offered by this app (it would write a model label "
                                    "for every image); infer one study image at a time"),
    (None, _route(r"/proxy(/.*)?"), "the DICOMweb proxy is not offered by this app: the studies are a local folder"),
    (None, _route(r"/ohif(/.*)?"), "OHIF is not offered by this app: it neither shows nor saves a class label"),
    (None, _route(r"/infer/wsi(_v2)?(/.*)?"), "whole-slide inference is not offered by this app"),
    (None, _route(r"/reload"), "reloading the app is not offered: restart the server"),
    ({"PUT", "DELETE"}, _route(r"/datastore(/|/image)?"), "study images are added and removed in the studies "
                                                          "folder on the server, not over HTTP"),
)
MODEL_WRITE = ({"PUT", "DELETE"}, _route(r"/model/[^/]+"),
               f"replacing or deleting the model is off: start the server with --conf {MODEL_UPLOAD_CONF} true "
               "(admin role; an upload must load into the bundle's network)")
LABEL_UPLOAD = _route(r"/datastore/label")


# ---- exposure: the address the server binds ----

def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) reaches this machine only."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def is_wildcard(host: str) -> bool:
    return host.strip().strip("[]") in ("", "0.0.0.0", "::")


def bound_host(argv: list[str]) -> Optional[str]:
    """The host a ``monailabel start_server`` command line binds, read by MONAI Label's own parser (the last
    ``--host``/``-i`` wins; its default is 0.0.0.0); None when ``argv`` is not such a command line."""
    from monailabel.main import Main

    parser = Main(actions="start_server").args_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the usage text of a command line it does not know
            args = parser.parse_args(list(argv[1:]))
    except SystemExit:
        return None
    return args.host if getattr(args, "action", None) == "start_server" else None


def check_exposure(host: str, auth_enabled: bool, conf: dict) -> None:
    """Refuse to serve beyond loopback with authentication off, unless the user said so.

    MONAI Label binds 0.0.0.0 by default with authentication off: anyone on the network could
    read the studies, download the weights, delete labels and start training. Serving beyond
    loopback takes ``MONAI_LABEL_AUTH_ENABLE=true`` (with its realm) or, knowingly,
    ``--conf serve_unauthenticated true`` (e.g. behind an authenticating reverse proxy).
    """
    if is_loopback(host) or auth_enabled or str(conf.get(OPEN_NETWORK_CONF, "")).lower() == "true":
        return
    raise RuntimeError(f"refusing to serve on {host} with authentication off: start with --host 127.0.0.1 "
                       f"(this machine only), or enable MONAI Label's authentication (MONAI_LABEL_AUTH_ENABLE=true) "
                       f"and list the web clients' origins with --conf cors_origins, or accept the exposure with "
                       f"--conf {OPEN_NETWORK_CONF} true (apps/monailabel/README.md, 'Serving beyond this machine')")


def refuse_to_serve(reason: str) -> None:
    """Exit the server with ``reason`` on one line; raised in start-up, it would end in uvicorn's traceback."""
    logger.error(reason)
    print(f"robustmri: {reason}", file=sys.stderr, flush=True)
    os._exit(REFUSED_EXIT)


def listening_hosts(pid: Optional[int] = None) -> list[str]:
    """The addresses of the listening TCP sockets of process ``pid`` (this one by default)."""
    connections = psutil.Process(pid).net_connections(kind="inet")
    return sorted({c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN})


def watch_listening_sockets(auth_enabled: bool, conf: dict, timeout_s: float = 600.0) -> threading.Thread:
    """Check the sockets the server listens on once it has bound them (after start-up), with
    :func:`check_exposure`, and exit with its reason if one is not loopback: the command line is not
    the only way to start the server (``uvicorn monailabel.app:app``, other parsers)."""
    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hosts = listening_hosts()
            if hosts:
                for host in hosts:
                    try:
                        check_exposure(host, auth_enabled, conf)
                    except RuntimeError as err:
                        refuse_to_serve(str(err))
                logger.info("listening on %s", ", ".join(hosts))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, name="exposure-check", daemon=True)
    thread.start()
    return thread


# ---- the middleware ----

def host_name(header: str) -> str:
    """The host of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower case, without a final dot."""
    value = header.strip().lower()
    if value.startswith("["):
        value = value[1:value.find("]")] if "]" in value else value
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def machine_addresses() -> set[str]:
    return {a.address.split("%")[0].lower() for addresses in psutil.net_if_addrs().values() for a in addresses
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def allowed_hosts(bound: Optional[str], conf: dict) -> frozenset:
    """Host names a request may name: loopback, the bound host (this machine's addresses when it binds them
    all), and ``--conf allowed_hosts``. A rebound DNS name (``rebind.attacker.example``) is none of them."""
    names = {"localhost", "127.0.0.1", "::1"}
    names |= {host_name(h) for h in str(conf.get(ALLOWED_HOSTS_CONF, "")).split(",") if h.strip()}
    if bound is not None:
        names |= machine_addresses() if is_wildcard(bound) else {host_name(bound)}
    return frozenset(names)


class BodyTooLarge(HTTPException):
    """A request body over its cap: HTTP 413."""

    def __init__(self, limit: int, what: str):
        super().__init__(status_code=413, detail=f"{what} over {limit} bytes: refused")


class Guard:
    """ASGI middleware in front of the whole server: Host allow-list, closed routes, ``X-Requested-With`` on
    state-changing requests, label tags, body caps (module docstring). A refusal answers before the
    request reaches a route, so nothing is read, run or written."""

    def __init__(self, app, hosts: frozenset, max_label_bytes: int, model_upload: bool):
        self.app = app  # the name Starlette's middleware chain uses (lib.server.restrict_cors walks it)
        self.hosts = hosts
        self.max_label_bytes = max_label_bytes
        self.closed = CLOSED if model_upload else (*CLOSED, MODEL_WRITE)
        self.model_upload = model_upload

    def refusal(self, scope) -> Optional[tuple[int, str]]:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not host or host_name(host) not in self.hosts and not is_loopback(host_name(host)):
            return 400, (f"Host {host[:100]!r} is not a name of this server (add it with --conf "
                         f"{ALLOWED_HOSTS_CONF} if it is)")
        method, path = scope["method"].upper(), route_path(scope)
        for methods, pattern, reason in self.closed:
            if (methods is None or method in methods) and pattern.fullmatch(path):
                return 403, reason
        if method in STATE_CHANGING and not headers.get(REQUESTED_WITH, "").strip():
            return 403, (f"{method} needs the header {REQUESTED_WITH} (any value; the review page sends it): "
                         "refused as a possible cross-site request")
        for tag in QueryParams(scope.get("query_string", b"")).getlist("tag"):
            if not valid_label_tag(tag):
                return 422, f"label tag {tag[:100]!r}: must be {LABEL_TAG_RULE}"
        return None

    def body_limit(self, scope) -> tuple[int, str]:
        path = route_path(scope)
        if LABEL_UPLOAD.fullmatch(path):
            return self.max_label_bytes + FORM_ENVELOPE_BYTES, "label upload"
        if self.model_upload and MODEL_WRITE[1].fullmatch(path):
            return MAX_MODEL_BYTES, "model upload"
        return MAX_REQUEST_BYTES, "request body"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is None:
            limit, what = self.body_limit(scope)
            length = Headers(scope=scope).get("content-length", "")
            if length.strip() and not length.strip().isdigit():
                refused = 400, "Content-Length: not a number"
            elif length.strip() and int(length) > limit:
                refused = 413, BodyTooLarge(limit, what).detail
        if refused is not None:
            status, reason = refused
            logger.warning("refused %s %s: HTTP %d %s", scope["method"], scope["path"], status, reason)
            return await JSONResponse({"detail": reason}, status_code=status)(scope, receive, send)

        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a body without Content-Length (chunked), or longer than it said
                raise BodyTooLarge(limit, what)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as err:
            if started:
                raise
            await JSONResponse({"detail": err.detail}, status_code=413)(scope, receive, send)


def route_path(scope) -> str:
    """The path the router matches (without the root path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


# ---- routes in front of MONAI Label's ----

class ModelRejected(HTTPException, ValueError):
    """An uploaded model that is not a checkpoint of the bundle's network: HTTP 422 with the reason."""

    def __init__(self, reason: str):
        super().__init__(status_code=422, detail=f"model upload: {reason}; the model was not changed")

    def __str__(self) -> str:
        return self.detail


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def verify_checkpoint(path: str, network: torch.nn.Module) -> None:
    """Raise :class:`ModelRejected` unless ``path`` is a state dict (plain, or as ``{"model": ...}``) that loads
    into ``network`` strictly. Read with ``weights_only``: a pickle that would run code is refused, not run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable upload, whatever torch says about it
        raise ModelRejected(f"not a PyTorch state dict ({first_line(err)[:200]})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelRejected("not a state dict of tensors")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelRejected(f"does not fit the bundle's network ({first_line(err)[:300]})") from err


def require_study_image(datastore, image) -> None:
    """404 unless ``image`` is the id of a study image: the same answer for a path, a missing file and an
    unknown id, so the status tells nothing about the server's files."""
    if not isinstance(image, str) or not image or image not in datastore.list_images():
        raise HTTPException(status_code=404, detail="image: no such image in the studies (an image is named by "
                                                    "its id, GET /datastore/?output=all lists them)")


def infer_params(text: str) -> dict:
    try:
        params = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise HTTPException(status_code=422, detail=f"infer params: not JSON ({err})") from err
    if not isinstance(params, dict):
        raise HTTPException(status_code=422, detail="infer params: must be a JSON object")
    for key, value in params.items():
        pattern = INFER_PARAMS.get(key)
        if pattern is None:
            raise HTTPException(status_code=422, detail=f"infer params: {key}: not an accepted field "
                                                        f"(accepted: {', '.join(INFER_PARAMS)})")
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise HTTPException(status_code=422, detail=f"infer params: {key}: not accepted ({str(value)[:80]!r})")
    return params


def routes(app, model_upload: bool) -> APIRouter:
    """The routes that replace MONAI Label's for ``app`` (the RobustMRIApp)."""
    router = APIRouter()
    admin, user_role = settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_USER

    @router.post("/infer/{model}", summary="Run inference on a study image (by id)")
    async def infer(request: Request, background_tasks: BackgroundTasks, model: str, image: str = "",
                    output: Optional[stock_infer.ResultType] = None, user: User = Depends(RBAC(user_role))):
        if request.query_params.get("session_id"):
            raise HTTPException(status_code=422, detail="infer: sessions are not offered; name a study image")
        params = "{}"
        if request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                               "application/x-www-form-urlencoded")):
            form = await request.form()
            if any(not isinstance(value, str) for _, value in form.multi_items()):
                raise HTTPException(status_code=422, detail="infer: file uploads are not accepted; name a study "
                                                            "image with ?image=<id>")
            params = str(form.get("params", "{}"))
        params = json.dumps(infer_params(params))
        if model not in app.infer_models():
            raise HTTPException(status_code=404, detail=f"model {model[:80]!r}: not a model of this app")
        require_study_image(app.datastore(), image)
        return await run_in_threadpool(stock_infer.run_inference, background_tasks, model, image, "", params,
                                       None, None, output)

    @router.put("/datastore/image/info", summary="Update image info (admin: it holds the review scores)")
    def put_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(admin))):
        return stock_datastore.update_image_info(image, info, user.username)

    # PUT /datastore/label/info: lib.history's route (admin, and never the annotator)
    @router.put("/datastore/updatelabelinfo", include_in_schema=False, deprecated=True)
    def update_label_info(label: str, tag: str, params: str = Form("{}"),
                          user: User = Depends(RBAC(admin))):
        return history.update_label_info(label, tag, params, user)

    @router.get("/datastore/dataset", summary="Download the studies and labels as a ZIP archive (admin)")
    def download_dataset(limit_cases: Optional[int] = None, user: User = Depends(RBAC(admin))):
        return stock_datastore.download_dataset(limit_cases)

    if model_upload:
        @router.put("/model/{model}", summary="Replace the model (admin; verified against the bundle's network)")
        def upload_model(model: str, file: UploadFile, user: User = Depends(RBAC(admin))):
            target = model_target(app, model)
            handle, upload = tempfile.mkstemp(suffix=".pt.upload", dir=os.path.dirname(target))
            try:
                with os.fdopen(handle, "wb") as out:
                    shutil.copyfileobj(file.file, out)
                verify_checkpoint(upload, app.model_network(model))
                os.replace(upload, target)  # whole or not at all: the infer task reloads on the new mtime
            finally:
                if os.path.exists(upload):
                    os.remove(upload)
            logger.info("model %s replaced by %s", model, user.username)
            return {"checksum": file_checksum(target), "modified_time": int(os.stat(target).st_mtime)}

        @router.delete("/model/{model}", summary="Delete the model (admin; kept as <file>.<time>.deleted)")
        def delete_model(model: str, user: User = Depends(RBAC(admin))):
            target = model_target(app, model)
            if not os.path.isfile(target):
                raise HTTPException(status_code=404, detail=f"model {model!r}: no checkpoint")
            os.replace(target, f"{target}.{time.strftime('%Y%m%d_%H%M%S')}.deleted")
            logger.info("model %s deleted by %s", model, user.username)
            return {}

    return router


def model_target(app, model: str) -> str:
    if model not in app.infer_models():
        raise HTTPException(status_code=404, detail=f"model {model[:80]!r}: not a model of this app")
    return app.model_file(model, validate=False)


def put_in_front(server: FastAPI, router: APIRouter) -> None:
    """Include ``router`` so that its routes match before MONAI Label's (Starlette serves the first match)."""
    first_new = len(server.router.routes)
    server.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = server.router.routes[first_new:]
    del server.router.routes[first_new:]
    server.router.routes[0:0] = added


def install(server: FastAPI, app, argv: list[str]) -> None:
    """Judge the exposure (exit if refused), wrap the server in :class:`Guard` and put this module's routes
    in front of MONAI Label's."""
    auth_enabled = settings.MONAI_LABEL_AUTH_ENABLE
    host = bound_host(argv)
    if host is not None:
        try:
            check_exposure(host, auth_enabled, app.conf)
        except RuntimeError as err:
            refuse_to_serve(str(err))
    watch_listening_sockets(auth_enabled, app.conf)
    model_upload = str(app.conf.get(MODEL_UPLOAD_CONF, "")).lower() == "true"
    hosts = allowed_hosts(host, app.conf)
    if server.middleware_stack is None:
        server.middleware_stack = server.build_middleware_stack()
    server.middleware_stack = Guard(server.middleware_stack, hosts, label_size_limit(app.conf), model_upload)
    put_in_front(server, routes(app, model_upload))
    server.openapi_schema = None
    logger.info("host names accepted: %s; model upload %s", ", ".join(sorted(hosts)),
                "on (admin, verified)" if model_upload else "off")
