"""The registry client against a real registry (anonymous, Basic, Bearer) and against small local
HTTP servers that misbehave on purpose (pagination, 401, 404, 429, 500, resets, slowness, lies,
redirects to another host)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from shpc_lite.errors import ConfigError, DigestMismatchError, RegistryError
from shpc_lite.oci.client import (
    MANIFEST_ACCEPT,
    Platform,
    RegistryClient,
    parse_www_authenticate,
    partial_path,
)
from shpc_lite.oci.credentials import Credential, DockerCredentials, StaticCredentials
from shpc_lite.oci.reference import parse_reference
from tests.imagetools import (
    Dir,
    File,
    Hardlink,
    Opaque,
    Symlink,
    Whiteout,
    make_image,
    make_index,
    make_layer,
    sha256,
)

TAGS = Path(__file__).parent / "data" / "tags"
SECRET = "Sup3r-Secret-Pa55word"


def read_tags(name: str) -> list:
    lines = (TAGS / name).read_text().splitlines()
    return [line.split("\t")[0] for line in lines if line.strip()]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text.strip() == text
    return text


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in (SECRET,) + secrets:
        if secret:
            assert secret not in text
            assert base64.b64encode(secret.encode()).decode() not in text


@pytest.fixture
def small_image():
    layers = [
        make_layer([Dir("bin"), File("bin/hello", "#!/bin/sh\necho hi\n", mode=0o755),
                    Symlink("bin/hi", "hello"), Dir("tmp", 0o1777)], compression="gzip"),
        make_layer([Hardlink("bin/hello2", "bin/hello"), Whiteout("bin/hi"), Opaque("tmp"),
                    File("etc/os-release", "ID=test\n")], compression="zstd"),
        make_layer({"data/blob.bin": bytes(range(256)) * 64}, compression=None),
    ]
    return layers


# ==================================================================================================
# Real registry
# ==================================================================================================

FLAVOURS = ["registry", "registry_basic", "registry_token"]


@pytest.mark.registry
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tags_and_head_digest(request, flavour, unique_repo):
    server = request.getfixturevalue(flavour)
    image = make_image([make_layer({"hello": "world"})])
    tags = read_tags("dockerhub_library-python_2024-02-15.txt")
    pusher = server.pusher()
    digest = pusher.push_image(unique_repo, image, tags=tags)
    with server.client() as client:
        listed = client.list_tags(server.ref(unique_repo))
        assert listed == sorted(set(tags))
        for tag in ("3.11", "3.11.8-slim-bookworm", "latest", "3-alpine"):
            assert client.head_digest(server.ref(unique_repo, tag)) == digest
        assert client.stats["manifest_get"] == 0  # digests come from HEAD alone
        assert client.stats["ping"] == 1
        assert client.stats["token"] == (1 if flavour == "registry_token" else 0)


@pytest.mark.registry
def test_nvcr_style_tags_with_signatures(registry_token, unique_repo):
    tags = read_tags("nvcr_nvidia-pytorch.txt")
    assert any(t.endswith(".sig") for t in tags)
    image = make_image([make_layer({"x": "y"})], oci=True)
    registry_token.pusher().push_image(unique_repo, image, tags=tags)
    with registry_token.client() as client:
        assert client.list_tags(registry_token.ref(unique_repo)) == sorted(set(tags))


PLATFORMS = {
    "linux/amd64": ("amd64", None),
    "linux/arm64/v8": ("arm64", "v8"),
    "linux/arm/v7": ("arm", "v7"),
    "linux/ppc64le": ("ppc64le", None),
    "windows/amd64": ("amd64", None),
}


@pytest.mark.registry
@pytest.mark.parametrize("flavour", ["registry", "registry_token"])
@pytest.mark.parametrize("oci", [False, True], ids=["docker", "oci"])
def test_platform_choice(request, flavour, oci, unique_repo, small_image):
    server = request.getfixturevalue(flavour)
    images = {}
    for plat, (arch, variant) in PLATFORMS.items():
        layers = small_image + [make_layer({"platform": plat})]
        images[plat] = make_image(layers, oci=oci, architecture=arch, variant=variant,
                                  os=plat.split("/")[0], entrypoint=["/bin/hello"])
    # windows first: a client taking the first entry would be wrong
    order = ["windows/amd64", "linux/arm/v7", "linux/arm64/v8", "linux/amd64", "linux/ppc64le"]
    index = make_index({p: images[p] for p in order}, oci=oci, attestation=True)
    assert any(c.platform["os"] == "unknown" for c in index.children)
    digest = server.pusher().push_index(unique_repo, index, tags=["3.11"])
    ref = server.ref(unique_repo, "3.11")

    with server.client(platform="linux/amd64") as client:
        assert client.head_digest(ref) == digest == index.digest
        for want, expected in [("linux/amd64", "linux/amd64"), ("linux/arm64", "linux/arm64/v8"),
                               ("linux/arm64/v8", "linux/arm64/v8"), ("linux/arm/v7", "linux/arm/v7"),
                               ("linux/arm", "linux/arm/v7"), ("linux/ppc64le", "linux/ppc64le"),
                               ("windows/amd64", "windows/amd64")]:
            resolved = client.resolve_image(ref, want)
            image = images[expected]
            assert resolved.digest == index.digest
            assert resolved.manifest_digest == image.digest
            assert resolved.manifest.media_type == image.media_type
            assert resolved.index.media_type == index.media_type
            assert resolved.config.digest == image.config.digest
            assert [d.digest for d in resolved.layers] == [b.digest for b in image.layers]
            assert [d.media_type for d in resolved.layers] == [b.media_type for b in image.layers]
            assert resolved.size == sum(b.size for b in image.layers)
            assert str(resolved.pinned) == f"{ref}@{index.digest}"
        default = client.resolve_image(ref)  # the client's platform
        assert default.manifest_digest == images["linux/amd64"].digest
        assert client.get_config(default)["config"]["Entrypoint"] == ["/bin/hello"]
        with pytest.raises(RegistryError) as info:
            client.resolve_image(ref, "linux/s390x")
        text = one_line(info.value)
        assert "linux/s390x" in text and "linux/arm64/v8" in text and "unknown" not in text
        # by digest, a child manifest resolves to itself
        child = client.resolve_image(server.ref(unique_repo, digest=images["linux/arm/v7"].digest))
        assert child.index is None and child.digest == images["linux/arm/v7"].digest


@pytest.mark.registry
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_blob_fetch_verified(request, flavour, unique_repo, small_image, tmp_path):
    server = request.getfixturevalue(flavour)
    image = make_image(small_image, oci=True)
    server.pusher().push_image(unique_repo, image, tags=["1"])
    ref = server.ref(unique_repo, "1")
    with server.client() as client:
        resolved = client.resolve_image(ref)
        assert client.get_blob_bytes(ref, resolved.config.digest) == image.config.data
        seen = []
        for number, desc in enumerate(resolved.layers):
            dest = tmp_path / "cache" / f"layer{number}"
            written = client.fetch_blob(ref, desc.digest, dest, size=desc.size,
                                        progress=lambda done, total: seen.append((done, total)))
            assert written == desc.size
            assert dest.read_bytes() == image.layers[number].data
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["layer0", "layer1",
                                                                          "layer2"]
        assert seen[-1] == (resolved.layers[-1].size, resolved.layers[-1].size)
        # a blob of another image: the registry's 404, reported in one line
        with pytest.raises(RegistryError) as info:
            client.fetch_blob(ref, sha256(b"nothing"), tmp_path / "missing")
        assert "404" in one_line(info.value) and unique_repo in str(info.value)
        assert not (tmp_path / "missing").exists()


@pytest.mark.registry
def test_parallel_fetch_one_session(registry_token, unique_repo, tmp_path):
    layers = [make_layer({f"f{i}": f"content {i}" * 1000}) for i in range(8)]
    image = make_image(layers)
    registry_token.pusher().push_image(unique_repo, image, tags=["p"])
    ref = registry_token.ref(unique_repo, "p")
    with registry_token.client(pool_size=4) as client:
        resolved = client.resolve_image(ref)
        with ThreadPoolExecutor(max_workers=4) as pool:
            sizes = list(pool.map(
                lambda d: client.fetch_blob(ref, d.digest, tmp_path / d.digest[7:], size=d.size),
                resolved.layers))
        assert sizes == [layer.size for layer in layers]
        stats = client.stats.snapshot()
        assert stats["blob"] == 8 and stats["token"] == 1  # one token for the scope, shared


@pytest.mark.registry
def test_token_auth_flows(registry_token, unique_repo):
    tokens = registry_token.token_server
    image = make_image([make_layer({"a": "b"})])
    digest = registry_token.pusher().push_image(unique_repo, image, tags=["1"])
    ref = registry_token.ref(unique_repo, "1")

    tokens.reset()
    with registry_token.client() as client:  # Basic credentials at the token realm
        assert client.head_digest(ref) == digest
        assert client.head_digest(ref) == digest
        assert [(r.account, r.granted) for r in tokens.requests] == [("tokenuser", True)]
        assert tokens.requests[0].scopes == [f"repository:{unique_repo}:pull"]
        assert tokens.requests[0].service == "shpc-lite-test-registry"

        # a cached token that the registry no longer accepts is replaced on the 401
        tokens.reset()
        client._tokens.clear()
        tokens.expire_next(1)
        assert client.head_digest(ref) == digest  # expired token -> 401 -> fresh token
        assert len(tokens.requests) == 2
        tokens.reset()
        client.resolve_image(ref)
        assert tokens.requests == []  # the fresh one is cached

    tokens.reset()
    with registry_token.client(credentials=StaticCredentials()) as anonymous:
        assert anonymous.head_digest(ref) == digest
        assert [(r.account, r.granted) for r in tokens.requests] == [(None, True)]


@pytest.mark.registry
def test_bad_credentials_real(registry_basic, registry_token, unique_repo):
    for server in (registry_basic, registry_token):
        image = make_image([make_layer({"a": "b"})])
        server.pusher().push_image(unique_repo, image, tags=["1"])
        bad = StaticCredentials({server.host: (server.username, SECRET)})
        with server.client(credentials=bad) as client:
            with pytest.raises(RegistryError) as info:
                client.head_digest(server.ref(unique_repo, "1"))
        text = one_line(info.value)
        assert info.value.status == 401
        assert "authentication failed" in text and server.host in text
        assert_no_secret(text)
    with registry_basic.client(credentials=StaticCredentials()) as client:
        with pytest.raises(RegistryError) as info:
            client.list_tags(registry_basic.ref(unique_repo))
    text = one_line(info.value)
    assert "no credentials" in text and "SHPC_LITE_REGISTRY_127_0_0_1_" in text


@pytest.mark.registry
def test_not_found_real(registry, unique_repo):
    registry.pusher().push_image(unique_repo, make_image([make_layer({"a": "b"})]), tags=["1"])
    with registry.client() as client:
        with pytest.raises(RegistryError) as info:
            client.head_digest(registry.ref(unique_repo, "2"))
        assert info.value.status == 404
        assert registry.ref(unique_repo, "2") in one_line(info.value)
        with pytest.raises(RegistryError) as info:
            client.get_manifest(registry.ref(unique_repo, "2"))
        assert "MANIFEST_UNKNOWN" in one_line(info.value)
        with pytest.raises(RegistryError) as info:
            client.list_tags(registry.ref("no/such-repo"))
        assert "NAME_UNKNOWN" in one_line(info.value)


@pytest.mark.registry
def test_mirror_for_docker_hub(registry, small_image):
    """``python:3.11`` (docker.io/library/python) is served by a mirror when one is configured."""
    image = make_image(small_image)
    registry.pusher().push_image("library/python", image, tags=["3.11"])
    with registry.client(mirrors={"index.docker.io": registry.url}) as client:
        assert client.head_digest("python:3.11") == image.digest
        resolved = client.resolve_image("python:3.11")
        assert str(resolved.reference) == "docker.io/library/python:3.11"
        assert resolved.manifest_digest == image.digest


# ==================================================================================================
# Small local servers that misbehave
# ==================================================================================================

class FakeServer:
    """``http.server`` on 127.0.0.1 in a thread; ``handle(req)`` returns (status, headers, body)
    or None when it answered (or broke the connection) itself. Every request is recorded."""

    def __init__(self, handle):
        self.handle = handle
        self.requests = []
        self.stop_event = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _do(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length) if length else b""
                server.requests.append((self.command, self.path, dict(self.headers)))
                answer = server.handle(self)
                if answer is None:
                    return
                status, headers, body = answer
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = _do

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def paths(self, method=None):
        return [p for m, p, _ in self.requests if method in (None, m)]

    def stop(self):
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def fake():
    servers = []

    def start(handle):
        server = FakeServer(handle)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def fast_client(**options) -> RegistryClient:
    options.setdefault("backoff", 0.001)
    options.setdefault("retries", 2)
    options.setdefault("timeout", (2.0, 2.0))
    options.setdefault("credentials", StaticCredentials())
    options.setdefault("platform", "linux/amd64")
    client = RegistryClient(**options)
    client.slept = []
    client._sleep = client.slept.append  # record back-off delays instead of waiting
    return client


def reset_connection(req) -> None:
    """Close the socket with RST instead of answering."""
    req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    req.close_connection = True
    req.connection.close()


MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": sha256(b"{}"), "size": 2},
                       "layers": []}).encode()
MANIFEST_DIGEST = sha256(MANIFEST)
OCI_MT = "application/vnd.oci.image.manifest.v1+json"


def manifest_answer(req, *, digest_header=True):
    headers = {"Content-Type": OCI_MT}
    if digest_header:
        headers["Docker-Content-Digest"] = MANIFEST_DIGEST
    return 200, headers, MANIFEST


def test_pagination_link_header(fake):
    all_tags = [f"t{i:03d}" for i in range(250)]
    scrambled = all_tags[::-1]

    def handle(req):
        url = urlsplit(req.path)
        if url.path == "/v2/":
            return 200, {}, b"{}"
        query = parse_qs(url.query)
        n = int(query["n"][0])
        last = query.get("last", [""])[0]
        rest = [t for t in sorted(all_tags) if t > last]
        page = rest[:n]
        headers = {"Content-Type": "application/json"}
        if len(rest) > n:  # relative URL, as the spec shows
            headers["Link"] = f'</v2/team/app/tags/list?n={n}&last={page[-1]}>; rel="next"'
        page = [t for t in scrambled if t in page]  # never in order
        return 200, headers, json.dumps({"name": "team/app", "tags": page}).encode()

    server = fake(handle)
    with fast_client(tags_page_size=100) as client:
        assert client.list_tags(f"{server.host}/team/app") == all_tags
        assert client.stats["tags"] == 3
    assert server.paths()[1:] == ["/v2/team/app/tags/list?n=100",
                                  "/v2/team/app/tags/list?n=100&last=t099",
                                  "/v2/team/app/tags/list?n=100&last=t199"]


def test_pagination_without_link_header(fake):
    """Old registries honour n/last but send no Link: a full page asks for what follows."""
    all_tags = [f"v{i}" for i in range(25)]

    def handle(req):
        url = urlsplit(req.path)
        if url.path == "/v2/":
            return 200, {}, b"{}"
        query = parse_qs(url.query)
        last = query.get("last", [""])[0]
        page = [t for t in sorted(all_tags) if t > last][: int(query["n"][0])]
        return 200, {}, json.dumps({"tags": page}).encode()

    server = fake(handle)
    with fast_client(tags_page_size=10) as client:
        assert client.list_tags(f"{server.host}/app") == sorted(all_tags)


def test_bad_basic_credentials(fake):
    def handle(req):
        return 401, {"WWW-Authenticate": 'Basic realm="Registry Realm"'}, b'{"errors":[]}'

    server = fake(handle)
    creds = StaticCredentials({server.host: ("alice", SECRET)})
    with fast_client(credentials=creds) as client:
        with pytest.raises(RegistryError) as info:
            client.head_digest(f"{server.host}/team/app:1.0")
        assert repr(client).count(SECRET) == 0
    text = one_line(info.value)
    assert info.value.status == 401 and "authentication failed" in text
    assert f"{server.host}/team/app:1.0" in text
    assert_no_secret(text)
    assert repr(creds.get(server.host)).count(SECRET) == 0
    # the ping learnt the scheme: Basic goes with the first request, and is not repeated
    assert server.requests[0][1] == "/v2/" and "Authorization" not in server.requests[0][2]
    sent = [h.get("Authorization") for _, p, h in server.requests if p.startswith("/v2/team")]
    assert sent == ["Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()]


def test_bad_bearer_credentials_nvcr_style(fake):
    """nvcr.io's challenge has no service; a 401 from the token realm is one clear line."""
    token_requests = []

    def handle(req):
        url = urlsplit(req.path)
        if url.path == "/proxy_auth":
            token_requests.append((parse_qs(url.query), req.headers.get("Authorization")))
            return 401, {}, b'{"details":"bad key"}'
        return 401, {"WWW-Authenticate": f'Bearer realm="http://{req.headers["Host"]}/proxy_auth",'
                                         'scope="repository:nvidia/pytorch:pull"'}, b""

    server = fake(handle)
    creds = StaticCredentials({server.host: ("$oauthtoken", SECRET)})
    with fast_client(credentials=creds) as client:
        with pytest.raises(RegistryError) as info:
            client.get_manifest(f"{server.host}/nvidia/pytorch:24.01-py3")
    text = one_line(info.value)
    assert "authentication failed" in text and "token server" in text and "rejected" in text
    assert_no_secret(text)
    query, auth = token_requests[0]
    assert "service" not in query
    assert query["scope"] == ["repository:nvidia/pytorch:pull"]
    assert auth.startswith("Basic ")


