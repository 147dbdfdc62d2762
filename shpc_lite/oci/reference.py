"""Image references (``python:3.11``, ``nvcr.io/nvidia/pytorch:24.01-py3``, ``host:5000/a/b@sha256:...``).

Parsed and normalised the way Docker does (the grammar of distribution/reference): a first path
component is a registry host only if it contains ``.`` or ``:``, is ``localhost``, or has upper-case
letters; otherwise the image is on Docker Hub (``docker.io``), where one-component names live under
``library/``. ``index.docker.io`` is an alias of ``docker.io``. Without tag or digest the tag is
``latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

from ..errors import ReferenceError_

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
_HUB_ALIASES = {"index.docker.io", "docker.io"}

# distribution/reference grammar, as Python regular expressions.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?"
)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ALGORITHM_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*")
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
# Hex lengths of the algorithms the OCI image spec registers.
_DIGEST_HEX = {"sha256": 64, "sha512": 128}
_MAX_NAME = 255


def _fail(text: str, why: str) -> ReferenceError_:
    return ReferenceError_(f"invalid image reference {text!r}: {why}")


def _digest_problem(digest: str) -> Optional[str]:
    algorithm, sep, hexpart = digest.partition(":") if isinstance(digest, str) else ("", "", "")
    if not sep or not _ALGORITHM_RE.fullmatch(algorithm):
        return "expected ALGORITHM:HEX"
    length = _DIGEST_HEX.get(algorithm)
    if length is None:
        return f"unsupported digest algorithm {algorithm!r}"
    if len(hexpart) != length or not re.fullmatch(r"[0-9a-f]+", hexpart):
        return f"{algorithm} needs {length} lower-case hex digits"
    return None


def validate_digest(digest: str, *, what: str = "digest") -> str:
    """Return ``digest`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>``, else raise.

    Digests come from registries too and end up in file names, so they are checked strictly
    (lower-case hex of the exact length), as go-digest does.
    """
    problem = _digest_problem(digest)
    if problem:
        raise ReferenceError_(f"invalid {what} {digest!r}: {problem}")
    return digest


def is_digest(text: str) -> bool:
    return _digest_problem(text) is None


@dataclass(frozen=True)
class ImageReference:
    """A normalised image reference; ``str()`` gives the canonical form."""

    registry: str
    repository: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host serving the registry API (Docker Hub's is not ``docker.io``)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def identifier(self) -> str:
        """What goes into ``/v2/<name>/manifests/<identifier>``: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def familiar(self) -> str:
        """The short form Docker prints (``python:3.11``, ``pytorch/pytorch:2.2.1-...``)."""
        name = self.repository
        if self.registry == DOCKER_HUB:
            if name.startswith("library/") and name.count("/") == 1:
                name = name[len("library/"):]
        else:
            name = f"{self.registry}/{name}"
        return name + self._suffix()

    def with_tag(self, tag: str) -> "ImageReference":
        """The same repository at ``tag`` (any digest is dropped: it pinned other content)."""
        if not _TAG_RE.fullmatch(tag or ""):
            raise _fail(f"{self.name}:{tag}", "invalid tag")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> "ImageReference":
        """The same image pinned to ``digest`` (the tag is kept for readability)."""
        validate_digest(digest)
        return replace(self, digest=digest)

    def _suffix(self) -> str:
        text = f":{self.tag}" if self.tag else ""
        return text + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.name + self._suffix()


def _split_domain(name: str):
    first, slash, rest = name.partition("/")
    if slash and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    ):
        return first, rest
    return DOCKER_HUB, name


def parse_reference(text: str) -> ImageReference:
    """Parse ``text`` into a normalised :class:`ImageReference`; ``docker://`` is accepted."""
    if not isinstance(text, str):
        raise ReferenceError_(f"invalid image reference {text!r}: not a string")
    original = text
    text = text.strip()
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    if not text:
        raise _fail(original, "empty")
    if any(ch.isspace() for ch in text):
        raise _fail(original, "contains white space")
    if _IDENTIFIER_RE.fullmatch(text):
        raise _fail(original, "a 64-character hex string is an image ID, not a name")

    name, at, digest = text.partition("@")
    if at:
        problem = _digest_problem(digest)
        if problem:
            raise _fail(original, f"invalid digest: {problem}")
    else:
        digest = None

    tag = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise _fail(original, f"invalid tag {tag!r}")

    if not name:
        raise _fail(original, "missing repository name")
    registry, repository = _split_domain(name)
    if not _HOST_RE.fullmatch(registry):
        raise _fail(original, f"invalid registry host {registry!r}")
    if repository.lower() != repository:
        raise _fail(original, "repository name must be lowercase")
    if not _PATH_RE.fullmatch(repository):
        raise _fail(original, f"invalid repository name {repository!r}")
    registry = registry.lower()
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if len(f"{registry}/{repository}") > _MAX_NAME:
        raise _fail(original, f"name longer than {_MAX_NAME} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(registry, repository, tag, digest)
