"""Container registries: image references, credentials and the OCI distribution API client.

The names below are loaded on first use (PEP 562): importing ``shpc_lite.oci.reference`` to
check a digest must not import the HTTP client and ``requests`` (most of a command's start-up).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DOCKER_MANIFEST": "client",
    "DOCKER_MANIFEST_LIST": "client",
    "OCI_INDEX": "client",
    "OCI_MANIFEST": "client",
    "Descriptor": "client",
    "Manifest": "client",
    "Platform": "client",
    "RegistryClient": "client",
    "ResolvedImage": "client",
    "Credential": "credentials",
    "DockerCredentials": "credentials",
    "StaticCredentials": "credentials",
    "ImageReference": "reference",
    "parse_reference": "reference",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
