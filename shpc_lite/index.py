"""Indexes over a module tree: default versions, and Lmod's spider cache when asked for.

A spider cache makes ``module avail``/``spider`` read one file instead of walking the tree; it is
only correct while it is fresh, so every change that touches the tree calls ``refresh``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

from shpc_lite.config import Config
from shpc_lite.errors import SiteError
from shpc_lite.fsutil import atomic_write

LMOD_LIBEXEC_DIRS = ("/usr/share/lmod/lmod/libexec", "/opt/apps/lmod/lmod/libexec", "/usr/local/lmod/lmod/libexec")


def _update_tool() -> Optional[Path]:
    dirs = [os.environ["LMOD_DIR"]] if os.environ.get("LMOD_DIR") else []
    for directory in [*dirs, *LMOD_LIBEXEC_DIRS]:
        tool = Path(directory) / "update_lmod_system_cache_files"
        if tool.exists():
            return tool
    return None


def refresh(config: Config) -> Optional[str]:
    """Rebuild the spider cache if config ``spider_cache`` is on (Lmod only).

    Returns the line an admin puts into the site's shell start-up, or None when no cache is kept.
    """
    layout = config.layout
    if not layout.system.spider_cache or not config["spider_cache"]:
        return None
    from shpc_lite.modules import render

    tool = _update_tool()
    if tool is None:
        raise SiteError("spider_cache is on but Lmod's update_lmod_system_cache_files was not found (set LMOD_DIR)")
    cache = layout.make_dir(layout.spider_cache)
    timestamp = cache / "timestamp"
    layout.make_dir(layout.modules)
    proc = subprocess.run(
        ["bash", str(tool), "-d", str(cache), "-t", str(timestamp), str(layout.modules)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "LMOD_DIR": str(tool.parent)},
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SiteError(f"updating the Lmod spider cache in {cache} failed: {last}")
    rc = layout.lmodrc
    atomic_write(rc, render("lmodrc.lua.j2", modules=str(layout.modules), cache_dir=str(cache),
                            timestamp=str(timestamp), rc=str(rc)))
    return f"export LMOD_RC={rc}"