def test_bearer_token_scope_in_realm_and_access_token(fake):
    """Older nvcr.io challenges put the scope in the realm URL; the answer may be access_token."""
    seen = []

    def handle(req):
        url = urlsplit(req.path)
        if url.path == "/proxy_auth":
            seen.append(parse_qs(url.query))
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"access_token": "tok-123456", "expires_in": 600}).encode()
        if req.headers.get("Authorization") != "Bearer tok-123456":
            realm = f"http://{req.headers['Host']}/proxy_auth?scope=repository:nvidia/pytorch:pull"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}"'}, b""
        if url.path == "/v2/":
            return 200, {}, b""
        return manifest_answer(req)

    server = fake(handle)
    with fast_client() as client:
        digest = client.head_digest(f"{server.host}/nvidia/pytorch:24.01-py3")
        assert digest == MANIFEST_DIGEST
        assert client.get_manifest(f"{server.host}/nvidia/pytorch:24.01-py3").data == MANIFEST
        assert "tok-123456" not in repr(client)
    assert seen == [{"scope": ["repository:nvidia/pytorch:pull"]}]  # once, scope not repeated


def test_not_found(fake):
    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                       "detail": {"Tag": "9.9"}}]}).encode()
        return 404, {"Content-Type": "application/json"}, body

    server = fake(handle)
    with fast_client() as client:
        with pytest.raises(RegistryError) as info:
            client.get_manifest(f"{server.host}/team/app:9.9")
        text = one_line(info.value)
        assert f"{server.host}/team/app:9.9" in text and "HTTP 404" in text
        assert "MANIFEST_UNKNOWN" in text
        assert client.stats["manifest_get"] == 1  # a 404 is not retried


