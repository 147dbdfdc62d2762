"""The module systems shpc-lite writes for: Lmod (Lua) and Environment Modules (Tcl).

They differ only in names (modulefile suffix, rc file, templates), in whether a spider cache
exists, and in how an installation is recognised; each is one small frozen object, and nothing
else in the package compares module-system names (``grep '"lmod"'`` finds only this file).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from shpc_lite.errors import ConfigError


@dataclass(frozen=True)
class ModuleSystem:
    name: str  # the config value (module_system)
    label: str  # how users call it
    suffix: str  # a modulefile is <version><suffix>
    rc_file: str  # per-module defaults and tags
    module_template: str
    rc_template: str
    spider_cache: bool  # whether a cache of the tree can be kept (Lmod's spider cache)
    other: str  # the config value to suggest when this one is missing

    def modulefile_name(self, version: str) -> str:
        return version + self.suffix

    def version_of(self, filename: str) -> Optional[str]:
        """The version a modulefile name stands for, or None when it is not one of ours."""
        if self.suffix:
            return filename[: -len(self.suffix)] if filename.endswith(self.suffix) else None
        return None if filename.startswith(".") else filename

    def installation(self, environ: Mapping[str, str] = os.environ) -> Optional[str]:
        """Where this system is installed on this host, as a user would see it; None if absent."""
        if self is LMOD:
            if environ.get("LMOD_CMD") or Path("/usr/share/lmod/lmod/init/bash").exists():
                return f"Lmod {environ.get('LMOD_VERSION', '')}".strip()
            return None
        if environ.get("MODULESHOME") or shutil.which("modulecmd.tcl"):
            return f"Environment Modules at {environ.get('MODULESHOME', '?')}"
        return None

    @property
    def missing_hint(self) -> str:
        package = "Lmod" if self is LMOD else "environment-modules"
        return f"install {package}, or set module_system: {self.other}"


LMOD = ModuleSystem("lmod", "Lmod", ".lua", ".modulerc.lua", "module.lua.j2", "modulerc.lua.j2",
                    spider_cache=True, other="tcl")
TCL = ModuleSystem("tcl", "Environment Modules", "", ".modulerc", "module.tcl.j2", "modulerc.tcl.j2",
                   spider_cache=False, other="lmod")
MODULE_SYSTEMS: dict[str, ModuleSystem] = {system.name: system for system in (LMOD, TCL)}
DEFAULT = LMOD


def module_system(name: str) -> ModuleSystem:
    try:
        return MODULE_SYSTEMS[name]
    except KeyError:
        raise ConfigError(f"module_system {name!r}: expected one of {', '.join(MODULE_SYSTEMS)}") from None
