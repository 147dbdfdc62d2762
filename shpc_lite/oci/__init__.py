"""Container registries: image references, credentials and the OCI distribution API client."""

from .client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    Platform,
    RegistryClient,
    ResolvedImage,
)
from .credentials import Credential, DockerCredentials, StaticCredentials
from .reference import ImageReference, parse_reference

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Credential",
    "Descriptor",
    "DockerCredentials",
    "ImageReference",
    "Manifest",
    "Platform",
    "RegistryClient",
    "ResolvedImage",
    "StaticCredentials",
    "parse_reference",
]
