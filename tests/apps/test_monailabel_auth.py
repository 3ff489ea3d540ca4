"""The MONAI Label app's authentication (apps/monailabel/lib/auth.py) against a stand-in OIDC realm on loopback.

The realm (:class:`StandInRealm`) is a small ``http.server`` thread serving what Keycloak serves:
the realm document with its ``public_key``, ``/.well-known/openid-configuration``, the JWKS and a
password token endpoint; its RSA keys are generated here and the tests sign their own tokens.
The token checks run in process (fast); the roles, the 401 answers and the API description are
checked over HTTP on one real ``monailabel start_server`` with ``MONAI_LABEL_AUTH_ENABLE=true``.
"""

import base64
import contextlib
import hashlib
import hmac
import importlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("monailabel", reason="MONAI Label is the optional [label] extra")

import jwt  # noqa: E402  (a MONAI Label dependency)
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from jwt.algorithms import RSAAlgorithm  # noqa: E402

from label_server import (  # noqa: E402  (tests/apps/label_server.py, after the skip)
    APP,
    copy_app,
    free_port,
    make_bundle,
    make_studies,
    running_server,
    server_command,
)

CLIENT_ID = "robustmri-review"
DEADLINE_S = 120
#: MONAI Label's default role names (monailabel.config), by the name the tests give them.
ROLES = {"user": "monailabel-user", "annotator": "monailabel-annotator", "reviewer": "monailabel-reviewer",
         "admin": "monailabel-admin"}
PASSWORD = "correct horse"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class StandInRealm:
    """A Keycloak realm's public documents, served on loopback from a thread; signs tokens with its key."""

    def __init__(self, name="robustmri"):
        self.key, self.kid = new_key(), "key-1"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}/realms/{name}"
        self.requests: list[str] = []
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test output is the tests'
                pass

            def answer(self, status, document):
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                realm.requests.append(self.path)
                document = realm.documents().get(self.path)
                self.answer(200 if document else 404, document or {"error": "not found"})

            def do_POST(self):
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                user = form.get("username", [""])[0]
                if self.path != f"/realms/{name}/protocol/openid-connect/token" or user not in ROLES:
                    return self.answer(404, {"error": "not found"})
                if form.get("password") != [PASSWORD] or form.get("client_id") != [CLIENT_ID]:
                    return self.answer(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
                self.answer(200, {"access_token": realm.token(role=user), "token_type": "Bearer", "expires_in": 300})

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def documents(self) -> dict:
        prefix = urllib.parse.urlparse(self.uri).path
        public_der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
        jwk = {**RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True), "kid": self.kid, "use": "sig",
               "alg": "RS256"}
        return {
            prefix: {"realm": prefix.rsplit("/", 1)[1], "public_key": base64.b64encode(public_der).decode()},
            f"{prefix}/.well-known/openid-configuration": {
                "issuer": self.uri, "jwks_uri": f"{self.uri}/protocol/openid-connect/certs",
                "token_endpoint": f"{self.uri}/protocol/openid-connect/token"},
            f"{prefix}/protocol/openid-connect/certs": {"keys": [jwk]},
        }

    def claims(self, role=None, **changes) -> dict:
        """An access token's claims as Keycloak writes them (``aud`` holding the client by an audience mapper)."""
        now = int(time.time())
        claims = {"iss": self.uri, "aud": [CLIENT_ID, "account"], "azp": CLIENT_ID, "sub": str(uuid.uuid4()),
                  "exp": now + 300, "iat": now, "preferred_username": f"{role or 'nobody'}-1",
                  "email": f"{role}@example.org", "realm_access": {"roles": [ROLES[role]] if role else []}}
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, role=None, key=None, kid="default", **changes) -> str:
        """An RS256 token signed with the realm's key (or ``key``), with key id ``kid`` (None: no key id)."""
        kid = self.kid if kid == "default" else kid
        return jwt.encode(self.claims(role, **changes), key or self.key, algorithm="RS256",
                          headers={"kid": kid} if kid else None)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def hmac_token(claims: dict, secret: bytes, kid: str) -> str:
    """An HS256 token keyed with ``secret`` (PyJWT will not key HMAC with a PEM public key: written by hand)."""
    signing_input = ".".join(b64url(json.dumps(part).encode()) for part in (
        {"alg": "HS256", "typ": "JWT", "kid": kid}, claims))
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def bad_tokens(realm: StandInRealm) -> dict:
    """A token of each kind the server must answer 401, with the ``detail`` it must give."""
    public_pem = realm.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    admin = realm.claims("admin")
    return {
        "another key's signature": (realm.token("admin", key=new_key()), "token rejected"),
        "another key's signature, no key id": (realm.token("admin", key=new_key(), kid=None), "token rejected"),
        "an unknown key id": (realm.token("admin", kid="key-2"), "token rejected"),
        "expired": (realm.token("admin", exp=int(time.time()) - 3600, iat=int(time.time()) - 3900), "token expired"),
        "no expiry": (realm.token("admin", exp=None), "token rejected"),
        "another audience": (realm.token("admin", aud="other-app", azp="other-app"), "token rejected"),
        "this client as azp only": (realm.token("admin", aud="account"), "token rejected"),
        "another issuer": (realm.token("admin", iss="http://127.0.0.1:1/realms/other"), "token rejected"),
        "alg none": (jwt.encode(admin, None, algorithm="none"), "token rejected"),
        "HS256 keyed with the public key": (hmac_token(admin, public_pem, realm.kid), "token rejected"),
        "not a token": ("not.a.token", "token rejected"),
    }


