"""shpc-lite: container images as environment modules, with plain sh wrapper scripts."""

__version__ = "0.1.0"
