"""``doctor``: check what a working install needs, each finding with the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from shpc_lite.config import Config

MIN_FREE_BYTES = 20 * 1024**3  # one large ML image plus its layers being built


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | error
    check: str
    detail: str
    fix: str = ""


def _version_of(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"(did not answer: {err})"
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else ""


def check_runtime(config: Config) -> Finding:
    runtime = config["runtime"]
    found = shutil.which(runtime)
    if not found:
        return Finding("error", "runtime", f"{runtime!r} is not on PATH here",
                       "install Apptainer or SingularityCE, load its module, or set config runtime to its path")
    return Finding("ok", "runtime", f"{found}: {_version_of([found, '--version'])}")


def check_mksquashfs(config: Config) -> Finding:
    found = shutil.which("mksquashfs")
    if not found:
        level = "warn" if shutil.which("apptainer") or shutil.which("singularity") else "error"
        return Finding(level, "mksquashfs", "not found: the builtin puller cannot build SIF files",
                       "apt-get install squashfs-tools (or dnf install squashfs-tools)")
    return Finding("ok", "mksquashfs", f"{found}: {_version_of([found, '-version'])}")


def check_module_system(config: Config) -> Finding:
    system = config.layout.system
    found = system.installation()
    if found:
        return Finding("ok", "module system", found)
    return Finding("error", "module system", f"{system.label} not found", system.missing_hint)


def check_modulepath(config: Config) -> Finding:
    modules = str(config.layout.modules)
    entries = [os.path.realpath(p) for p in os.environ.get("MODULEPATH", "").split(":") if p]
    if os.path.realpath(modules) in entries:
        return Finding("ok", "MODULEPATH", f"{modules} is in MODULEPATH")
    return Finding("warn", "MODULEPATH", f"{modules} is not in MODULEPATH",
                   f"module use {modules}  (or add it to the site's MODULEPATH)")


def check_store(config: Config) -> list[Finding]:
    layout = config.layout
    out = []
    probe = layout.root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK):
        out.append(Finding("ok", "store", f"{layout.root} is writable"))
    else:
        out.append(Finding("error", "store", f"{layout.root} is not writable by you",
                           "use --user for a private tree, or ask the admins for group write access"))
    unreadable = [p for p in layout.containers.glob("*.sif") if not (p.stat().st_mode & 0o044)]
    if unreadable:
        out.append(Finding("warn", "store", f"{len(unreadable)} SIF file(s) readable only by their owner",
                           f"chmod go+r {layout.containers}/*.sif, or set config file_mode: '0644'"))
    free = shutil.disk_usage(probe).free
    level = "ok" if free >= MIN_FREE_BYTES else "warn"
    out.append(Finding(level, "free space", f"{free / 1024**3:.1f} GiB free at {probe}",
                       "" if level == "ok" else "free space or point root at a larger filesystem"))
    return out


def check_images(config: Config) -> Finding:
    """Every installed module's SIF is there and readable. A module can outlive its image: a
    user's module uses a central image by reference, and the central admins may remove it."""
    from shpc_lite.modules import installed

    broken = [r for r in installed(config.layout) if not os.access(r.sif, os.R_OK)]
    if not broken:
        return Finding("ok", "images", "every installed module's SIF is readable")
    names = ", ".join(f"{r.name}:{r.version}" for r in broken[:5]) + (" ..." if len(broken) > 5 else "")
    user = " --user" if config["central_root"] else ""
    return Finding("error", "images", f"{len(broken)} module(s) whose SIF is missing or unreadable: {names}",
                   f"install them again (shpc-lite{user} install NAME:VERSION pulls the image)")


def check_registry(config: Config) -> Finding:
    """``GET /v2/`` on Docker Hub (or its configured mirror) with the client every command uses,
    so that mirrors, insecure hosts and credentials are the ones a pull would get."""
    from shpc_lite.errors import ShpcLiteError
    from shpc_lite.resolve import client_from_config
    from shpc_lite.scrub import scrub

    try:
        with client_from_config(config, retries=0, timeout=float(min(10, config["timeout"]))) as client:
            url = client.api_url("docker.io")
            scheme = client.ping("docker.io")
    except ShpcLiteError as err:
        return Finding("warn", "registry", scrub(f"docker.io is not reachable: {err}"),
                       "check the proxy settings (HTTPS_PROXY) or set config mirrors for docker.io")
    how = f", asks for {scheme} authentication" if scheme else ""
    return Finding("ok", "registry", scrub(f"{url} answers{how}"))


def run_checks(config: Config, network: bool = True) -> list[Finding]:
    findings = [check_runtime(config), check_mksquashfs(config), check_module_system(config),
                check_modulepath(config), *check_store(config), check_images(config)]
    if network:
        findings.append(check_registry(config))
    return findings
