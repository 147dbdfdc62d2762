"""What is inside an installed SIF: header, objects, and the image's labels and env.

Labels and env come from the ``oci-config.json`` object the builtin puller stores; for a SIF made
elsewhere (``apptainer pull``, ``--sif``) they are read from ``/.singularity.d`` in the squashfs
with ``unsquashfs -cat``, when squashfs-tools are installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any, Optional

from shpc_lite.errors import SifError
from shpc_lite.oci.document import check_inner_config, load_json
from shpc_lite.sif import DataType, FsType, PartType, SifImage, read_data, read_sif

MAX_JSON_OBJECT = 16 << 20  # an oci-config.json is a few KB; a huge one is not read into memory

_EXPORT = re.compile(r'^export (?P<name>[A-Za-z_][A-Za-z0-9_]*)="(?:\$\{(?P=name):-")?(?P<value>.*?)"?\}?"?$')


def _squashfs_file(image: SifImage, inner: str) -> Optional[bytes]:
    """A file of the SIF's squashfs as bytes (the image decides its encoding), or None."""
    if not shutil.which("unsquashfs"):
        return None
    part = next((d for d in image.descriptors if d.data_type == DataType.PARTITION), None)
    if part is None:
        return None
    proc = subprocess.run(["unsquashfs", "-o", str(part.offset), "-cat", image.path, inner],
                          capture_output=True, timeout=60)
    return proc.stdout[:MAX_JSON_OBJECT] if proc.returncode == 0 else None


def _env_from_script(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        m = _EXPORT.match(line.strip())
        if m:
            env[m.group("name")] = m.group("value").replace('\\"', '"').replace("\\$", "$").replace("\\\\", "\\")
    return env


def _labels_and_env(path: str, data: bytes) -> tuple[dict, dict]:
    """Labels and env of a SIF's ``oci-config.json`` (the image config's ``config`` object)."""
    what = f"{path}: object oci-config.json"
    config = check_inner_config(load_json(data or b"{}", what, SifError), what, SifError)
    env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
    return dict(config.get("Labels") or {}), env


def _squashfs_labels(image: SifImage) -> dict:
    """``/.singularity.d/labels.json`` of a SIF made elsewhere: an object; its values shown as text."""
    what = f"{image.path}: /.singularity.d/labels.json"
    labels = load_json(_squashfs_file(image, ".singularity.d/labels.json") or b"{}", what, SifError)
    if not isinstance(labels, dict):
        raise SifError(f"{what} is not a JSON object")
    return {key: value if isinstance(value, str) else str(value) for key, value in labels.items()}


def _name(enum, value) -> str:
    try:
        return enum(value).name.title().replace("_", "")
    except ValueError:
        return hex(value)


def inspect_sif(path: str) -> dict[str, Any]:
    image = read_sif(path)
    h = image.header
    objects = []
    labels: dict = {}
    env: dict = {}
    for d in image.descriptors:
        obj = {"id": d.id, "type": _name(DataType, d.data_type), "name": d.name, "offset": d.offset,
               "size": d.size, "group": d.group_id}
        if d.data_type == DataType.PARTITION:
            obj.update(fs_type=_name(FsType, d.fs_type), partition_type=_name(PartType, d.partition_type),
                       arch=d.arch)
        objects.append(obj)
        if d.data_type == DataType.GENERIC_JSON and d.name == "oci-config.json":
            labels, env = _labels_and_env(path, read_data(path, d, max_size=MAX_JSON_OBJECT))
    if not labels and not env:
        labels = _squashfs_labels(image)
        script = _squashfs_file(image, ".singularity.d/env/10-docker2singularity.sh") or b""
        env = _env_from_script(script.decode("utf-8", "replace"))
    return {
        "sif": path,
        "header": {"launch_script": h.launch_script, "version": h.version, "arch": h.arch, "id": str(h.id),
                   "created": h.created, "modified": h.modified, "data_offset": h.data_offset,
                   "data_size": h.data_size, "descriptors": f"{h.descriptors_total - h.descriptors_free}/"
                   f"{h.descriptors_total}"},
        "objects": objects,
        "labels": labels,
        "env": env,
    }