def test_429_retry_after_then_success(fake):
    calls = []

    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        calls.append(req.path)
        if len(calls) == 1:
            return 429, {"Retry-After": "1"}, b""
        return manifest_answer(req)

    server = fake(handle)
    with fast_client() as client:
        assert client.head_digest(f"{server.host}/a/b:1") == MANIFEST_DIGEST
        assert client.slept == [1.0]


def test_429_retry_after_too_long_fails_at_once(fake):
    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        return 429, {"Retry-After": "21600"}, b""

    server = fake(handle)
    with fast_client() as client:
        with pytest.raises(RegistryError) as info:
            client.head_digest(f"{server.host}/a/b:1")
        assert client.slept == []
    text = one_line(info.value)
    assert "rate limited" in text and "21600" in text and info.value.status == 429


def test_500_then_success_and_500_forever(fake):
    state = {"fail": 1}

    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        if state["fail"] > 0:
            state["fail"] -= 1
            return 500, {}, b"oops"
        return manifest_answer(req)

    server = fake(handle)
    with fast_client() as client:
        assert client.get_manifest(f"{server.host}/a/b:1").digest == MANIFEST_DIGEST
        assert len(client.slept) == 1 and client.slept[0] < 0.01
        state["fail"] = 100
        with pytest.raises(RegistryError) as info:
            client.get_manifest(f"{server.host}/a/b:1")
        text = one_line(info.value)
        assert server.host in text and f"{server.host}/a/b:1" in text and "HTTP 500" in text
        assert client.stats["manifest_get"] == 2 + 3  # retries=2: three attempts


