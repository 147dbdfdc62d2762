"""The hand-over from resolve (the lock file, or a recipe's pins) to pull.

One module version pinned to one image, with the image reference parsed once, here: every step
after it (pull, install, batch tasks, Slurm array tasks) takes this object, never a tuple of
strings it would have to parse again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from shpc_lite.oci.reference import ImageReference


@dataclass(frozen=True)
class ImageChoice:
    version: str  # the module version
    ref: "ImageReference"  # the image, with the tag this version was chosen from
    digest: Optional[str] = None  # the manifest digest, when the lock (or a pin) knows it

    @property
    def tag(self) -> str:
        return self.ref.tag or ""


def choose(version: str, image: str, tag: str, digest: Optional[str] = None) -> ImageChoice:
    """Parse ``image:tag`` once (ReferenceError_ naming the image when it cannot be)."""
    from shpc_lite.oci.reference import parse_reference, validate_digest

    return ImageChoice(version, parse_reference(f"{image}:{tag}"),
                       validate_digest(digest, what=f"digest of {image}:{tag}") if digest else None)
