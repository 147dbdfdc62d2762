"""Where an image's manifest, config and layer blobs come from, for the puller.

The puller (``shpc_lite.puller.store_image``) owns everything that must be the same for every
image: the per-digest lock, the scratch dir, building the squashfs, writing the SIF, verifying and
publishing it under ``Layout.image(digest)``. A source only answers two questions:

* ``open()``: which image is it (store digest, image config, layers, architecture, and how the SIF
  records its origin)? Small documents only, verified against their digests.
* ``fetch_layers(...)``: put every layer blob, verified, into the blob cache (or, with config
  ``keep_blobs`` false, the scratch dir) and name the files, lowest first; it may yield each as
  it arrives, so the merge reads early layers while later ones download.

Two kinds exist: a registry (``shpc_lite.puller.RegistrySource``) and an image a site already has
on disk, an OCI layout, OCI archive or docker archive (``shpc_lite.oci.layout_source``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Protocol, Tuple

if TYPE_CHECKING:
    from shpc_lite.config import Config
    from shpc_lite.progress import Progress

    from .layers import LayerBlob


@dataclass(frozen=True)
class LayerRef:
    """One layer as a source lists it, before it is fetched.

    ``digest`` is the blob digest ("" when the source does not say: a legacy docker archive's
    ``<id>/layer.tar``, whose digest is computed while it is copied); ``member`` is where the blob
    lies in a layout or archive ("" for a registry); ``diff_id`` is the digest of the uncompressed
    tar the image config promises ("" when not checked)."""

    digest: str
    size: int
    media_type: str = ""
    member: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class SourceImage:
    """One platform's image, as the build needs it."""

    label: str  # names the image in messages and in the SIF's labels (base.name)
    digest: str  # the store key: Layout.image(digest)
    deffile: str  # the SIF's definition record of where the image came from
    config: Mapping  # the image config JSON
    layers: Tuple[LayerRef, ...]
    arch: str

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


class ImageSource(Protocol):
    """A registry image or a local layout/archive; see the module documentation."""

    @property
    def label(self) -> str: ...

    @property
    def digest(self) -> str: ...

    def open(self) -> SourceImage: ...

    def fetch_layers(self, image: SourceImage, config: "Config", progress: "Progress",
                     scratch: Optional[Path]) -> Iterable["LayerBlob"]: ...