def test_connection_reset_then_success(fake):
    state = {"resets": 2}

    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        if state["resets"] > 0:
            state["resets"] -= 1
            return reset_connection(req)
        return manifest_answer(req)

    server = fake(handle)
    with fast_client() as client:
        assert client.head_digest(f"{server.host}/a/b:1") == MANIFEST_DIGEST
        state["resets"] = 10
        with pytest.raises(RegistryError) as info:
            client.head_digest(f"{server.host}/a/b:1")
    text = one_line(info.value)
    assert "3 attempt(s)" in text and "connection" in text


def test_slow_server_times_out(fake):
    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        fake_server.stop_event.wait(5)  # far past the read timeout
        return manifest_answer(req)

    fake_server = fake(handle)
    started = time.monotonic()
    with fast_client(timeout=(1.0, 0.3), retries=1) as client:
        with pytest.raises(RegistryError) as info:
            client.head_digest(f"{fake_server.host}/a/b:1")
    assert time.monotonic() - started < 3
    assert "timed out" in one_line(info.value) and "2 attempt(s)" in str(info.value)


def test_blob_with_wrong_content(fake, tmp_path):
    good = b"the real layer" * 100
    digest = sha256(good)

    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        return 200, {"Content-Type": "application/octet-stream"}, b"a lie" * 280

    server = fake(handle)
    dest = tmp_path / "blobs" / "layer"
    with fast_client() as client:
        with pytest.raises(DigestMismatchError) as info:
            client.fetch_blob(f"{server.host}/a/b:1", digest, dest)
        text = one_line(info.value)
        assert digest in text and f"{server.host}/a/b:1" in text
        assert list((tmp_path / "blobs").iterdir()) == []  # temp file removed
        with pytest.raises(DigestMismatchError):
            client.fetch_blob(f"{server.host}/a/b:1", digest, dest, size=len(good))
        with pytest.raises(DigestMismatchError):
            client.get_blob_bytes(f"{server.host}/a/b:1", digest)
        assert client.stats["blob"] == 3  # a lie is not retried
    assert list((tmp_path / "blobs").iterdir()) == []


