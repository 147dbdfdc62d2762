"""One error hierarchy: library code raises these, only the CLI prints them (one line, exit code).

Messages must name the file, image or field at fault and must never contain credentials.
"""


class ShpcLiteError(Exception):
    """Base of every error a user can cause or fix; the CLI prints ``str(err)`` and exits 1."""

    exit_code = 1


class ConfigError(ShpcLiteError):
    """A configuration file or value is invalid."""


class RecipeError(ShpcLiteError):
    """A recipe is missing, malformed or unsafe."""


class NotFoundError(ShpcLiteError):
    """A recipe, version or installed module does not exist."""


class SifError(ShpcLiteError):
    """A file is not a valid SIF image, or a SIF could not be written."""


class ReferenceError_(ShpcLiteError):
    """An image reference cannot be parsed."""


class RegistryError(ShpcLiteError):
    """A container registry refused or failed a request (after retries)."""


class DigestMismatchError(RegistryError):
    """Downloaded content does not match the digest the registry promised."""


class LayerError(ShpcLiteError):
    """An image layer is unsafe or unreadable and was refused."""


class PullError(ShpcLiteError):
    """Building a SIF from an image failed."""


class StoreError(ShpcLiteError):
    """The image store could not be read or written."""


class ResolveError(ShpcLiteError):
    """Versions could not be chosen or the lock file is invalid."""


class EnvError(ShpcLiteError):
    """A Jupyter kernel or a personal venv could not be made, listed or removed."""


class SiteError(ShpcLiteError):
    """A site manifest, batch run, view or Slurm submission failed."""
