"""A real CNCF distribution registry (``docker-registry serve``) for tests, three ways.

Session fixtures, each yielding a :class:`RegistryServer` on 127.0.0.1 with a free port:

- ``registry``: anonymous pull and push.
- ``registry_basic``: htpasswd (bcrypt) Basic auth; ``.username``/``.password``.
- ``registry_token``: Bearer tokens from :class:`TokenServer` (RS256 JWTs signed with a
  self-signed certificate that is the registry's ``rootcertbundle``); anonymous pull, and pull and
  push with Basic credentials at the token endpoint.

The registries live for the whole session: use the ``unique_repo`` fixture for repository names.
``server.pusher()`` gives a :class:`tests.imagetools.Pusher`; ``server.client(**kw)`` a
:class:`RegistryClient` with the right credentials and fast retries.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
SERVICE = "shpc-lite-test-registry"
ISSUER = "shpc-lite-test-token-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------- token server

@dataclass
class TokenRequest:
    account: Optional[str]  # the Basic user name tried, None when anonymous
    scopes: List[str]
    service: Optional[str]
    granted: bool


class TokenServer:
    """A docker-style token server on 127.0.0.1 (``GET /token?service=&scope=``).

    Anonymous callers get ``pull``; callers with valid Basic credentials get ``pull``/``push``;
    wrong credentials get 401. ``expire_next(n)`` makes the next ``n`` tokens already expired for
    the registry (JWT ``exp`` in the past, ``expires_in`` still large), to test refresh on 401.
    """

    def __init__(self, users: dict, *, anonymous_pull: bool = True, expires_in: int = 300):
        import jwt  # noqa: F401  (fail early with a clear ImportError)
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.requests: List[TokenRequest] = []
        self._expire = 0
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._key_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True,
                                        name="token-server")

    def start(self) -> "TokenServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(STOP_TIMEOUT)

    def expire_next(self, count: int = 1) -> None:
        with self._lock:
            self._expire = count

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._expire = 0

    def issue(self, account: Optional[str], scopes: List[str], *, expired: bool = False) -> str:
        import jwt

        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            wanted = set(parts[-1].split(","))
            allowed = {"pull", "push"} if account else ({"pull"} if self.anonymous_pull else set())
            actions = sorted(wanted & allowed)
            if actions:
                access.append({"type": "repository", "name": ":".join(parts[1:-1]),
                               "actions": actions})
        now = int(time.time())
        exp = now - 3600 if expired else now + self.expires_in
        claims = {"iss": ISSUER, "sub": account or "", "aud": SERVICE, "exp": exp,
                  "nbf": now - 3600 if expired else now - 10, "iat": now - 10,
                  "jti": uuid.uuid4().hex, "access": access}
        return jwt.encode(claims, self._key_pem, algorithm="RS256",
                          headers={"x5c": [self._x5c]})

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                if url.path != "/token":
                    return self._reply(404, {"error": "not found"})
                query = parse_qs(url.query)
                scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
                user, granted = None, True
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    try:
                        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    except ValueError:
                        user, password = "", None
                    granted = server.users.get(user) == password
                account = user if granted else None
                with server._lock:
                    server.requests.append(TokenRequest(user, scopes,
                                                        query.get("service", [None])[0], granted))
                    expired = server._expire > 0
                    if expired and granted:
                        server._expire -= 1
                if not granted:
                    return self._reply(401, {"details": "invalid credentials"})
                token = server.issue(account, scopes, expired=expired)
                # Docker Hub sends both names; send one, alternating, so clients handle each.
                key = "token" if len(server.requests) % 2 else "access_token"
                self._reply(200, {key: token, "expires_in": server.expires_in,
                                  "issued_at": datetime.datetime.now(
                                      datetime.timezone.utc).isoformat()})

            def _reply(self, status, doc):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


# ----------------------------------------------------------------------------------------- registry

@dataclass
class RegistryServer:
    """A running ``docker-registry``; see the module documentation."""

    host: str  # "127.0.0.1:PORT"
    url: str  # "http://127.0.0.1:PORT"
    auth: str  # "none", "basic" or "token"
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    token_server: Optional[TokenServer] = None
    process: Optional[subprocess.Popen] = field(default=None, repr=False)
    log_path: Optional[Path] = None

    def ref(self, repo: str, tag: Optional[str] = None, digest: Optional[str] = None) -> str:
        """``127.0.0.1:PORT/repo[:tag][@digest]`` (``:latest`` when neither is given)."""
        text = f"{self.host}/{repo}"
        if tag or not digest:
            text += f":{tag or 'latest'}"
        return text + (f"@{digest}" if digest else "")

    def credentials(self):
        from shpc_lite.oci.credentials import StaticCredentials

        if self.username is None:
            return StaticCredentials()
        return StaticCredentials({self.host: (self.username, self.password)})

    def client(self, **options):
        """A RegistryClient for this registry: its credentials, fast retries, short timeouts."""
        from shpc_lite.oci.client import RegistryClient

        options.setdefault("credentials", self.credentials())
        options.setdefault("backoff", 0.01)
        options.setdefault("timeout", (5.0, 30.0))
        options.setdefault("platform", "linux/amd64")
        return RegistryClient(**options)

    def pusher(self):
        from tests.imagetools import Pusher

        return Pusher(self.url, self.username, self.password)


def _start_registry(workdir: Path, auth_config: str) -> tuple:
    exe = shutil.which("docker-registry")
    if not exe:
        pytest.fail("docker-registry is not installed (apt-get install docker-registry)")
    for _ in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {workdir / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            "http:\n"
            f"  addr: 127.0.0.1:{port}\n"
            f"  secret: {secrets.token_hex(16)}\n"
            + auth_config
        )
        log_path = workdir / "registry.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen([exe, "serve", str(config)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        log.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                resp = requests.get(url + "/v2/", timeout=1)
                if resp.status_code in (200, 401):
                    return proc, port, log_path
            except requests.ConnectionError:
                pass
            time.sleep(0.02)
        _stop(proc)
    tail = log_path.read_text(errors="replace")[-2000:]
    pytest.fail(f"docker-registry did not become ready; its log:\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """An anonymous registry (pull and push without credentials)."""
    work = tmp_path_factory.mktemp("registry-anon")
    proc, port, log = _start_registry(work, "")
    try:
        yield RegistryServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", "none",
                             process=proc, log_path=log)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def registry_basic(tmp_path_factory):
    """A registry with htpasswd (bcrypt) Basic auth."""
    if not shutil.which("htpasswd"):
        pytest.fail("htpasswd is not installed (apt-get install apache2-utils)")
    work = tmp_path_factory.mktemp("registry-basic")
    username, password = "tester", "pw-" + secrets.token_hex(8)
    entry = subprocess.run(["htpasswd", "-Bbn", username, password], check=True,
                           capture_output=True, text=True, timeout=30).stdout.strip()
    (work / "htpasswd").write_text(entry + "\n")
    auth = f"auth:\n  htpasswd:\n    realm: shpc-lite-test\n    path: {work / 'htpasswd'}\n"
    proc, port, log = _start_registry(work, auth)
    try:
        yield RegistryServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", "basic",
                             username, password, process=proc, log_path=log)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory):
    """A registry with Bearer-token auth from a TokenServer (``.token_server``)."""
    work = tmp_path_factory.mktemp("registry-token")
    username, password = "tokenuser", "tk-" + secrets.token_hex(8)
    tokens = TokenServer({username: password}).start()
    try:
        (work / "root.pem").write_bytes(tokens.cert_pem)
        auth = ("auth:\n  token:\n"
                f"    realm: {tokens.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {work / 'root.pem'}\n")
        proc, port, log = _start_registry(work, auth)
        try:
            yield RegistryServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", "token",
                                 username, password, tokens, process=proc, log_path=log)
        finally:
            _stop(proc)
    finally:
        tokens.stop()


_repo_counter = itertools.count(1)


@pytest.fixture
def unique_repo(request) -> str:
    """A repository name no other test uses (``test/<test-name>-<n>``), for shared registries."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60] or "repo"
    return f"test/{name}-{next(_repo_counter)}"