def test_manifest_by_digest_verified(fake):
    other = sha256(b"something else")

    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        return manifest_answer(req, digest_header=False)

    server = fake(handle)
    with fast_client() as client:
        with pytest.raises(DigestMismatchError) as info:
            client.get_manifest(f"{server.host}/a/b@{other}")
        assert other in one_line(info.value)
        # HEAD without Docker-Content-Digest: GET and hash
        assert client.head_digest(f"{server.host}/a/b:1") == MANIFEST_DIGEST
        assert client.stats["manifest_head"] == 1 and client.stats["manifest_get"] == 2
    heads = [h for m, p, h in server.requests if m == "HEAD"]
    assert heads[0]["Accept"] == MANIFEST_ACCEPT


def test_body_cut_short_is_retried(fake, tmp_path):
    data = bytes(range(256)) * 4096
    state = {"cut": 1}

    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        if state["cut"] > 0:
            state["cut"] -= 1
            req.send_response(200)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data[: len(data) // 3])
            req.wfile.flush()
            return reset_connection(req)
        return 200, {}, data

    server = fake(handle)
    progress = []
    with fast_client() as client:
        written = client.fetch_blob(f"{server.host}/a/b:1", sha256(data), tmp_path / "blob",
                                    progress=lambda done, total: progress.append(done))
    assert written == len(data) and (tmp_path / "blob").read_bytes() == data
    assert progress.count(0) == 2  # this server ignores Range (200): the retry starts again from zero


def ranged_blob_server(fake, data: bytes, *, cut_first: int = 0, honour_range: bool = True):
    """Serves ``data`` as any blob, with Range (206) when asked; the first ``cut_first`` answers
    send a third of what they owe and then reset the connection."""
    state = {"cut": cut_first}

    def handle(req):
        if req.path == "/v2/":
            return 200, {}, b""
        start = 0
        match = re.match(r"bytes=(\d+)-$", req.headers.get("Range", ""))
        if match and honour_range:
            start = int(match.group(1))
        body = data[start:]
        status, headers = (206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}) if start else (200, {})
        if state["cut"] > 0:
            state["cut"] -= 1
            req.send_response(status)
            for key, value in headers.items():
                req.send_header(key, value)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body[: len(body) // 3 + 4096])
            req.wfile.flush()
            time.sleep(0.2)  # let the client read what was sent before the reset
            return reset_connection(req)
        return status, headers, body

    return fake(handle)


def blob_ranges(server) -> list:
    return [h.get("Range") for m, p, h in server.requests if "/blobs/" in p]


def test_retry_after_a_cut_resumes_with_range(fake, tmp_path):
    data = os.urandom(3 << 20)
    server = ranged_blob_server(fake, data, cut_first=1)
    with fast_client() as client:
        assert client.fetch_blob(f"{server.host}/a/b:1", sha256(data), tmp_path / "blob", size=len(data)) == len(data)
    assert (tmp_path / "blob").read_bytes() == data and not partial_path(tmp_path / "blob").exists()
    ranges = blob_ranges(server)
    assert ranges[0] is None and re.fullmatch(r"bytes=\d+-", ranges[1])
    assert 0 < int(ranges[1][6:-1]) < len(data)  # only the rest was asked for


def test_partial_of_an_earlier_attempt_is_resumed(fake, tmp_path):
    data = os.urandom(3 << 20)
    dest = tmp_path / "blob"
    server = ranged_blob_server(fake, data, cut_first=1)
    with fast_client(retries=0) as client:  # the first process gives up (or is killed) mid-blob
        with pytest.raises(RegistryError):
            client.fetch_blob(f"{server.host}/a/b:1", sha256(data), dest, size=len(data))
    kept = partial_path(dest).stat().st_size
    assert not dest.exists() and 0 < kept < len(data)
    progress = []
    with fast_client() as client:
        client.fetch_blob(f"{server.host}/a/b:1", sha256(data), dest, size=len(data),
                          progress=lambda done, total: progress.append(done))
    assert dest.read_bytes() == data
    assert blob_ranges(server)[-1] == f"bytes={kept}-" and progress[0] == kept


@pytest.mark.parametrize("honour_range", [True, False], ids=["206", "range-ignored"])
def test_a_bad_or_unservable_partial_costs_one_full_download(fake, tmp_path, honour_range):
    """A partial whose bytes are wrong fails verification and is fetched again from 0; a server
    that ignores Range (200) sends the whole blob, which replaces the partial."""
    data = os.urandom(1 << 20)
    dest = tmp_path / "blob"
    partial_path(dest).write_bytes(b"x" * 1000)
    server = ranged_blob_server(fake, data, honour_range=honour_range)
    with fast_client() as client:
        client.fetch_blob(f"{server.host}/a/b:1", sha256(data), dest, size=len(data))
    assert dest.read_bytes() == data and not partial_path(dest).exists()
    assert blob_ranges(server) == (["bytes=1000-", None] if honour_range else ["bytes=1000-"])


def test_a_blob_longer_than_its_manifest_says_is_refused(fake, tmp_path):
    data = os.urandom(1 << 20)
    server = ranged_blob_server(fake, data + b"trailing bytes")
    with fast_client() as client:
        with pytest.raises(DigestMismatchError) as info:
            client.fetch_blob(f"{server.host}/a/b:1", sha256(data), tmp_path / "blob", size=len(data))
    assert f"larger than the {len(data)} bytes its manifest says" in one_line(info.value)
    assert list(tmp_path.iterdir()) == []


def test_credentials_never_go_to_a_plain_http_realm(fake):
    def handle(req):
        return 401, {"WWW-Authenticate": 'Bearer realm="http://auth.example.invalid/token",'
                                         'service="x"'}, b""

    server = fake(handle)
    creds = StaticCredentials({server.host: ("carol", SECRET)})
    with fast_client(credentials=creds) as client:
        with pytest.raises(RegistryError) as info:
            client.head_digest(f"{server.host}/a/b:1")
        assert client.stats["token"] == 0  # refused before any request
    text = one_line(info.value)
    assert "plain-http token realm auth.example.invalid" in text
    assert_no_secret(text)


def test_redirect_to_other_host_drops_authorization(fake, tmp_path, caplog):
    data = b"layer bytes from the CDN" * 50
    cdn_seen = []

    def cdn(req):
        cdn_seen.append(dict(req.headers))
        return 200, {"Content-Type": "application/octet-stream"}, data

    cdn_server = fake(cdn)

    def registry(req):
        url = urlsplit(req.path)
        if url.path == "/token":
            return 200, {}, json.dumps({"token": "registry-token-xyz", "expires_in": 300}).encode()
        if req.headers.get("Authorization") != "Bearer registry-token-xyz":
            return 401, {"WWW-Authenticate": f'Bearer realm="http://{req.headers["Host"]}/token",'
                                             'service="fake",scope="repository:a/b:pull"'}, b""
        if url.path == "/v2/":
            return 200, {}, b""
        # a signed URL on another host (same address, other name and port)
        return 307, {"Location": f"http://localhost:{cdn_server.port}/blob?sig=SIGNATURE"}, b""

    server = fake(registry)
    creds = StaticCredentials({server.host: ("bob", SECRET)})
    caplog.set_level("DEBUG", logger="shpc_lite")
    with fast_client(credentials=creds) as client:
        assert client.ping(server.host) == "bearer"
        client.fetch_blob(f"{server.host}/a/b:1", sha256(data), tmp_path / "blob")
    assert (tmp_path / "blob").read_bytes() == data
    assert "/v2/a/b/blobs/" in caplog.text  # requests are logged, secrets are not
    for secret in ("registry-token-xyz", "SIGNATURE", SECRET):
        assert secret not in caplog.text
    assert len(cdn_seen) == 1 and "Authorization" not in cdn_seen[0]
    blob_request = [h for m, p, h in server.requests if p.startswith("/v2/a/b/blobs/")]
    assert blob_request[-1]["Authorization"] == "Bearer registry-token-xyz"


def test_refuses_plain_http_to_remote_hosts():
    with pytest.raises(ConfigError) as info:
        RegistryClient(mirrors={"docker.io": "http://mirror.example.com"},
                       credentials=StaticCredentials())
    assert "plain http" in one_line(info.value)
    client = RegistryClient(mirrors={"docker.io": "http://mirror.example.com:5000"},
                            insecure_registries=["mirror.example.com:5000"],
                            credentials=StaticCredentials())
    assert client.mirrors == {"docker.io": "http://mirror.example.com:5000"}
    assert client._endpoint(parse_reference("python")).base == "http://mirror.example.com:5000"
    plain = RegistryClient(credentials=StaticCredentials(), insecure_registries=["reg.lan"])
    assert plain._endpoint(parse_reference("quay.io/a/b")).base == "https://quay.io"
    assert plain._endpoint(parse_reference("python")).base == "https://registry-1.docker.io"
    assert plain._endpoint(parse_reference("localhost:5000/a")).base == "http://localhost:5000"
    assert plain._endpoint(parse_reference("reg.lan:5000/a")).base == "http://reg.lan:5000"


# ==================================================================================================
# Pure parts: WWW-Authenticate, platforms, credentials
# ==================================================================================================

def test_parse_www_authenticate():
    [c] = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/python:pull,push",error="insufficient_scope"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                        "scope": "repository:library/python:pull,push",
                        "error": "insufficient_scope"}
    [c] = parse_www_authenticate('Bearer realm="https://nvcr.io/proxy_auth",scope="repository:nvidia/pytorch:pull"')
    assert "service" not in c.params
    [c] = parse_www_authenticate('Basic realm="a \\"quoted\\", realm"')
    assert (c.scheme, c.realm) == ("basic", 'a "quoted", realm')
    both = parse_www_authenticate('Basic realm="x", Bearer realm="https://t/token", service=s')
    assert [c.scheme for c in both] == ["basic", "bearer"]
    assert both[1].params == {"realm": "https://t/token", "service": "s"}
    assert parse_www_authenticate("") == []


