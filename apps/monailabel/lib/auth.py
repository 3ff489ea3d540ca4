"""MONAI Label's authentication made to work, and made to cover the whole server.

MONAI Label 0.8.5 verifies a bearer token with ``jwt.decode`` and no ``algorithms``, which
PyJWT 2 refuses: every token, valid or not, is answered 401, so a team that needs more than
one user ends up serving without authentication. :func:`install` fixes that for this app only:

- :func:`from_token` replaces ``monailabel.endpoints.user.auth.from_token`` (MONAI Label looks it
  up at call time) and the server's ``get_current_user`` dependency is overridden by
  :func:`current_user`. A token is accepted only when it is signed with RS256 (no ``none``, no
  HMAC keyed with the public key) by the realm's key, has not expired (``exp`` required), was
  issued by the realm (``iss`` = ``MONAI_LABEL_AUTH_REALM_URI``) and names this server in its
  audience (``aud`` contains ``MONAI_LABEL_AUTH_CLIENT_ID``: the OAuth resource-server check;
  Keycloak adds the client there with an audience mapper, see the app README). ``azp`` (the
  client the token was issued to) is not used: a token issued to another client for this server
  is valid, one issued to this client for another server is not.
- The key: a token with a key id (``kid``, as Keycloak and every OIDC provider issue them) is
  checked against the realm's JWKS (``/.well-known/openid-configuration`` -> ``jwks_uri``, keys
  cached and refreshed on an unknown id), one without against Keycloak's realm ``public_key``.
  A realm that cannot be reached answers 503 naming it, not a server error.
- A 401 says which of ``no token``, ``token rejected``, ``token expired`` (``detail``) with
  ``WWW-Authenticate: Bearer`` (RFC 6750: ``error="invalid_token"`` for the last two).
- Roles are read as MONAI Label reads them (``MONAI_LABEL_AUTH_TOKEN_ROLES``, e.g.
  ``realm_access#roles``) and ranked: admin > reviewer > annotator > user, each role holding the
  rights of those below it (:data:`ROLE_RANKS`), so a realm needs no composite roles.
- With authentication on, the API's description (``/``, ``/docs``, ``/openapi.json``) takes a
  valid token, starting a scoring run takes the admin role (MONAI Label: annotator), and the
  realm's password login ``POST /auth/token`` answers a refused login with 400 and an
  unreachable realm with 503 instead of a server error.
- ``GET /review/whoami``: who the token belongs to and what the page may offer them.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from typing import Optional

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.config import settings
from monailabel.endpoints import scoring as stock_scoring
from monailabel.endpoints.user import auth as stock_auth
from monailabel.endpoints.user.auth import DEFAULT_USER, RBAC, User

from lib.security import put_in_front

logger = logging.getLogger(__name__)

#: The only signature algorithm accepted (Keycloak's default for access tokens).
ALGORITHMS = ("RS256",)
#: Seconds of clock difference tolerated between the realm and this server on ``exp``/``nbf``/``iat``.
LEEWAY_S = 30
#: Seconds the realm's keys and OIDC configuration are kept before they are fetched again.
KEYS_LIFESPAN_S = 300
#: The ``detail`` of a 401 answer.
NO_TOKEN, REJECTED, EXPIRED = "no token", "token rejected", "token expired"


def role_names() -> tuple[str, str, str, str]:
    """MONAI Label's four roles, lowest first: user, annotator, reviewer, admin (their names are settings)."""
    return (settings.MONAI_LABEL_AUTH_ROLE_USER, settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
            settings.MONAI_LABEL_AUTH_ROLE_REVIEWER, settings.MONAI_LABEL_AUTH_ROLE_ADMIN)


def unauthorized(detail: str) -> HTTPException:
    """A 401 with ``detail`` and RFC 6750's challenge (``error="invalid_token"`` unless no token was sent)."""
    challenge = "Bearer" if detail == NO_TOKEN else 'Bearer error="invalid_token"'
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": challenge})


class RealmUnavailable(Exception):
    """The realm's keys or OIDC configuration could not be fetched (answered as 503)."""


