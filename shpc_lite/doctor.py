"""``doctor``: check what a working install needs, each finding with the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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


# What installs each kind's runtime (the fix when it is missing).
RUNTIME_HINTS = {
    "apptainer": "install Apptainer or SingularityCE, load its module, or set config runtime to its path",
    "charliecloud": "install Charliecloud (apt-get install charliecloud-runtime) or set config runtime to ch-run's path",
    "podman": "install podman (apt-get install podman / dnf install podman) or set config runtime to its path",
    "podman-hpc": "load the podman-hpc module (NERSC) or set config runtime to its path",
    "shifter": "load the shifter module or set config runtime to its path",
}

# Files the kinds' checks read: module constants so that tests can point them elsewhere.
USERNS_MAX = Path("/proc/sys/user/max_user_namespaces")
USERNS_CLONE = Path("/proc/sys/kernel/unprivileged_userns_clone")  # Debian/Ubuntu kernels only
FUSE_DEVICE = Path("/dev/fuse")
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


def check_runtime(config: Config) -> Finding:
    runtime = config["runtime"]
    found = shutil.which(runtime)
    if not found:
        hint = RUNTIME_HINTS.get(_kind_name(config), RUNTIME_HINTS["apptainer"])
        return Finding("error", "runtime", f"{runtime!r} is not on PATH here", hint)
    return Finding("ok", "runtime", f"{found}: {_version_of([found, '--version'])}")


def _kind_name(config: Config) -> str:
    from shpc_lite.errors import ConfigError
    from shpc_lite.runtimes import runtime_kind

    try:
        return runtime_kind(config).name
    except ConfigError:
        return ""


def check_runtime_kind(config: Config) -> list[Finding]:
    """What the configured kind needs beyond its binary: an install that writes wrappers for a
    kind this node cannot run would only fail later, at a user's first call."""
    from shpc_lite.errors import ConfigError
    from shpc_lite.runtimes import runtime_kind

    try:
        kind = runtime_kind(config)
    except ConfigError as err:
        return [Finding("error", "runtime kind", str(err), "set config runtime_kind (or --runtime-kind)")]
    found = [Finding("ok", "runtime kind", f"{kind.name} (config runtime_kind: {config['runtime_kind']})")]
    if kind.name == "charliecloud":
        found += check_charliecloud()
    elif kind.image_form == "podman":
        found += check_podman(config)
    elif kind.image_form == "shifter":
        found.append(_tool("shifterimg", "installs pull images into Shifter's gateway with it",
                           "load the shifter module (shifterimg comes with shifter)"))
    return found


def _tool(name: str, why: str, fix: str, *alternatives: str) -> Finding:
    """A program on PATH (or the first of its alternatives that is)."""
    for candidate in (name, *alternatives):
        path = shutil.which(candidate)
        if path:
            return Finding("ok", name, path)
    names = " or ".join((name, *alternatives))
    return Finding("error", name, f"{names} not on PATH: {why}", fix)


def check_charliecloud() -> list[Finding]:
    """Wrappers mount the SIF with squashfuse (FUSE), run ch-run in an unprivileged user
    namespace and share the mount between calls with flock."""
    found = [
        _tool("squashfuse", "wrappers mount the SIF's squashfs with it",
              "apt-get install squashfuse (or dnf install squashfuse)"),
        _tool("fusermount3", "the last call unmounts the image with it",
              "apt-get install fuse3 (or dnf install fuse3)", "fusermount"),
        _tool("flock", "calls share one mount per node under a lock", "install util-linux"),
        _tool("setsid", "the reaper that unmounts after the last call runs in its own session",
              "install util-linux"),
    ]
    if FUSE_DEVICE.exists() and os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        found.append(Finding("ok", "fuse device", f"{FUSE_DEVICE} is usable"))
    else:
        found.append(Finding("error", "fuse device", f"{FUSE_DEVICE} is missing or not readable and writable",
                             "modprobe fuse, and make /dev/fuse mode 0666 (or give users access; in a "
                             "container: --device /dev/fuse)"))
    found.append(check_userns())
    return found


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def check_userns() -> Finding:
    """ch-run needs unprivileged user namespaces: a non-zero limit, and on kernels with Debian's
    switch, the switch on."""
    limit = _read_int(USERNS_MAX)
    if limit is not None and limit <= 0:
        return Finding("error", "user namespaces", f"{USERNS_MAX} is {limit}: unprivileged user namespaces are off",
                       "sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d/)")
    clone = _read_int(USERNS_CLONE)
    if clone == 0:
        return Finding("error", "user namespaces", f"{USERNS_CLONE} is 0: unprivileged user namespaces are off",
                       "sysctl -w kernel.unprivileged_userns_clone=1 (and in /etc/sysctl.d/)")
    if limit is None:
        return Finding("warn", "user namespaces", f"cannot read {USERNS_MAX}: is this kernel older than 4.9?",
                       "use a kernel with user namespaces (CONFIG_USER_NS)")
    return Finding("ok", "user namespaces", f"unprivileged user namespaces on (max {limit})")