def test_platform():
    assert str(Platform.parse("linux/x86_64")) == "linux/amd64"
    assert Platform.parse("linux/arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform.parse("linux/arm64").matches(Platform("linux", "arm64"))
    assert not Platform.parse("linux/arm/v6").matches(Platform("linux", "arm", "v7"))
    assert Platform.parse("linux/amd64").matches(Platform("linux", "amd64", "v3"))
    assert not Platform.parse("linux/amd64").matches(Platform("windows", "amd64"))
    assert Platform.host().os == "linux"
    with pytest.raises(ValueError):
        Platform.parse("linux")


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_env_wins(tmp_path):
    write_json(tmp_path / ".docker/config.json", {"auths": {"nvcr.io": {"auth": b64("u:file")}}})
    env = {"SHPC_LITE_REGISTRY_NVCR_IO_USER": "$oauthtoken",
           "SHPC_LITE_REGISTRY_NVCR_IO_PASSWORD": SECRET,
           "SHPC_LITE_REGISTRY_LOCALHOST_5000_USER": "me",
           "SHPC_LITE_REGISTRY_LOCALHOST_5000_PASSWORD": "pw"}
    store = DockerCredentials(environ=env, home=tmp_path)
    cred = store.get("nvcr.io")
    assert (cred.username, cred.password) == ("$oauthtoken", SECRET)
    assert SECRET not in repr(cred) and SECRET not in str(cred) and SECRET not in repr(store)
    assert store.get("localhost:5000").username == "me"
    assert store.get("ghcr.io") is None
    with pytest.raises(ConfigError) as info:
        DockerCredentials(environ={"SHPC_LITE_REGISTRY_GHCR_IO_USER": "x"},
                          home=tmp_path).get("ghcr.io")
    assert "SHPC_LITE_REGISTRY_GHCR_IO_PASSWORD" in one_line(info.value)


def test_credentials_docker_config(tmp_path):
    write_json(tmp_path / ".docker/config.json", {"auths": {
        "https://index.docker.io/v1/": {"auth": b64(f"hubuser:{SECRET}")},
        "https://quay.io": {"auth": b64("quser:a:b:c")},
        "ghcr.io": {"username": "g", "password": "gp"},
    }})
    store = DockerCredentials(environ={}, home=tmp_path)
    assert store.get("docker.io") == Credential("hubuser", SECRET, store.get("docker.io").source)
    assert store.get("index.docker.io").username == "hubuser"
    assert (store.get("quay.io").username, store.get("quay.io").password) == ("quser", "a:b:c")
    assert store.get("ghcr.io").password == "gp"
    assert store.get("nvcr.io") is None


def test_credentials_apptainer_first_and_docker_config_env(tmp_path):
    write_json(tmp_path / ".apptainer/docker-config.json",
               {"auths": {"nvcr.io": {"auth": b64("app:1")}}})
    write_json(tmp_path / "dockercfg/config.json", {"auths": {
        "nvcr.io": {"auth": b64("dock:2")}, "quay.io": {"auth": b64("dock:3")}}})
    store = DockerCredentials(environ={"DOCKER_CONFIG": str(tmp_path / "dockercfg")},
                              home=tmp_path)
    assert store.get("nvcr.io").username == "app"
    assert store.get("quay.io").username == "dock"  # falls through to Docker's file


def make_helper(bindir: Path, name: str, script: str) -> None:
    bindir.mkdir(exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text(f"#!{sys.executable}\nimport json, sys, time\n{script}\n")
    path.chmod(0o755)


def test_credential_helpers(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    make_helper(bindir, "perhost", "host = sys.stdin.read().strip()\n"
                "print(json.dumps({'ServerURL': host, 'Username': 'helper:' + host, 'Secret': 's'}))")
    make_helper(bindir, "store", "host = sys.stdin.read().strip()\n"
                "if host == 'nothere.io': sys.exit('credentials not found in native keychain')\n"
                "print(json.dumps({'Username': 'store:' + host, 'Secret': 's'}))")
    make_helper(bindir, "slow", "time.sleep(10)")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    write_json(tmp_path / ".docker/config.json", {
        "credsStore": "store",
        "credHelpers": {"ghcr.io": "perhost", "https://index.docker.io/v1/": "perhost",
                        "slow.io": "slow", "missing.io": "notinstalled"},
        "auths": {"nothere.io": {"auth": b64("fileuser:x")}, "slow.io": {"auth": b64("slowf:x")}},
    })
    store = DockerCredentials(environ={}, home=tmp_path, helper_timeout=0.5)
    assert store.get("ghcr.io").username == "helper:ghcr.io"  # credHelpers beats credsStore
    assert store.get("docker.io").username == "helper:https://index.docker.io/v1/"
    assert store.get("quay.io").username == "store:quay.io"
    assert store.get("nothere.io").username == "fileuser"  # helper miss: the file entry
    started = time.monotonic()
    assert store.get("slow.io").username == "slowf"  # bounded wait, then the file
    assert time.monotonic() - started < 5
    assert store.get("missing.io") is None  # helper not installed: no credentials, no crash