@pytest.fixture(scope="module")
def realm():
    with StandInRealm() as running:
        yield running


@pytest.fixture(scope="module")
def auth_lib():
    """The app's ``lib.auth`` (its ``lib`` importable as start_server makes it), forgotten afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(APP)
        yield importlib.import_module("lib.auth")
        for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
            del sys.modules[name]


# ----------------------------------------------------------------------------------------------- in process


@pytest.mark.monailabel
@pytest.mark.parametrize("kid", ["default", None], ids=["JWKS by key id", "realm public_key"])
def test_a_valid_token_is_accepted_with_either_key_source(auth_lib, realm, kid):
    keys = auth_lib.RealmKeys(realm.uri, timeout=5)
    realm.requests.clear()
    claims = auth_lib.verify_token(realm.token("annotator", kid=kid), keys, CLIENT_ID)
    assert claims["preferred_username"] == "annotator-1" and claims["aud"] == [CLIENT_ID, "account"]
    discovery = "/realms/robustmri/.well-known/openid-configuration"
    assert (discovery in realm.requests) == (kid is not None)
    assert ("/realms/robustmri" in realm.requests) == (kid is None)


@pytest.mark.monailabel
def test_bad_tokens_are_401_with_the_reason_and_rfc_6750s_challenge(auth_lib, realm):
    keys = auth_lib.RealmKeys(realm.uri, timeout=5)
    for what, (token, detail) in bad_tokens(realm).items():
        with pytest.raises(auth_lib.HTTPException) as err:
            auth_lib.verify_token(token, keys, CLIENT_ID)
        assert (err.value.status_code, err.value.detail) == (401, detail), what
        assert err.value.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}, what
    assert auth_lib.unauthorized("no token").headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.monailabel
def test_a_realm_that_cannot_be_read_is_named_not_a_server_error(auth_lib, realm, monkeypatch):
    unreachable = auth_lib.RealmKeys(f"http://127.0.0.1:{free_port()}/realms/robustmri", timeout=2)
    monkeypatch.setattr(auth_lib.settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(auth_lib.settings, "MONAI_LABEL_AUTH_REALM_URI", unreachable.realm_uri)
    with pytest.raises(auth_lib.HTTPException) as err:  # as the server answers it
        auth_lib.from_token(realm.token("admin"))
    assert err.value.status_code == 503 and err.value.detail.startswith("authentication unavailable: cannot read")
    with pytest.raises(auth_lib.RealmUnavailable, match=r"cannot read http://127\.0\.0\.1:\d+/realms/robustmri/"):
        auth_lib.verify_token(realm.token("admin"), unreachable, CLIENT_ID)
    with pytest.raises(auth_lib.RealmUnavailable, match=r"cannot read http://127\.0\.0\.1:\d+/realms/robustmri "):
        auth_lib.verify_token(realm.token("admin", kid=None), unreachable, CLIENT_ID)
    # a realm URI that is not the issuer the realm announces: every token would fail, so say why
    elsewhere = auth_lib.RealmKeys(realm.uri.replace("127.0.0.1", "localhost"), timeout=5)
    with pytest.raises(auth_lib.RealmUnavailable, match="the realm's OIDC issuer .* is not MONAI_LABEL_AUTH_REALM_URI"):
        auth_lib.verify_token(realm.token("admin"), elsewhere, CLIENT_ID)


@pytest.mark.monailabel
def test_roles_are_read_at_monai_labels_claim_path_and_each_holds_those_below(auth_lib, realm):
    ranked = ["monailabel-user", "monailabel-annotator", "monailabel-reviewer", "monailabel-admin"]
    expected = {"user": ranked[:1], "annotator": ranked[:2], "reviewer": ranked[:3], "admin": ranked}
    for role, roles in expected.items():
        user = auth_lib.user_from_claims(realm.claims(role))
        assert user.username == f"{role}-1" and user.roles == roles, role
    claims = realm.claims(None, realm_access={"roles": ["offline_access", "monailabel-annotator"]})
    assert auth_lib.user_from_claims(claims).roles == ranked[:2] + ["offline_access"]
    assert auth_lib.user_from_claims(realm.claims(None, realm_access="admin")).roles == []
    nameless = realm.claims(None, preferred_username=None)
    assert auth_lib.user_from_claims(nameless).username == nameless["sub"]


# ----------------------------------------------------------------------------------------------- over HTTP


def call(base, method, path, token=None, body=None, label=None):
    """``(status, headers, JSON or text)``; ``label`` = (image id, bytes) uploads ``<id>.label.json`` (multipart).
    State-changing requests carry ``X-Requested-With`` (the app refuses them without)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if method != "GET":
        headers["X-Requested-With"] = "robustmri"
    data = json.dumps(body).encode() if body is not None else None
    if label is not None:
        boundary = uuid.uuid4().hex
        data = b"".join([f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{label[0]}'
                         f'.label.json"\r\nContent-Type: application/json\r\n\r\n'.encode(), label[1],
                         f"\r\n--{boundary}--\r\n".encode()])
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(f"{base}{path}", method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, answer, text = response.status, response.headers, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        status, answer, text = err.code, err.headers, err.read().decode(errors="replace")
    with contextlib.suppress(ValueError):
        return status, answer, json.loads(text)
    return status, answer, text


@pytest.fixture(scope="module")
def server(realm, tmp_path_factory):
    """The app served with MONAI Label's authentication on, against the stand-in realm: (base URL, studies)."""
    tmp_path = tmp_path_factory.mktemp("label_auth")
    studies = make_studies(tmp_path / "studies")
    port = free_port()
    command = server_command(copy_app(tmp_path / "app"), studies, port, make_bundle(tmp_path / "bundle"))
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri,
           "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID, "MONAI_LABEL_AUTH_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # running_server hands its environment to the server
    admin = realm.token("admin")
    try:
        with running_server(command, tmp_path, time.monotonic() + DEADLINE_S, port,
                            ready=lambda base: call(base, "GET", "/review/whoami", admin)[0] == 200) as (base, _, _):
            yield base, studies
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
@pytest.mark.monailabel
def test_bad_tokens_are_refused_over_http_with_the_reason(server, realm):
    base, _ = server
    status, headers, answer = call(base, "GET", "/datastore/?output=all")
    assert (status, answer, headers["WWW-Authenticate"]) == (401, {"detail": "no token"}, "Bearer")
    status, _, answer = call(base, "GET", "/datastore/", token="")  # "Bearer " and nothing
    assert (status, answer) == (401, {"detail": "no token"})
    for what, (token, detail) in bad_tokens(realm).items():
        status, headers, answer = call(base, "DELETE", "/datastore/label?id=case00&tag=final", token)
        assert (status, answer) == (401, {"detail": detail}), what
        assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"', what
    assert (server[1] / "labels" / "final" / "case00.label.json").is_file()


#: (what, method, path, the lowest role that may, what that role gets): each role's rights, lowest first.
RIGHTS = [
    ("read the studies", "GET", "/datastore/?output=all", "user", 200),
    ("read app info", "GET", "/info/", "user", 200),
    ("see an image", "GET", "/review/image?image=case01", "user", 200),
    ("upload a label", "PUT", "/datastore/label?image={image}&tag=final", "annotator", 200),
    ("train", "POST", "/train/brain_tumour?run_sync=true", "admin", 422),  # past the role check: the allow-list
    ("start scoring", "POST", "/scoring/influence_review?run_sync=true", "admin", 200),
    ("delete a label", "DELETE", "/datastore/label?id={image}&tag=final", "admin", 200),
]


@pytest.mark.slow
@pytest.mark.monailabel
@pytest.mark.parametrize("role", [None, *ROLES])
def test_each_role_gets_exactly_what_it_allows(server, realm, role):
    base, studies = server
    token = realm.token(role)
    rank = list(ROLES).index(role) if role else -1
    image = f"case{4 + rank:02d}"  # one image per role: uploads and deletions of one role leave the others' alone
    label = studies / "labels" / "final" / f"{image}.label.json"
    for what, method, path, lowest, allowed_status in RIGHTS:
        allowed = rank >= list(ROLES).index(lowest)
        before = label.read_text() if label.exists() else None
        body = {"bundle_path": "/tmp"} if what == "train" else None
        upload = (image, b'{"label": "glioma"}') if what == "upload a label" else None
        status, _, answer = call(base, method, path.format(image=image), token, body=body, label=upload)
        assert status == (allowed_status if allowed else 403), (role, what, status, answer)
        if not allowed:
            assert "is required to perform this action" in answer["detail"], (role, what, answer)
            assert (label.read_text() if label.exists() else None) == before, (role, what)
    assert label.exists() == (role != "admin")  # the admin deleted its label, nobody else could
    if role in ("annotator", "reviewer"):
        assert json.loads(label.read_text())["label"] == "glioma"

    status, _, answer = call(base, "GET", "/review/whoami", token)
    can = {"train": rank >= 3, "score": rank >= 3, "label": rank >= 1}
    assert (status, answer) == (200, {"username": f"{role or 'nobody'}-1", "roles": list(ROLES.values())[:rank + 1],
                                      "can": can})


@pytest.mark.slow
@pytest.mark.monailabel
def test_the_api_description_takes_a_token_and_the_review_page_calls_do(server, realm):
    base, _ = server
    for path in ("/", "/docs", "/redoc", "/openapi.json", "/review/whoami", "/review/image?image=case01"):
        status, _, answer = call(base, "GET", path)
        assert (status, answer) == (401, {"detail": "no token"}), path
    token = realm.token(None)  # any authenticated user, with or without a role of the app
    status, _, schema = call(base, "GET", "/openapi.json", token)
    assert status == 200 and "/review/whoami" in schema["paths"] and "/datastore/" in schema["paths"]
    for path, marker in (("/", "swagger-ui"), ("/docs", "redoc"), ("/redoc", "redoc")):
        status, _, html = call(base, "GET", path, token)
        assert status == 200 and marker in html and "/openapi.json" in html, path
    # the page's own files carry no data: they load without a token and ask for one when the API answers 401
    status, _, html = call(base, "GET", "/review/")
    assert status == 200 and "<html" in html.lower()
    status, _, answer = call(base, "GET", "/auth/")  # where to log in: public, as for MONAI Label's own clients
    assert status == 200 and answer["enabled"] is True and answer["realm"] == realm.uri


@pytest.mark.slow
@pytest.mark.monailabel
def test_the_password_login_answers_a_token_or_a_clear_refusal(server):
    base, _ = server

    def login(user, password):
        form = urllib.parse.urlencode({"username": user, "password": password}).encode()
        req = urllib.request.Request(f"{base}/auth/token", method="POST", data=form, headers={
            "Content-Type": "application/x-www-form-urlencoded", "X-Requested-With": "robustmri"})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, answer = login("annotator", PASSWORD)
    assert status == 200 and answer["token_type"] == "Bearer"
    status, _, whoami = call(base, "GET", "/review/whoami", answer["access_token"])
    assert status == 200 and whoami["username"] == "annotator-1" and whoami["can"]["label"] is True
    status, answer = login("annotator", "wrong")
    assert (status, answer) == (400, {"detail": "login refused by the realm (user name or password)"})
