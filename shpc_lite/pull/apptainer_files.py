"""The files `apptainer pull docker://...` adds to an image's root filesystem, generated from its config.

Pure functions (config in, path -> entry out) so they are unit-testable without building anything.
All text here is our own, minimal version of what Apptainer expects:

- ``/.singularity.d/{libs,actions,env}`` and the mount points ``dev proc root var/tmp tmp etc sys
  home`` (only where the image has nothing at that path), empty ``etc/hosts`` and
  ``etc/resolv.conf`` (only if absent);
- ``/.singularity.d/env/10-docker2singularity.sh``: the config's ``Env`` (``PATH`` exported
  unconditionally, every other variable only as a default: ``export N="${N:-"value"}"``);
- ``/.singularity.d/env/90-environment.sh``: minimal, for a user's own additions;
- ``/.singularity.d/runscript``: ``#!/bin/sh`` that ``cd``s to ``WorkingDir`` and execs
  ENTRYPOINT + CMD, where arguments given to ``run`` replace CMD (Docker's and Apptainer's rule);
- ``/.singularity.d/labels.json``: the config's labels plus ``org.opencontainers.image.base.name``
  and ``.base.digest`` (the source reference and digest);
- symlinks ``/singularity`` -> ``.singularity.d/runscript`` and ``/environment`` ->
  ``.singularity.d/env/90-environment.sh``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from ..errors import PullError
from ..oci.document import check_inner_config, inner_config

__all__ = ["ExtraEntry", "apptainer_files", "env_script", "inner_config", "labels_json", "runscript"]

ENV_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")

ENV_DOCKER = ".singularity.d/env/10-docker2singularity.sh"
ENV_USER = ".singularity.d/env/90-environment.sh"
RUNSCRIPT = ".singularity.d/runscript"
LABELS = ".singularity.d/labels.json"


@dataclass(frozen=True)
class ExtraEntry:
    """One entry to add to the root filesystem.

    ``kind`` is ``"dir"``, ``"file"`` or ``"symlink"``; ``data`` is the file's content or the
    symlink's target. With ``only_if_absent`` the entry is skipped when the image already has
    anything at that path (following symlinks inside the image, e.g. a ``tmp`` -> ``var/tmp``).
    """

    kind: str
    mode: int
    data: bytes = b""
    only_if_absent: bool = False


def _sh_double_quoted(value: str) -> str:
    """Escape for the inside of a double-quoted sh word: backslash, double quote, backtick, dollar."""
    return re.sub(r'([\\"`$])', r"\\\1", value)


def env_script(env: Optional[List[str]]) -> str:
    """``10-docker2singularity.sh`` for a config ``Env`` list (``NAME=value`` strings).

    Entries whose name is not a valid shell name, or which have no ``=``, are skipped; a name
    given twice keeps its last value (as Docker does).
    """
    values: Dict[str, str] = {}
    for item in env or []:
        if not isinstance(item, str) or "=" not in item:
            continue
        name, value = item.split("=", 1)
        if not ENV_NAME_RE.match(name):
            continue
        values.pop(name, None)
        values[name] = value
    lines = ["#!/bin/sh", "# Environment of the image config (written by shpc-lite)."]
    for name, value in values.items():
        quoted = _sh_double_quoted(value)
        if name == "PATH":
            lines.append(f'export PATH="{quoted}"')
        else:
            lines.append(f'export {name}="${{{name}:-"{quoted}"}}"')
    return "\n".join(lines) + "\n"


def user_env_script() -> str:
    return "#!/bin/sh\n# Add environment settings for this container below.\n"


def _words(value: Any) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):  # a bare string (legacy configs): one word
        return [value]
    return [str(w) for w in value]


def runscript(entrypoint: Any, cmd: Any, workdir: Optional[str] = None) -> str:
    """``#!/bin/sh`` runscript: ENTRYPOINT + (arguments if any, else CMD), each word shell-quoted."""
    ep = " ".join(shlex.quote(w) for w in _words(entrypoint))
    cm = " ".join(shlex.quote(w) for w in _words(cmd))
    lines = ["#!/bin/sh", "# Runs the image's ENTRYPOINT with CMD, or with the arguments given (written by shpc-lite)."]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)} || exit 1")
    with_args = f"exec {ep} \"$@\"" if ep else 'exec "$@"'
    if ep and cm:
        without = f"exec {ep} {cm}"
    elif ep:
        without = f"exec {ep}"
    elif cm:
        without = f"exec {cm}"
    else:
        without = "exec /bin/sh"
    lines += ['if [ "$#" -gt 0 ]; then', f"    {with_args}", "fi", without]
    return "\n".join(lines) + "\n"


def labels_json(labels: Optional[Mapping[str, Any]], source_ref: str, source_digest: str) -> str:
    out: Dict[str, Any] = {str(k): v for k, v in (labels or {}).items()}
    out["org.opencontainers.image.base.name"] = source_ref
    out["org.opencontainers.image.base.digest"] = source_digest
    return json.dumps(out, indent=2, sort_keys=True) + "\n"


def apptainer_files(image_config: Mapping[str, Any], *, source_ref: str, source_digest: str) -> Dict[str, ExtraEntry]:
    """Everything to add to the rootfs, as ``{relative path: ExtraEntry}`` with parents before children.

    The config's fields are checked first (PullError naming ``source_ref``): the puller's client
    checked them already, this keeps the public ``build_squashfs`` safe for any other caller."""
    cfg = check_inner_config(inner_config(image_config), f"{source_ref}: image config", PullError)
    out: Dict[str, ExtraEntry] = {}
    for d in (".singularity.d", ".singularity.d/libs", ".singularity.d/actions", ".singularity.d/env"):
        out[d] = ExtraEntry("dir", 0o755)
    for d in ("dev", "proc", "root", "etc", "sys", "home", "var"):
        out[d] = ExtraEntry("dir", 0o755, only_if_absent=True)
    for d in ("tmp", "var/tmp"):
        out[d] = ExtraEntry("dir", 0o1777, only_if_absent=True)
    for f in ("etc/hosts", "etc/resolv.conf"):
        out[f] = ExtraEntry("file", 0o644, b"", only_if_absent=True)
    out[ENV_DOCKER] = ExtraEntry("file", 0o755, env_script(cfg.get("Env")).encode())
    out[ENV_USER] = ExtraEntry("file", 0o755, user_env_script().encode())
    out[RUNSCRIPT] = ExtraEntry(
        "file", 0o755, runscript(cfg.get("Entrypoint"), cfg.get("Cmd"), cfg.get("WorkingDir")).encode()
    )
    out[LABELS] = ExtraEntry("file", 0o644, labels_json(cfg.get("Labels"), source_ref, source_digest).encode())
    out["singularity"] = ExtraEntry("symlink", 0o777, RUNSCRIPT.encode())
    out["environment"] = ExtraEntry("symlink", 0o777, ENV_USER.encode())
    return out
