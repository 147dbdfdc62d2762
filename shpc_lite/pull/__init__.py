"""Turn downloaded layer blobs and an image config into the squashfs Apptainer expects.

Public API::

    build_squashfs(layers, image_config, dest, *, source_ref, source_digest, compression="zstd",
                   level=None, processors=None, workdir, method="auto", preserve_owners=True, offset=0) -> str
    writes_in_place(compression) -> bool
    LayerBlob(path, media_type, digest)
    apptainer_files(image_config, *, source_ref, source_digest) -> {path: ExtraEntry}
"""

from .apptainer_files import ExtraEntry, apptainer_files
from .layers import LayerBlob, RootfsTree, build_tree
from .squashfs import DEFAULT_METHOD, build_squashfs, compression_args, mksquashfs_features, writes_in_place

__all__ = [
    "DEFAULT_METHOD",
    "ExtraEntry",
    "LayerBlob",
    "RootfsTree",
    "apptainer_files",
    "build_squashfs",
    "build_tree",
    "compression_args",
    "mksquashfs_features",
    "writes_in_place",
]