def check_podman(config: Config) -> list[Finding]:
    """Installs pull into podman's storage and wrappers run from it: ``podman info`` must work
    (it reads the storage configuration), and rootless podman needs subordinate ids for the user."""
    found: list[Finding] = []
    exe = shutil.which(config["runtime"])
    if exe:
        try:
            proc = subprocess.run([exe, "info", "--format", "{{.Store.GraphRoot}}"], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
            answer = (proc.stdout.strip() if proc.returncode == 0 else
                      (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1])
        except (OSError, subprocess.TimeoutExpired) as err:
            proc, answer = None, f"did not answer: {err}"
        if proc is not None and proc.returncode == 0:
            found.append(Finding("ok", "podman storage", f"podman info: storage at {answer}"))
        else:
            found.append(Finding("error", "podman storage", f"podman info failed: {answer}",
                                 "fix podman's storage.conf (graphroot on a local file system, "
                                 "podman system migrate / podman system reset for a broken store)"))
    if os.geteuid() != 0:
        found += check_subids()
    return found


def check_subids() -> list[Finding]:
    """Rootless podman maps the user's container ids onto the ranges /etc/subuid and /etc/subgid
    give them; without an entry only one id exists and most images fail to unpack."""
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    found = []
    for path in SUBID_FILES:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        if any(line.split(":", 1)[0] in (user, str(uid)) for line in lines if ":" in line):
            found.append(Finding("ok", path.name, f"{path} has an entry for {user}"))
        else:
            found.append(Finding("error", path.name, f"{path} has no entry for {user}: rootless podman cannot map ids",
                                 f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"))
    return found


def check_mksquashfs(config: Config) -> Finding:
    found = shutil.which("mksquashfs")
    if not found:
        from shpc_lite.pull.squashfs import uses_native

        compression = config["squashfs_compression"]
        if uses_native(compression, config["squashfs_writer"]):  # the builtin puller writes gzip and zstd squashfs itself
            return Finding("ok", "mksquashfs", f"not found, not needed: the builtin puller writes {compression} "
                           "squashfs itself (squashfs_compression xz, lz4 or lzo would need it)")
        level = "warn" if shutil.which("apptainer") or shutil.which("singularity") else "error"
        return Finding(level, "mksquashfs", f"not found: the builtin puller cannot build {compression} SIF files",
                       "apt-get install squashfs-tools (or dnf install squashfs-tools), or set squashfs_compression "
                       "to zstd or gzip")
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


def check_mpi(config: Config) -> list[Finding]:
    """For ``mpi: host`` (the site default or installed modules that use it): the binds exist, the
    host library they bring is of the MPICH ABI, and each such module's image was built against
    an MPI of the same soname (a host library cannot stand in for another ABI's)."""
    from shpc_lite import mpi
    from shpc_lite.errors import SifError
    from shpc_lite.imagetree import list_names
    from shpc_lite.modules import installed

    modules = [r for r in installed(config.layout) if r.mpi == mpi.HOST]
    if not modules and config["mpi"] != mpi.HOST:
        return []
    binds = config["mpi_binds"]
    if not binds:
        found = mpi.ldconfig_suggestion()
        hint = (f"ldconfig -p finds {', '.join(found)}: add it (and its fabric libraries) to mpi_binds"
                if found else "set mpi_binds to the host's libmpi.so.12 (or its directory) and its fabric libraries")
        return [Finding("error", "mpi", "mpi: host but config mpi_binds is empty: the wrappers bind no host MPI",
                        hint + ", and mpi_env LD_LIBRARY_PATH to where they are seen inside (docs/environments.md)")]
    findings = [Finding("error", "mpi", f"mpi_binds: {mpi.bind_source(b)} does not exist on this host",
                        "fix the path in config mpi_binds (the wrappers' runtime refuses a missing bind)")
                for b in binds if not os.path.exists(mpi.bind_source(b))]
    libraries = mpi.host_libraries(binds)
    if not libraries:
        findings.append(Finding("warn", "mpi", "no MPI library (libmpi.so.N, libmpich.so.N) among mpi_binds",
                                "bind the host's libmpi.so.12 or the directory that holds it"))
    for lib in libraries:
        level = "ok" if lib.soname in mpi.MPICH_ABI else "error"
        findings.append(Finding(level, "mpi", f"host MPI {lib.path}: soname {mpi.describe(lib.soname)}",
                                "" if level == "ok" else "bind an MPI of the MPICH ABI (MPICH, Intel MPI, Cray "
                                "MPICH, MVAPICH: libmpi.so.12) and build images against one"))
    stale = [f"{r.name}:{r.version}" for r in modules if r.mpi_settings != mpi.settings_digest(config)]
    if stale:
        findings.append(Finding("warn", "mpi", f"{len(stale)} module(s) installed with other mpi_binds/mpi_env "
                                f"than the config's now: {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}",
                                "install them again (shpc-lite install NAME:VERSION) to rewrite their wrappers"))
    for record in modules:
        try:
            sonames = mpi.image_sonames(list_names(record.sif))
        except SifError as err:
            findings.append(Finding("warn", "mpi", f"{record.name}:{record.version}: cannot list its image: {err}"))
            continue
        where = f"{record.name}:{record.version}"
        if not sonames:
            findings.append(Finding("warn", "mpi", f"{where}: no libmpi.so.N in its image (statically linked?): "
                                    "cannot check its ABI"))
        for soname in sonames:
            bad = [lib for lib in libraries if not mpi.compatible(soname, lib.soname)]
            if bad:
                findings.append(Finding("error", "mpi", f"{where}: image built against {mpi.describe(soname)}, "
                                        f"host MPI is {mpi.describe(bad[0].soname)}: the host library cannot replace it",
                                        "rebuild the image against an MPI of the host's ABI, or install it "
                                        "with features.mpi: none and use the image's own MPI"))
            elif libraries:
                findings.append(Finding("ok", "mpi", f"{where}: image's {soname} matches the host's"))
    return findings


def check_refs(config: Config) -> Finding:
    """Refs that interrupted installs left keep their images; ``clean`` sweeps them (a dry run
    here: nothing is removed)."""
    from shpc_lite.clean import sweep

    layout = config.layout
    if not layout.refs_complete.exists():
        return Finding("ok", "image refs", "not indexed yet (the first uninstall or clean indexes them)")
    found = sweep(layout, config["lock_lease"], dry_run=True)
    if found.refused:
        return Finding("error", "image refs", found.refused[0], "remove the symlink the message names")
    if not found.refs and not found.images:
        return Finding("ok", "image refs", "no stale image refs or unused images")
    return Finding("warn", "image refs", f"{len(found.refs)} stale image refs (left by interrupted installs) and "
                   f"{len(found.images)} unused images ({found.freed / 1e6:.1f} MB)", "shpc-lite clean")


def check_spider_cache(config: Config) -> Optional[Finding]:
    """Whether Lmod can use the spider cache: a change not followed by a refresh (an interrupted
    install or batch) leaves it marked stale, and Lmod walks the tree until the next refresh."""
    layout = config.layout
    if not (layout.system.spider_cache and config["spider_cache"]):
        return None
    try:
        marked = int(os.lstat(layout.spider_timestamp).st_mtime)
        made = max(int(os.lstat(p).st_mtime) for p in layout.spider_cache.glob("spiderT.*"))
    except (OSError, ValueError):
        return Finding("warn", "spider cache", f"no spider cache in {layout.spider_cache} yet",
                       "shpc-lite clean (makes it)")
    if made < marked:
        return Finding("warn", "spider cache", "marked stale: a change was not followed by a refresh "
                       "(an interrupted install or batch); Lmod walks the tree until one",
                       "shpc-lite clean (refreshes it)")
    return Finding("ok", "spider cache", f"up to date in {layout.spider_cache}")


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
    findings = [check_runtime(config), *check_runtime_kind(config), check_mksquashfs(config),
                check_module_system(config), check_modulepath(config), *check_store(config), check_images(config),
                *check_mpi(config),
                check_refs(config)]
    cache = check_spider_cache(config)
    if cache is not None:
        findings.append(cache)
    if network:
        findings.append(check_registry(config))
    return findings