class RealmKeys:
    """The verification keys of one realm: its JWKS by key id, or Keycloak's realm ``public_key``."""

    def __init__(self, realm_uri: str, timeout: float):
        self.realm_uri, self.timeout = realm_uri.rstrip("/"), timeout
        self._lock = threading.Lock()
        self._fetched: dict[str, tuple[float, object]] = {}  # what -> (time fetched, value)
        self._jwks: Optional[jwt.PyJWKClient] = None

    def get_json(self, url: str) -> dict:
        """The JSON document at ``url`` (:class:`RealmUnavailable` if it cannot be read)."""
        try:
            response = requests.get(url, timeout=self.timeout)
            response.raise_for_status()
            return response.json()
        except (requests.RequestException, ValueError) as err:
            raise RealmUnavailable(f"cannot read {url} ({type(err).__name__}: {err})") from err

    def _cached(self, what: str, fetch):
        with self._lock:
            fetched = self._fetched.get(what)
            if fetched is None or time.monotonic() - fetched[0] > KEYS_LIFESPAN_S:
                fetched = self._fetched[what] = (time.monotonic(), fetch())
            return fetched[1]

    def realm_public_key(self) -> RSAPublicKey:
        """Keycloak's realm document's ``public_key`` (base64 DER, no PEM armour)."""
        def fetch():
            encoded = self.get_json(self.realm_uri).get("public_key")
            try:
                key = load_der_public_key(base64.b64decode(encoded or "", validate=True))
            except (ValueError, TypeError, binascii.Error) as err:
                raise RealmUnavailable(f"{self.realm_uri}: no RSA 'public_key' in the realm document") from err
            if not isinstance(key, RSAPublicKey):
                raise RealmUnavailable(f"{self.realm_uri}: the realm's 'public_key' is not an RSA key")
            return key
        return self._cached("public_key", fetch)

    def jwks_client(self) -> jwt.PyJWKClient:
        """PyJWT's JWKS client for the realm's ``jwks_uri`` (OIDC discovery), whose issuer must be the realm."""
        def fetch():
            config = self.get_json(f"{self.realm_uri}/.well-known/openid-configuration")
            issuer = str(config.get("issuer", "")).rstrip("/")
            if issuer != self.realm_uri:
                raise RealmUnavailable(f"the realm's OIDC issuer {issuer!r} is not MONAI_LABEL_AUTH_REALM_URI "
                                       f"{self.realm_uri!r} (set it to the issuer)")
            if not config.get("jwks_uri"):
                raise RealmUnavailable(f"{self.realm_uri}: no jwks_uri in its OIDC configuration")
            return jwt.PyJWKClient(config["jwks_uri"], cache_keys=True, lifespan=KEYS_LIFESPAN_S, timeout=self.timeout)
        return self._cached("jwks", fetch)

    def key(self, kid: Optional[str]):
        """The key that verifies a token with key id ``kid`` (None: the realm's ``public_key``)."""
        if kid is None:
            return self.realm_public_key()
        try:
            return self.jwks_client().get_signing_key(kid).key
        except jwt.PyJWKClientConnectionError as err:
            raise RealmUnavailable(f"cannot read the realm's JWKS ({err})") from err
        except jwt.PyJWKSetError as err:
            raise RealmUnavailable(f"the realm's JWKS has no usable key ({err})") from err
        except jwt.PyJWKClientError as err:  # no key with this id, even after fetching the set again
            raise unauthorized(REJECTED) from err


_realms: dict[tuple[str, float], RealmKeys] = {}


def realm_keys(realm_uri: str, timeout: float) -> RealmKeys:
    """One :class:`RealmKeys` (and so one key cache) per realm."""
    return _realms.setdefault((realm_uri.rstrip("/"), timeout), RealmKeys(realm_uri, timeout))


def verify_token(token: str, keys: RealmKeys, client_id: str) -> dict:
    """The claims of ``token`` once its signature, algorithm, expiry, issuer and audience are checked.

    Raises a 401 :class:`HTTPException` (``token rejected`` / ``token expired``) for a bad token
    and :class:`RealmUnavailable` when the realm's keys cannot be fetched.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as err:
        raise unauthorized(REJECTED) from err
    if header.get("alg") not in ALGORITHMS:  # before any fetch: a forged header costs the realm nothing
        raise unauthorized(REJECTED)
    kid = header.get("kid")
    key = keys.key(str(kid) if kid is not None else None)
    try:
        return jwt.decode(token, key, algorithms=list(ALGORITHMS), audience=client_id, issuer=keys.realm_uri,
                          leeway=LEEWAY_S, options={"require": ["exp", "iss", "aud"], "verify_signature": True})
    except jwt.ExpiredSignatureError as err:
        raise unauthorized(EXPIRED) from err
    except jwt.PyJWTError as err:
        logger.info("token rejected: %s", err)
        raise unauthorized(REJECTED) from err


def claimed_roles(payload: dict, path: str) -> list[str]:
    """The roles at ``path`` in the claims (``#`` between levels, as ``MONAI_LABEL_AUTH_TOKEN_ROLES``)."""
    value = payload
    for step in path.split("#"):
        value = value.get(step) if isinstance(value, dict) else None
    return [r for r in value if isinstance(r, str)] if isinstance(value, list) else []


def effective_roles(roles: list[str]) -> list[str]:
    """``roles`` and every role ranked below the highest of them (admin > reviewer > annotator > user)."""
    ranked = role_names()
    held = [k for k, name in enumerate(ranked) if name in roles]
    below = list(ranked[:max(held) + 1]) if held else []
    return below + [r for r in roles if r not in below]


def user_from_claims(payload: dict) -> User:
    """MONAI Label's user: name, e-mail and roles from the claims its settings name (the subject without a name)."""
    username = payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or payload.get("sub")
    if not isinstance(username, str) or not username:
        raise unauthorized(REJECTED)
    text = {k: payload.get(getattr(settings, f"MONAI_LABEL_AUTH_TOKEN_{k.upper()}")) for k in ("email", "name")}
    return User(username=username, **{k: v for k, v in text.items() if isinstance(v, str)},
                roles=effective_roles(claimed_roles(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)))


def from_token(token: str) -> User:
    """MONAI Label's ``from_token``, verifying the token (:func:`verify_token`) against the configured realm."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return DEFAULT_USER
    keys = realm_keys(settings.MONAI_LABEL_AUTH_REALM_URI, settings.MONAI_LABEL_AUTH_TIMEOUT)
    try:
        payload = verify_token(token, keys, settings.MONAI_LABEL_AUTH_CLIENT_ID)
    except RealmUnavailable as err:
        logger.error("authentication unavailable: %s", err)
        raise HTTPException(status_code=503, detail=f"authentication unavailable: {err}") from err
    return user_from_claims(payload)


def bearer_token(request: Request) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def current_user(request: Request) -> User:
    """The authenticated user (replaces MONAI Label's ``get_current_user``: 401 ``no token`` without one).

    A plain function, so FastAPI runs it in its thread pool: fetching the realm's keys never holds up
    the server's event loop."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return DEFAULT_USER
    token = bearer_token(request)
    if token is None:
        raise unauthorized(NO_TOKEN)
    return stock_auth.from_token(token)


def permissions(user: User) -> dict:
    """What the review page may offer ``user``: train and score (admin), label (annotator)."""
    _, annotator, _, admin = role_names()
    return {"train": admin in user.roles, "score": admin in user.roles, "label": annotator in user.roles}


def doc_routes(server: FastAPI) -> APIRouter:
    """Swagger UI (``/``), ReDoc (``/docs``, ``/redoc``) and ``/openapi.json``, each for an authenticated user."""
    router = APIRouter(include_in_schema=False, dependencies=[Depends(current_user)])
    title = f"{server.title} - APIs"

    @router.get("/openapi.json")
    def openapi():
        return JSONResponse(server.openapi())

    @router.get("/")
    def swagger_ui():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=title)

    @router.get("/docs")
    @router.get("/redoc")
    def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=title)

    return router


