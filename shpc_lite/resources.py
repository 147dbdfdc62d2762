"""Where the built-in recipes and templates live, installed (wheel) or in a source checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    installed = _PKG / name  # mapped into the package by setup.cfg's package_dir
    if installed.is_dir():
        return installed
    return _PKG.parent / name  # a source checkout run without installing


def builtin_registry() -> Path:
    return _data_dir("registry")


def templates_dir() -> Path:
    return _data_dir("modulefiles")
