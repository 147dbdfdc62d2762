"""The container runtimes wrappers can call: one small object per kind.

A kind says how its wrappers look (its template), what form of the image it runs (the stored SIF,
or an image in the runtime's own storage), how recipe env reaches the container, and how GPUs are
asked for. ``runtime`` stays the binary to call; ``runtime_kind`` (config key, env
``SHPC_LITE_RUNTIME_KIND``, flag ``--runtime-kind``) says which kind it is, ``auto`` meaning: from
the binary's name. Nothing else in the package compares runtime names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from shpc_lite.errors import ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class RuntimeKind:
    name: str  # the config value
    binaries: tuple[str, ...]  # basenames of `runtime` that mean this kind under `auto`
    template: str  # the wrapper template (modulefiles/)
    image_form: str  # "sif": runs the stored SIF; "podman": podman's storage; "shifter": its gateway
    env_prefix: str = ""  # apptainer/singularity read <PREFIX>NAME from the host environment
    # GPU vendor -> options asking for that GPU (empty: the kind has no such option)
    gpu_options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    reads_image: bool = False  # wrappers need the image's env and partition offset (read at install)
    read_only_binds: bool = True  # whether a bind can be made read-only (``src:dst:ro``)

    @property
    def runs_sif(self) -> bool:
        return self.image_form == "sif"

    @property
    def keeps_user_ns(self) -> bool:
        """Plain rootless podman maps the caller to root unless told ``--userns=keep-id``;
        podman-hpc chooses its own user namespace (and refuses that option)."""
        return self.name == "podman"

    @staticmethod
    def shifter_image(pinned: str) -> str:
        """Shifter's name of an image (``docker:`` + reference); Docker Hub's without its host,
        as the gateway's default location is Docker Hub under its own host name."""
        return "docker:" + (pinned[len("docker.io/"):] if pinned.startswith("docker.io/") else pinned)

    def volume(self, bind: str) -> str:
        """A bind (Apptainer's ``SRC[:DST[:ro|rw]]``) as podman's ``-v``/shifter's ``--volume``
        value. ``SRC`` alone means the same path inside (podman would make an anonymous volume
        of it); ``:rw`` is the default and not a flag shifter knows, ``:ro`` both keep."""
        parts = bind.split(":")
        flags = [parts.pop()] if len(parts) > 1 and parts[-1] in ("ro", "rw") else []
        src, dst = parts[0], (parts[1] if len(parts) > 1 else parts[0])
        return ":".join([src, dst, *(f for f in flags if f == "ro")])


APPTAINER = RuntimeKind("apptainer", ("apptainer",), "wrapper.sh.j2", "sif", "APPTAINERENV_",
                        {"nvidia": ("--nv",), "amd": ("--rocm",)})
SINGULARITY = RuntimeKind("singularity", ("singularity",), "wrapper.sh.j2", "sif", "SINGULARITYENV_",
                          {"nvidia": ("--nv",), "amd": ("--rocm",)})
CHARLIECLOUD = RuntimeKind("charliecloud", ("ch-run",), "wrapper-charliecloud.sh.j2", "sif", reads_image=True,
                            read_only_binds=False)
PODMAN = RuntimeKind("podman", ("podman",), "wrapper-podman.sh.j2", "podman",
                     gpu_options={"nvidia": ("--device", "nvidia.com/gpu=all"),
                                  "amd": ("--device", "/dev/kfd", "--device", "/dev/dri")})
PODMAN_HPC = RuntimeKind("podman-hpc", ("podman-hpc",), "wrapper-podman.sh.j2", "podman",
                         gpu_options={"nvidia": ("--gpu",), "amd": ("--device", "/dev/kfd", "--device", "/dev/dri")})
SHIFTER = RuntimeKind("shifter", ("shifter",), "wrapper-shifter.sh.j2", "shifter",
                      gpu_options={"nvidia": ("--module=gpu",)})

RUNTIME_KINDS: dict[str, RuntimeKind] = {
    kind.name: kind for kind in (APPTAINER, SINGULARITY, CHARLIECLOUD, PODMAN, PODMAN_HPC, SHIFTER)
}
CHOICES = (AUTO, *RUNTIME_KINDS)


def runtime_kind(config: Mapping[str, str]) -> RuntimeKind:
    """The kind config ``runtime_kind`` names, or (``auto``) the one ``runtime``'s basename means."""
    wanted = config["runtime_kind"]
    if wanted != AUTO:
        return RUNTIME_KINDS[wanted]
    binary = os.path.basename(config["runtime"])
    for kind in RUNTIME_KINDS.values():
        if binary in kind.binaries:
            return kind
    for kind in (APPTAINER, SINGULARITY):  # e.g. singularity-ce, apptainer-1.3
        if kind.name in binary:
            return kind
    raise ConfigError(f"runtime {config['runtime']!r}: cannot tell its kind from its name; "
                      f"set runtime_kind to one of {', '.join(RUNTIME_KINDS)}")