def password_login(form: OAuth2PasswordRequestForm) -> dict:
    """The realm's answer to a password login (MONAI Label's ``POST /auth/token``): 400 refused, 503 unreachable."""
    keys = realm_keys(settings.MONAI_LABEL_AUTH_REALM_URI, settings.MONAI_LABEL_AUTH_TIMEOUT)
    try:
        token_endpoint = keys.get_json(f"{keys.realm_uri}/.well-known/openid-configuration")["token_endpoint"]
        response = requests.post(token_endpoint, timeout=keys.timeout, data={
            "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": form.username, "password": form.password,
            "grant_type": "password"})
    except (RealmUnavailable, KeyError, requests.RequestException) as err:
        raise HTTPException(status_code=503, detail=f"authentication unavailable: cannot reach the realm's token "
                                                    f"endpoint ({type(err).__name__})") from err
    if response.status_code in (400, 401):
        raise HTTPException(status_code=400, detail="login refused by the realm (user name or password)")
    if not response.ok:
        raise HTTPException(status_code=503, detail=f"authentication unavailable: the realm answered "
                                                    f"HTTP {response.status_code}")
    return response.json()


def routes(server: FastAPI) -> APIRouter:
    """``/review/whoami``, the admin-only scoring routes, the login and (authentication on) the API description."""
    router = APIRouter()
    admin = settings.MONAI_LABEL_AUTH_ROLE_ADMIN

    @router.get("/review/whoami", summary="The authenticated user, their roles and what they may do")
    def whoami(user: User = Depends(current_user)):
        app_roles = [r for r in role_names() if r in user.roles]
        return {"username": user.username, "roles": app_roles, "can": permissions(user)}

    @router.post("/scoring/{method}", summary=f"Run Scoring Task for specific method (role {admin})")
    def score(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
              user: User = Depends(RBAC(admin))):
        return stock_scoring.run_method(method, params, run_sync)

    @router.post("/scoring/", include_in_schema=False, deprecated=True)
    def score_all(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = Depends(RBAC(admin))):
        return stock_scoring.run(params, run_sync)

    @router.delete("/scoring/", summary=f"Stop Scoring Task (role {admin})")
    def stop_scoring(user: User = Depends(RBAC(admin))):
        return stock_scoring.stop()

    if settings.MONAI_LABEL_AUTH_ENABLE:  # MONAI Label serves /auth/ only then
        @router.post("/auth/token", summary="Log in with the realm's user name and password (a token)")
        def login(form: OAuth2PasswordRequestForm = Depends()):
            return password_login(form)

        router.include_router(doc_routes(server))
    return router


def install(server: FastAPI) -> None:
    """Put the token checks in place of MONAI Label's and this module's routes in front of the stock ones."""
    stock_auth.from_token = from_token
    server.dependency_overrides[stock_auth.get_current_user] = current_user
    put_in_front(server, routes(server))
    if settings.MONAI_LABEL_AUTH_ENABLE:
        logger.info("authentication: RS256 tokens of %s for %s; API description and scoring runs need a token",
                    settings.MONAI_LABEL_AUTH_REALM_URI, settings.MONAI_LABEL_AUTH_CLIENT_ID)
