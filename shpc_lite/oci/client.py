"""A client for the OCI distribution (Docker Registry v2) HTTP API.

One ``requests.Session`` per client, safe to share between the threads of a bounded pool. Every
request has a timeout; connection errors, 5xx and 429 are retried with a small exponential backoff
(429 and 503 honour ``Retry-After``). Authentication is retry-on-401: the ``WWW-Authenticate``
challenge selects Basic or a Bearer token from the challenge's realm (anonymous, or with Basic
credentials). Tokens are cached per (realm, service, scope) until they expire, and replaced when
the registry answers 401 to a cached one. Credentials are sent only over https or to loopback
hosts, and ``Authorization`` only ever goes to the host it was made for (never along a redirect
to a CDN). Content is verified against its digest; blobs stream to a temp file beside their
destination and are renamed into place only when the digest matched.

Credentials and tokens never appear in messages, logs or reprs: they are registered with
:mod:`shpc_lite.scrub` when loaded, and every message is scrubbed.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import platform as _platform
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl, unquote, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from ..errors import ConfigError, DigestMismatchError, ReferenceError_, RegistryError
from ..scrub import printable, register_secret, register_url, scrub
from .document import check_image_config, load_json, load_object
from .credentials import Credential, CredentialProvider, DockerCredentials, env_prefix
from .reference import _TAG_RE, ImageReference, is_digest, parse_reference

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

MAX_MANIFEST_BYTES = 4 << 20  # what distribution accepts on push
MAX_SMALL_BLOB_BYTES = 32 << 20
MAX_TOKEN_BYTES = 1 << 20
MAX_REDIRECTS = 10
# A tag list longer than this is a registry paginating without end (Docker Hub's largest
# repositories have some 10,000 tags); so are pages that keep linking on without a new tag.
MAX_TAG_PAGES = 1000
MAX_TAGS = 200_000
MAX_STALE_TAG_PAGES = 3
CHUNK = 1 << 20
REQUEST_KINDS = ("token", "ping", "tags", "manifest_head", "manifest_get", "blob")

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
)


# ----------------------------------------------------------------------------------------------
# Plain data
# ----------------------------------------------------------------------------------------------

_ARCH_ALIASES = {
    "x86_64": "amd64", "x86-64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64",
    "i386": "386", "i686": "386", "386": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    """An image platform, ``os/architecture[/variant]`` (``linux/arm64/v8``)."""

    os: str
    architecture: str
    variant: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = str(text).strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9._-]+", p) for p in parts):
            raise ValueError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> "Platform":
        machine = _platform.machine().lower()
        if machine.startswith("armv"):
            return cls("linux", "arm", "v" + machine[4:5])
        return cls("linux", _ARCH_ALIASES.get(machine, machine))

    @classmethod
    def from_json(cls, data: Mapping) -> "Platform":
        return cls(str(data.get("os", "")), str(data.get("architecture", "")),
                   data.get("variant") or None)

    def normalized_variant(self) -> Optional[str]:
        return self.variant or _DEFAULT_VARIANT.get(self.architecture)

    def matches(self, other: "Platform") -> bool:
        """Whether an image built for ``other`` is what this (wanted) platform asks for."""
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and (self.variant is None and self.architecture not in _DEFAULT_VARIANT
                 or self.normalized_variant() == other.normalized_variant())
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor from a manifest or index (digest already validated)."""

    media_type: str
    digest: str
    size: int
    platform: Optional[Platform] = None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    urls: Tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: object, where: str) -> "Descriptor":
        if not isinstance(data, dict):
            raise RegistryError(f"{where}: descriptor is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not is_digest(digest):
            raise RegistryError(f"{where}: invalid descriptor digest {str(digest)[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{where}: invalid size for {digest}")
        plat = data.get("platform")
        annotations, urls = data.get("annotations") or {}, data.get("urls") or []
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise RegistryError(f"{where}: annotations of {digest} are not an object of strings")
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise RegistryError(f"{where}: urls of {digest} are not a list of strings")
        return cls(
            media_type=str(data.get("mediaType", "")),
            digest=digest,
            size=size,
            platform=Platform.from_json(plat) if isinstance(plat, dict) else None,
            annotations=dict(annotations),
            urls=tuple(urls),
        )

    @property
    def is_attestation(self) -> bool:
        return (
            self.annotations.get("vnd.docker.reference.type") == "attestation-manifest"
            or (self.platform is not None
                and (self.platform.os, self.platform.architecture) == ("unknown", "unknown"))
        )


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    reference: ImageReference
    media_type: str
    digest: str
    data: bytes = field(repr=False)

    @cached_property
    def json(self) -> dict:
        return load_object(self.data, f"{self.reference}: manifest {self.digest}", RegistryError)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    def descriptors(self, key: str) -> List[Descriptor]:
        items = self.json.get(key)
        if not isinstance(items, list):
            raise RegistryError(f"{self.reference}: manifest {self.digest} has no {key!r} list")
        where = f"{self.reference} ({self.digest})"
        return [Descriptor.from_json(item, where) for item in items]


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved to the top-level digest and the manifest for one platform."""

    reference: ImageReference
    digest: str  # what the reference names: the index digest for multi-platform images
    manifest: Manifest  # the platform's image manifest
    config: Descriptor
    layers: Tuple[Descriptor, ...]
    index: Optional[Manifest] = None
    platform: Optional[Platform] = None  # known when chosen from an index

    @property
    def manifest_digest(self) -> str:
        return self.manifest.digest

    @property
    def pinned(self) -> ImageReference:
        """The reference with its digest, e.g. for lock files and SIF labels."""
        return self.reference.with_digest(self.digest)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


class RequestStats:
    """Thread-safe count of HTTP requests sent, by kind (see ``REQUEST_KINDS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return {kind: self._counts.get(kind, 0) for kind in REQUEST_KINDS}

    def __getitem__(self, kind: str) -> int:
        with self._lock:
            return self._counts.get(kind, 0)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def __repr__(self) -> str:
        return f"RequestStats({self.snapshot()!r})"


# ----------------------------------------------------------------------------------------------
# WWW-Authenticate
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: Mapping[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


_TOKEN68 = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_SCHEME_RE = re.compile(rf"\s*({_TOKEN68})(?=\s|,|$)")
_PARAM_RE = re.compile(rf'\s*({_TOKEN68})\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*')


def parse_www_authenticate(header: str) -> List[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges (quoted values may hold commas)."""
    challenges: List[Challenge] = []
    pos, text = 0, header or ""
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t,":
            pos += 1
        match = _SCHEME_RE.match(text, pos)
        if not match:
            break
        scheme, pos = match.group(1).lower(), match.end()
        params: Dict[str, str] = {}
        while True:
            param = _PARAM_RE.match(text, pos)
            if not param:
                break
            key, value = param.group(1).lower(), param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key] = value
            pos = param.end()
            if pos < len(text) and text[pos] == ",":
                pos += 1
        challenges.append(Challenge(scheme, params))
    return challenges


def _pick_challenge(header: str) -> Optional[Challenge]:
    found = {c.scheme: c for c in parse_www_authenticate(header)}
    return found.get("bearer") or found.get("basic")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    name = host.lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_allowed(netloc: str, insecure_registries: Iterable[str]) -> bool:
    """Whether a registry host may be spoken to without TLS: loopback, or listed by the site in
    config ``insecure_registries`` (with or without its port). Every caller asks here (the
    client, the apptainer back end, podman's install step)."""
    host = netloc.lower()
    insecure = set(insecure_registries)
    return _is_loopback(host) or host in insecure or host.split(":", 1)[0] in insecure


def _origin(url: str) -> Tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _strip_query(url: str) -> str:
    """A URL safe to print: signed CDN URLs carry secrets in their query."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def split_userinfo(url: str) -> Tuple[str, Optional[Credential]]:
    """A mirror URL without its ``user:password@`` part, and that part as a Credential (which
    registers the password with the scrubber); requests would ignore it and messages show it."""
    register_url(url)
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    cred = Credential(unquote(parts.username), unquote(parts.password or ""), source="the mirror URL")
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])), cred


class UrlCredentials:
    """Credentials given in mirror URLs first, then the configured provider."""

    def __init__(self, in_urls: Mapping[str, Credential], provider: CredentialProvider):
        self._in_urls = {host.lower(): cred for host, cred in in_urls.items()}
        self._provider = provider

    def get(self, host: str) -> Optional[Credential]:
        return self._in_urls.get(host.lower()) or self._provider.get(host)

    def __repr__(self) -> str:
        return f"UrlCredentials(hosts={sorted(self._in_urls)!r}, then={self._provider!r})"


def _media_type(resp: requests.Response, body: Optional[bytes] = None) -> str:
    value = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if value in INDEX_MEDIA_TYPES or value in MANIFEST_MEDIA_TYPES or body is None:
        return value
    try:  # some registries send application/json; the manifest's own field decides
        doc = load_json(body, "manifest", RegistryError)
    except RegistryError:  # Manifest.json reports it, naming the image
        return value
    if isinstance(doc, dict):
        if isinstance(doc.get("mediaType"), str):
            return doc["mediaType"]
        if "manifests" in doc:
            return OCI_INDEX
        if "config" in doc and "layers" in doc:
            return OCI_MANIFEST
    return value


def _new_hasher(digest: str):
    """A hash object for the algorithm of ``digest`` (``sha256:...``)."""
    return hashlib.new(digest.split(":", 1)[0])


def _digest_of(hasher) -> str:
    return f"{hasher.name}:{hasher.hexdigest()}"


PARTIAL_SUFFIX = ".partial"


def partial_path(dest: Path) -> Path:
    """Where ``fetch_blob`` keeps the bytes of ``dest`` received so far."""
    return dest.with_name(dest.name + PARTIAL_SUFFIX)


def _range_start(resp: requests.Response) -> Optional[int]:
    """First byte of a 206 answer (``Content-Range: bytes START-END/TOTAL``)."""
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


@dataclass
class _Partial:
    """The hash and length of a partial download, kept in step with its file."""

    digest: str
    size: Optional[int]
    hasher: object
    have: int = 0

    @classmethod
    def load(cls, fh, digest: str, size: Optional[int]) -> "_Partial":
        state = cls(digest, size, _new_hasher(digest))
        fh.seek(0)
        for block in iter(lambda: fh.read(CHUNK), b""):
            state.add(block)
        if size is not None and state.have > size:
            state.restart(fh)
        return state

    def add(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.have += len(chunk)

    def restart(self, fh) -> None:
        fh.truncate(0)
        self.hasher, self.have = _new_hasher(self.digest), 0

    def verify(self, what: str) -> int:
        got = _digest_of(self.hasher)
        if self.size is not None and self.have != self.size:
            raise DigestMismatchError(f"{what} has size {self.have} (expected {self.size}); discarded")
        if got != self.digest:
            raise DigestMismatchError(f"{what} has digest {got}; discarded")
        return self.have


def _retry_after(resp: requests.Response) -> Optional[float]:
    value = resp.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _finish(resp: requests.Response, limit: int = 1 << 16) -> None:
    """Close a response; when what is left of its body is small it is read first, so that the
    connection goes back to the pool instead of being closed (HEAD, 401, redirects, errors)."""
    try:
        resp.raw.read(limit, decode_content=False)
    except Exception:  # a broken connection is closed below anyway
        pass
    resp.close()


def _registry_detail(resp: requests.Response) -> str:
    """``CODE: message`` from a registry's JSON error body, one short line."""
    try:
        body = resp.raw.read(4096, decode_content=True)
        errors = json.loads(body.decode("utf-8")).get("errors") or []
        first = errors[0]
        text = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except Exception:  # any unexpected body: no detail
        return ""
    return printable(" ".join(text.split())[:160])


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()


@dataclass(frozen=True)
class _Endpoint:
    registry: str  # the reference's registry (docker.io), for messages
    base: str  # scheme://host[:port][/prefix], no trailing slash
    cred_host: str  # whose credentials apply (the mirror's host for a mirror)

    @property
    def netloc(self) -> str:
        return urlsplit(self.base).netloc

    @property
    def secure(self) -> bool:
        return self.base.startswith("https://") or _is_loopback(self.netloc)


# ----------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------

class RegistryClient:
    """Talks to OCI distribution registries; see the module documentation.

    ``mirrors`` maps a registry host to a base URL used instead (``{"docker.io":
    "http://127.0.0.1:5000"}``). Plain http is used for loopback hosts and for the hosts in
    ``insecure_registries``; any other http URL is refused. ``timeout`` is (connect, read)
    seconds; ``retries`` is the number of retries after the first attempt, waiting
    ``backoff * 2**n`` seconds (capped at ``max_backoff``) or the server's ``Retry-After`` when
    it is at most ``max_retry_after``.
    """

    def __init__(
        self,
        *,
        mirrors: Optional[Mapping[str, str]] = None,
        insecure_registries: Iterable[str] = (),
        platform: Union[str, Platform, None] = None,
        timeout: Union[float, Tuple[float, float]] = (10.0, 60.0),
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_retry_after: float = 60.0,
        credentials: Optional[CredentialProvider] = None,
        pool_size: int = 16,
        tags_page_size: int = 1000,
        user_agent: str = "shpc-lite",
    ):
        self.platform = (platform if isinstance(platform, Platform)
                         else Platform.parse(platform) if platform else Platform.host())
        self.timeout = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.tags_page_size = tags_page_size
        credentials = credentials if credentials is not None else DockerCredentials()
        self.insecure_registries = frozenset(h.lower() for h in insecure_registries)
        self.mirrors: Dict[str, str] = {}
        in_urls: Dict[str, Credential] = {}
        for host, url in (mirrors or {}).items():
            host = parse_reference(f"{host}/x").registry  # normalises index.docker.io etc.
            url, cred = split_userinfo(url.rstrip("/"))
            scheme, netloc = _origin(url)
            if cred is not None:
                in_urls[netloc] = cred
            if scheme not in ("http", "https") or not netloc:
                raise ConfigError(f"mirror for {host}: {url!r} is not an http(s) URL")
            if scheme == "http" and not self._plain_http_allowed(netloc):
                raise ConfigError(
                    f"mirror for {host}: plain http to {netloc} is refused "
                    "(use https, or list it in insecure_registries)"
                )
            self.mirrors[host] = url
        self.credentials = UrlCredentials(in_urls, credentials) if in_urls else credentials
        self.stats = RequestStats()
        self._sleep = time.sleep
        self._session = requests.Session()
        self._session.headers["User-Agent"] = user_agent
        # A no-op auth callable: keeps requests from adding ~/.netrc credentials (it would do so
        # for any host, CDNs included); proxies from the environment still apply.
        self._session.auth = lambda request: request
        adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._lock = threading.Lock()
        self._challenges: Dict[str, Optional[Challenge]] = {}
        self._tokens: Dict[tuple, _Token] = {}
        self._key_locks: Dict[object, threading.Lock] = {}

    def __repr__(self) -> str:
        return (f"RegistryClient(platform={str(self.platform)!r}, mirrors={self.mirrors!r}, "
                f"retries={self.retries})")

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------

    def ping(self, registry: Union[str, ImageReference]) -> Optional[str]:
        """``GET /v2/``; returns the auth scheme the registry asks for ("bearer", "basic") or None."""
        ref = registry if isinstance(registry, ImageReference) else parse_reference(f"{registry}/x")
        challenge = self._challenge(self._endpoint(ref), ref)
        return challenge.scheme if challenge else None

    def api_url(self, registry: Union[str, ImageReference]) -> str:
        """The ``/v2/`` URL requests for ``registry`` go to (its mirror, if any), safe to print."""
        ref = registry if isinstance(registry, ImageReference) else parse_reference(f"{registry}/x")
        return _strip_query(self._endpoint(ref).base + "/v2/")

    def list_tags(self, ref: Union[str, ImageReference]) -> List[str]:
        """All tags of the repository, sorted (registries do not promise an order)."""
        ref = replace(_as_ref(ref), tag=None, digest=None)  # errors name the repository only
        ep = self._endpoint(ref)
        url = f"{ep.base}/v2/{ref.repository}/tags/list?n={self.tags_page_size}"
        tags: set = set()
        seen_urls: set = set()
        stale = 0
        for _ in range(MAX_TAG_PAGES):
            seen_urls.add(url)
            resp, body = self._call("tags", ep, ref, "GET", url, what="list tags",
                                    consume=lambda r: _read_limited(r, MAX_MANIFEST_BYTES * 4,
                                                                    decode=True, what="tag list"))
            page = load_object(body, f"{ep.registry}: tag list of {ref.name}", RegistryError).get("tags") or []
            if not isinstance(page, list):
                raise RegistryError(f"{ep.registry}: tag list of {ref.name} has no list of tags")
            # Only what could be pulled: no control characters or spaces reach a terminal.
            page = [t for t in page if isinstance(t, str) and _TAG_RE.fullmatch(t)]
            before = len(tags)
            tags.update(page)
            stale = 0 if len(tags) > before else stale + 1
            nxt = resp.links.get("next", {}).get("url")
            if nxt:
                url = urljoin(url, nxt)
            elif page and len(page) >= self.tags_page_size and len(tags) > before:
                # No Link header but a full page: ask for what follows the last tag.
                url = (f"{ep.base}/v2/{ref.repository}/tags/list?"
                       + urlencode({"n": self.tags_page_size, "last": max(page)}))
            else:
                break
            if url in seen_urls:
                break
            if _origin(url) != _origin(ep.base):
                raise RegistryError(f"{ep.registry}: tag list of {ref.name} links to another "
                                    f"host ({_strip_query(url)})")
            if len(tags) > MAX_TAGS or stale >= MAX_STALE_TAG_PAGES:
                raise self._endless_tags(ep, ref, len(tags))
        else:
            raise self._endless_tags(ep, ref, len(tags))
        return sorted(tags)

    @staticmethod
    def _endless_tags(ep: _Endpoint, ref: ImageReference, count: int) -> RegistryError:
        return RegistryError(
            f"{ep.registry}: tag list of {ref.name} does not end (stopped after {count} tags; at "
            f"most {MAX_TAGS} tags in {MAX_TAG_PAGES} pages, and a next page must bring new tags)")

    def head_digest(self, ref: Union[str, ImageReference]) -> str:
        """The digest the reference names (an index digest for multi-platform tags).

        Uses HEAD (Docker Hub does not count it against the pull rate limit); falls back to GET
        and hashing when the registry sends no ``Docker-Content-Digest``.
        """
        ref = _as_ref(ref)
        ep = self._endpoint(ref)
        resp, _ = self._call("manifest_head", ep, ref, "HEAD", self._manifest_url(ep, ref),
                             what="resolve", headers={"Accept": MANIFEST_ACCEPT})
        digest = resp.headers.get("Docker-Content-Digest", "").strip()
        if digest and is_digest(digest):
            if ref.digest and digest != ref.digest:
                raise DigestMismatchError(
                    f"{ref}: registry {ep.registry} reports digest {digest} for it")
            return digest
        return self.get_manifest(ref).digest

    def get_manifest(self, ref: Union[str, ImageReference]) -> Manifest:
        """The manifest or index the reference names, verified against its digest."""
        ref = _as_ref(ref)
        ep = self._endpoint(ref)
        resp, body = self._call(
            "manifest_get", ep, ref, "GET", self._manifest_url(ep, ref), what="get manifest",
            headers={"Accept": MANIFEST_ACCEPT},
            consume=lambda r: _read_limited(r, MAX_MANIFEST_BYTES, decode=True, what="manifest"),
        )
        header = resp.headers.get("Docker-Content-Digest", "").strip()
        expected = ref.digest or (header if is_digest(header) else None)
        hasher = _new_hasher(expected or "sha256:")
        hasher.update(body)
        digest = _digest_of(hasher)
        if expected and digest != expected:
            raise DigestMismatchError(
                f"{ref}: manifest from {ep.registry} has digest {digest}, expected {expected}")
        return Manifest(ref, _media_type(resp, body), digest, body)

    def resolve_image(self, ref: Union[str, ImageReference],
                      platform: Union[str, Platform, None] = None) -> ResolvedImage:
        """Resolve to the top-level digest and the image manifest for ``platform``."""
        ref = _as_ref(ref)
        want = (platform if isinstance(platform, Platform)
                else Platform.parse(platform) if platform else self.platform)
        top = self.get_manifest(ref)
        manifest, index, chosen = top, None, None
        if top.is_index:
            index = top
            child = self.choose_platform(top, want)
            manifest = self.get_manifest(ref.with_digest(child.digest))
            chosen = child.platform
            if manifest.is_index:
                raise RegistryError(f"{ref}: nested index {child.digest} is not supported")
        if manifest.media_type not in MANIFEST_MEDIA_TYPES:
            raise RegistryError(
                f"{ref}: unsupported manifest media type {manifest.media_type or 'unknown'!r}"
                " (needs a Docker v2 or OCI image manifest)")
        where = f"{ref} ({manifest.digest})"
        config = Descriptor.from_json(manifest.json.get("config"), where)
        layers = tuple(manifest.descriptors("layers"))
        return ResolvedImage(ref, top.digest, manifest, config, layers, index, chosen)

    @staticmethod
    def choose_platform(index: Manifest, want: Platform) -> Descriptor:
        """The index entry for ``want``; attestation (``unknown/unknown``) entries are skipped."""
        entries = [d for d in index.descriptors("manifests") if not d.is_attestation]
        matching = [d for d in entries if d.platform is not None and want.matches(d.platform)]
        if not matching:
            available = sorted({str(d.platform) for d in entries if d.platform}) or ["none"]
            raise RegistryError(
                f"{index.reference}: no image for platform {want} "
                f"(available: {', '.join(available)})")
        # Prefer an exact variant match over a default-variant one.
        matching.sort(key=lambda d: d.platform.variant != want.variant)
        return matching[0]

    def get_config(self, image: ResolvedImage) -> dict:
        """The image configuration JSON of a resolved image (verified)."""
        data = self.get_blob_bytes(image.reference, image.config.digest)
        what = f"{image.reference}: image config {image.config.digest}"
        return check_image_config(load_json(data, what, RegistryError), what, RegistryError)

    def get_blob_bytes(self, ref: Union[str, ImageReference], digest: str,
                       *, max_size: int = MAX_SMALL_BLOB_BYTES) -> bytes:
        """A small blob (an image config) in memory, verified against ``digest``."""
        ref = _as_ref(ref)
        _check_digest(digest, ref)
        ep = self._endpoint(ref)

        def consume(resp):
            data = _read_limited(resp, max_size, decode=False, what=f"blob {digest}")
            hasher = _new_hasher(digest)
            hasher.update(data)
            got = _digest_of(hasher)
            if got != digest:
                raise DigestMismatchError(
                    f"{ref}: blob {digest} from {ep.registry} has digest {got}")
            return data

        _, data = self._call("blob", ep, ref, "GET", self._blob_url(ep, ref, digest),
                             what=f"get blob {digest}", consume=consume,
                             headers={"Accept-Encoding": "identity"})
        return data

    def fetch_blob(self, ref: Union[str, ImageReference], digest: str, dest: Path, *,
                   size: Optional[int] = None,
                   progress: Optional[Callable[[int, Optional[int]], None]] = None) -> int:
        """Stream a blob into ``dest``, verified, resuming what an earlier attempt received.

        Bytes go to ``partial_path(dest)`` first, unbuffered, so a dropped connection, Ctrl-C or
        ``kill -9`` keeps what arrived; the retry (or the next call) asks only for the rest with a
        ``Range`` request, which registries and their blob CDNs serve. Multi-GB layers of NGC
        images are then not fetched again from zero. A registry that ignores the range (200)
        sends everything again; a resumed blob that fails verification is fetched once more from
        the start. Callers keep one process per ``dest`` (the puller's per-blob lock).

        ``progress(done_bytes, total_bytes_or_None)`` is called as data arrives; ``done`` starts
        from the bytes already held. Returns the size of the blob.
        """
        ref = _as_ref(ref)
        _check_digest(digest, ref)
        dest = Path(dest)
        partial = partial_path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        resumed = partial.is_file() and partial.stat().st_size > 0
        try:
            written = self._fetch_partial(ref, digest, partial, size, progress)
        except DigestMismatchError:
            partial.unlink(missing_ok=True)
            if not resumed:
                raise
            log.info("%s: resumed blob %s did not verify; fetching it again from the start", ref, digest)
            try:
                written = self._fetch_partial(ref, digest, partial, size, progress)
            except DigestMismatchError:
                partial.unlink(missing_ok=True)
                raise
        os.chmod(partial, 0o644)
        os.replace(partial, dest)
        return written

    def _fetch_partial(self, ref: ImageReference, digest: str, partial: Path, size: Optional[int],
                       progress) -> int:
        ep = self._endpoint(ref)
        if partial.is_file() and partial.stat().st_size:
            # Continue in a copy (a new inode): a process that had this download before us and
            # wakes up again writes to the old one, never into ours or the finished blob.
            copy = partial.with_name(f"{partial.name}.{os.getpid()}-{threading.get_ident()}")
            shutil.copyfile(partial, copy)
            os.replace(copy, partial)
        with open(partial, "ab+", buffering=0) as out:
            state = _Partial.load(out, digest, size)

            def headers() -> dict:
                extra = {"Range": f"bytes={state.have}-"} if state.have else {}
                return {"Accept-Encoding": "identity", **extra}

            def consume(resp):
                if resp.status_code != 206:
                    state.restart(out)
                elif _range_start(resp) != state.have:
                    state.restart(out)
                    raise RegistryError(f"{ep.registry}: blob {digest} of {ref}: answered a range "
                                        f"request with {resp.headers.get('Content-Range')!r}")
                total = size
                if total is None and resp.headers.get("Content-Length", "").isdigit():
                    total = state.have + int(resp.headers["Content-Length"])
                if progress:
                    progress(state.have, total)
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    if size is not None and state.have + len(chunk) > size:
                        raise DigestMismatchError(f"{ref}: blob {digest} from {ep.registry} is larger "
                                                  f"than the {size} bytes its manifest says; discarded")
                    out.write(chunk)
                    state.add(chunk)
                    if progress:
                        progress(state.have, total)
                return state.verify(f"{ref}: blob {digest} from {ep.registry}")

            if size is not None and state.have == size:  # all there: a kill came before the rename
                return state.verify(f"{ref}: blob {digest} (partial download)")
            _, written = self._call("blob", ep, ref, "GET", self._blob_url(ep, ref, digest),
                                    what=f"get blob {digest}", consume=consume, headers=headers,
                                    ok=(200, 206))
        return written

    # -- endpoints and URLs ----------------------------------------------------------------

    def _plain_http_allowed(self, netloc: str) -> bool:
        return plain_http_allowed(netloc, self.insecure_registries)

    def _endpoint(self, ref: ImageReference) -> _Endpoint:
        mirror = self.mirrors.get(ref.registry)
        if mirror:
            return _Endpoint(ref.registry, mirror, urlsplit(mirror).netloc.lower())
        scheme = "http" if self._plain_http_allowed(ref.api_host) else "https"
        return _Endpoint(ref.registry, f"{scheme}://{ref.api_host}", ref.registry)

    @staticmethod
    def _manifest_url(ep: _Endpoint, ref: ImageReference) -> str:
        return f"{ep.base}/v2/{ref.repository}/manifests/{ref.identifier}"

    @staticmethod
    def _blob_url(ep: _Endpoint, ref: ImageReference, digest: str) -> str:
        return f"{ep.base}/v2/{ref.repository}/blobs/{digest}"

    # -- requests, retries, redirects -------------------------------------------------------

    def _call(self, kind, ep: _Endpoint, ref: Optional[ImageReference], method: str, url: str, *,
              what: str, headers=None, consume=None, auth: bool = True,
              ok: Sequence[int] = (200,)):
        """One logical request with auth, redirects and retries; returns (response, consumed).

        ``headers`` is a dict, or a function giving one per attempt (a resumed download's Range).

        ``consume(response)`` reads the body inside the retry loop, so a connection dropped
        mid-body is retried too. Any other status than ``ok`` becomes a RegistryError.
        """
        image = str(ref) if ref is not None else ep.registry
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            sent = headers() if callable(headers) else headers
            try:
                if auth:
                    resp = self._send_authed(kind, ep, ref, method, url, sent)
                else:
                    resp = self._send(kind, method, url, sent, None, None)
                try:
                    if resp.status_code in ok:
                        result = consume(resp) if consume else None
                        _finish(resp)
                        return resp, result
                    delay = self._retry_delay(resp, attempt) if not last else None
                    if delay is None:
                        error = self._status_error(ep, image, what, resp)
                        _finish(resp)
                        raise error
                    _finish(resp)
                except BaseException:
                    resp.close()  # after a failure mid-body: no further reads
                    raise
                log.debug("%s %s: HTTP %s, retrying in %.2fs", method, _strip_query(url),
                          resp.status_code, delay)
            except _TRANSIENT_ERRORS as exc:
                reason = self._describe_exception(exc)
                if last:
                    raise RegistryError(scrub(
                        f"{ep.registry}: {what} for {image} failed after "
                        f"{self.retries + 1} attempt(s): {reason}")) from None
                delay = self._backoff_delay(attempt)
                log.debug("%s %s: %s, retrying in %.2fs", method, _strip_query(url), reason, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _backoff_delay(self, attempt: int) -> float:
        delay = min(self.max_backoff, self.backoff * (2 ** attempt))
        return delay * random.uniform(0.75, 1.0)

    def _retry_delay(self, resp: requests.Response, attempt: int) -> Optional[float]:
        """Seconds to wait before retrying a transient status, or None to give up now."""
        if resp.status_code not in _TRANSIENT_STATUS:
            return None
        after = _retry_after(resp) if resp.status_code in (429, 503) else None
        if after is not None:
            return after if after <= self.max_retry_after else None
        return self._backoff_delay(attempt)

    @staticmethod
    def _describe_exception(exc: Exception) -> str:
        if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
            return "timed out"
        if isinstance(exc, requests.exceptions.SSLError):
            return "TLS error"
        if isinstance(exc, requests.ConnectionError):
            text = str(exc)
            if "refused" in text.lower():
                return "connection refused"
            if "name or service not known" in text.lower() or "resolution" in text.lower():
                return "host name not found"
            return "connection failed"
        return "connection broken"

    def _send(self, kind, method, url, headers, auth_header, auth_origin):
        """Send one request, following redirects; Authorization only goes to ``auth_origin``."""
        for _ in range(MAX_REDIRECTS + 1):
            send_headers = dict(headers or {})
            if auth_header and _origin(url) == auth_origin:
                send_headers["Authorization"] = auth_header
            self.stats.add(kind)
            resp = self._session.request(method, url, headers=send_headers, timeout=self.timeout,
                                         allow_redirects=False, stream=True)
            location = resp.headers.get("Location")
            if resp.status_code not in (301, 302, 303, 307, 308) or not location:
                log.debug("%s %s -> %s", method, _strip_query(url), resp.status_code)
                return resp
            _finish(resp)
            target = urljoin(url, location)
            log.debug("%s %s -> %s, redirected to %s", method, _strip_query(url),
                      resp.status_code, _strip_query(target))
            scheme, netloc = _origin(target)
            if scheme not in ("http", "https") or (
                    scheme == "http" and _origin(url)[0] == "https"
                    and not self._plain_http_allowed(netloc)):
                raise RegistryError(
                    f"{_origin(url)[1]}: refused redirect to {_strip_query(target)}")
            url = target
            if resp.status_code == 303 and method != "HEAD":
                method = "GET"
        raise RegistryError(f"{_origin(url)[1]}: more than {MAX_REDIRECTS} redirects")

    # -- authentication ---------------------------------------------------------------------

    def _credential(self, ep: _Endpoint) -> Optional[Credential]:
        return self.credentials.get(ep.cred_host) if self.credentials else None

    def _key_lock(self, key) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _challenge(self, ep: _Endpoint, ref: Optional[ImageReference]) -> Optional[Challenge]:
        """The registry's auth challenge from ``GET /v2/`` (once per endpoint)."""
        with self._key_lock(("ping", ep.base)):
            with self._lock:
                if ep.base in self._challenges:
                    return self._challenges[ep.base]
            # ``ref`` only names the image in an error: the answer is kept per endpoint
            resp, _ = self._call("ping", ep, ref, "GET", f"{ep.base}/v2/", what="contacting the registry",
                                 auth=False, ok=(200, 401, 403, 404))
            challenge = (_pick_challenge(resp.headers.get("WWW-Authenticate", ""))
                         if resp.status_code == 401 else None)
            with self._lock:
                self._challenges[ep.base] = challenge
            return challenge

    @staticmethod
    def _scope(ref: Optional[ImageReference]) -> str:
        return f"repository:{ref.repository}:pull" if ref is not None else ""

    def _auth_header(self, ep, ref, challenge, stale: Optional[str]) -> Optional[str]:
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            cred = self._credential(ep)
            if cred is None or not ep.secure:
                return None
            raw = f"{cred.username}:{cred.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if challenge.scheme == "bearer":
            token = self._token(ep, ref, challenge, stale)
            return f"Bearer {token}"
        return None

    def _send_authed(self, kind, ep: _Endpoint, ref, method, url, headers):
        challenge = self._challenge(ep, ref)
        header = self._auth_header(ep, ref, challenge, None)
        resp = self._send(kind, method, url, headers, header, _origin(ep.base))
        if resp.status_code != 401:
            return resp
        fresh = _pick_challenge(resp.headers.get("WWW-Authenticate", ""))
        if fresh is None or (fresh.scheme == "basic" and header and header.startswith("Basic ")):
            return resp  # nothing else to try: the caller reports the 401
        with self._lock:
            self._challenges[ep.base] = fresh
        stale = header[len("Bearer "):] if header and header.startswith("Bearer ") else None
        retry_header = self._auth_header(ep, ref, fresh, stale)
        if retry_header is None or retry_header == header:
            return resp
        _finish(resp)
        return self._send(kind, method, url, headers, retry_header, _origin(ep.base))

    def _token(self, ep: _Endpoint, ref, challenge: Challenge, stale: Optional[str]) -> str:
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service")
        scope = self._scope(ref)
        key = (realm, service, scope)
        with self._key_lock(("token",) + key):
            with self._lock:
                cached = self._tokens.get(key)
            if cached and cached.expires > time.monotonic() and cached.value != stale:
                return cached.value
            token = self._fetch_token(ep, ref, realm, service, scope, challenge)
            with self._lock:
                self._tokens[key] = token
            return token.value

    def _fetch_token(self, ep, ref, realm, service, scope, challenge) -> _Token:
        scheme, netloc = _origin(realm)
        if scheme not in ("http", "https") or not netloc:
            raise RegistryError(f"{ep.registry}: invalid token realm {_strip_query(realm)!r}")
        if scheme == "http" and not self._plain_http_allowed(netloc):
            raise RegistryError(f"{ep.registry}: refused plain-http token realm {netloc}")
        parts = urlsplit(realm)
        query = parse_qsl(parts.query, keep_blank_values=True)
        names = {k for k, _ in query}
        if service and "service" not in names:
            query.append(("service", service))
        if scope and "scope" not in names:
            query.append(("scope", scope))
        extra = challenge.params.get("scope")
        if extra and extra != scope and ("scope", extra) not in query:
            query.append(("scope", extra))
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        cred = self._credential(ep)
        header = None
        if cred is not None and (scheme == "https" or _is_loopback(netloc)):
            raw = f"{cred.username}:{cred.password}".encode()
            header = "Basic " + base64.b64encode(raw).decode()
        elif cred is not None:
            log.warning("%s: not sending credentials to plain-http token realm %s",
                        ep.registry, netloc)

        resp = None
        for attempt in range(self.retries + 1):
            try:
                resp = self._send("token", "GET", url, None, header, _origin(url))
                try:
                    body = _read_limited(resp, MAX_TOKEN_BYTES, decode=True, what="token")
                except BaseException:
                    resp.close()
                    raise
                _finish(resp)
            except _TRANSIENT_ERRORS as exc:
                if attempt == self.retries:
                    raise RegistryError(
                        f"{ep.registry}: token request to {netloc} failed: "
                        f"{self._describe_exception(exc)}") from None
                self._sleep(self._backoff_delay(attempt))
                continue
            delay = None if attempt == self.retries else self._retry_delay(resp, attempt)
            if delay is None:
                break
            self._sleep(delay)
        image = str(ref) if ref is not None else ep.registry
        if resp.status_code in (401, 403):
            why = ("credentials rejected" if header else "anonymous access refused")
            raise self._auth_error(ep, image, f"token server {netloc}: HTTP "
                                   f"{resp.status_code}, {why}", status=resp.status_code)
        if resp.status_code != 200:
            raise _with_status(RegistryError(
                f"{ep.registry}: token request for {image} to {netloc} failed: HTTP "
                f"{resp.status_code}"), resp.status_code)
        try:
            doc = load_object(body, "token", RegistryError)
            value = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (RegistryError, ValueError, TypeError, OverflowError):
            value = None
        if not isinstance(value, str) or not value or any(c in value for c in "\r\n "):
            raise RegistryError(f"{ep.registry}: token server {netloc} sent no usable token")
        register_secret(value)
        margin = min(30.0, expires_in * 0.1)
        return _Token(value, time.monotonic() + max(0.0, expires_in - margin))

    # -- errors -----------------------------------------------------------------------------

    def _auth_error(self, ep: _Endpoint, image: str, detail: str, status: int) -> RegistryError:
        cred = self.credentials.get(ep.cred_host) if self.credentials else None
        if cred is None:
            hint = (f"; no credentials for {ep.cred_host} (set {env_prefix(ep.cred_host)}USER and "
                    f"{env_prefix(ep.cred_host)}PASSWORD, or docker login)")
        elif not ep.secure:
            hint = f"; credentials are not sent over plain http to {ep.cred_host}"
        else:
            hint = f"; credentials from {cred.source}"
        return _with_status(RegistryError(scrub(
            f"{ep.registry}: authentication failed for {image} ({detail}){hint}")), status)

    def _status_error(self, ep: _Endpoint, image: str, what: str,
                      resp: requests.Response) -> RegistryError:
        status = resp.status_code
        detail = _registry_detail(resp) if resp.request.method != "HEAD" else ""
        if status == 401:
            return self._auth_error(ep, image, f"HTTP 401 on {what}"
                                    + (f", {detail}" if detail else ""), status)
        label = {403: "access denied", 404: "not found", 429: "rate limited"}.get(status, "failed")
        text = f"{ep.registry}: {what} for {image} {label}: HTTP {status}"
        if status == 429 and resp.headers.get("Retry-After"):
            text += f" (retry after {resp.headers['Retry-After'].strip()[:40]})"
        if detail:
            text += f" ({detail})"
        return _with_status(RegistryError(scrub(text)), status)


def _with_status(err: RegistryError, status: Optional[int]) -> RegistryError:
    err.status = status
    return err


def _as_ref(ref: Union[str, ImageReference]) -> ImageReference:
    return ref if isinstance(ref, ImageReference) else parse_reference(ref)


def _check_digest(digest: str, ref: ImageReference) -> None:
    if not is_digest(digest):
        raise ReferenceError_(f"{ref}: invalid blob digest {str(digest)[:80]!r}")


def _read_limited(resp: requests.Response, limit: int, *, decode: bool, what: str) -> bytes:
    """The body of a streamed response, refusing more than ``limit`` bytes."""
    chunks, total = [], 0
    for chunk in resp.raw.stream(CHUNK, decode_content=decode):
        total += len(chunk)
        if total > limit:
            raise RegistryError(f"{_strip_query(resp.url)}: {what} larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
