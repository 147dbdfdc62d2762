"""The podman, podman-hpc and shifter kinds: the install step puts the image in the runtime's own
storage by digest, and the wrappers, loaded through real Lmod, exec the runtime with exactly the
argv the issue asks for (recording stand-ins on PATH, as ``tests/runtime_standin.sh``).

Where ``podman run`` works here, a few transparency checks also run through real podman (cwd,
env, exit status, stdin), with the image podman pulled at install from the test registry. A
machine whose kernel refuses podman's set-up (rlimits, namespaces) skips that test with podman's
own error, even under CI: the issue allows it, and the argv tests still cover the wrapper.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.modsys import have, run_bash
from tests import imagetools as it
from tests.imagetools import image_recipe
from tests.needs import need_tools, requires
from tests.test_container_runs import BUSYBOX, busybox_image

pytestmark = [
    requires(have("lmod"), reason="Debian lmod not installed"),
    requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed"),
    requires(BUSYBOX.is_file(), reason="busybox-static not installed (scripts/test.sh installs it)"),
]

ENV_VALUE = 'hi "there" $HOME'

# A runtime (podman, podman-hpc, shifter, shifterimg) that records what it was given: its argv (the
# last call's, and every call's, one per line), the archive `podman load` got, and the files its
# environment names.
RECORDER = """#!/bin/sh
rec=${SHPC_LITE_TEST_RECORD:?}
printf '%s\\0' "$@" > "$rec.argv"
{ printf '%s\\0' "$@"; echo; } >> "$rec.calls"
if [ "$1" = load ]; then cp "$3" "$rec.tar"; fi
if [ -n "${REGISTRY_AUTH_FILE:-}" ]; then
    cat "$REGISTRY_AUTH_FILE" > "$rec.auth"; stat -c %a "$REGISTRY_AUTH_FILE" > "$rec.authmode"
    printf '%s' "$REGISTRY_AUTH_FILE" > "$rec.authpath"
fi
if [ -n "${CONTAINERS_REGISTRIES_CONF:-}" ]; then cat "$CONTAINERS_REGISTRIES_CONF" > "$rec.conf"; fi
"""


def _recorder(site, *names: str) -> None:
    for name in names:
        (site.bin / name).write_text(RECORDER)
        (site.bin / name).chmod(0o755)


def _calls(site) -> list[list[str]]:
    text = _recorded(site, "calls")
    return [line.split("\0")[:-1] for line in text.splitlines()]


def _install(site, registry, unique_repo, runtime: str, *, gpu: str = "none", bind: str = "") -> dict:
    """Push busybox, write a recipe with aliases and env, put a recording ``runtime`` (and, for
    shifter, ``shifterimg``) on PATH and install through the CLI; returns the install record."""
    registry.pusher().push_image(unique_repo, busybox_image(), tags=["1.0"])
    image_recipe(site, "tiny", f"{registry.host}/{unique_repo}", {"1.0": "1.0"}, gpu=gpu)
    site.write_recipe("tiny", (site.recipes / "tiny.yaml").read_text().replace(
        "aliases:\n", f"env:\n  GREETING: '{ENV_VALUE}'\naliases:\n  bsh: /bin/sh -e\n"))
    _recorder(site, runtime, "shifterimg")
    if bind:
        Path(site.env["SHPC_LITE_SYSTEM_CONFIG"]).write_text(f"bind_paths: [{bind}]\n")
    site.env["SHPC_LITE_RUNTIME"] = runtime
    site.cli("install", "tiny:1.0", check=True)
    return json.loads((site.root / "wrappers/tiny/1.0/install.json").read_text())


def _check_archive(archive: Path, name: str, digest: str) -> None:
    """The OCI archive podman was given: named ``name``, its digest ``digest``, every blob in."""
    import tarfile

    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        index = json.loads(tar.extractfile("index.json").read())
        top = index["manifests"][0]
        assert top["digest"] == digest and top["annotations"] == {"org.opencontainers.image.ref.name": name}
        manifest = json.loads(tar.extractfile("blobs/" + digest.replace(":", "/")).read())
    needed = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    assert {"oci-layout", "index.json", *("blobs/" + d.replace(":", "/") for d in needed)} <= names


def _argv(site) -> list[str]:
    record = Path(site.env["SHPC_LITE_TEST_RECORD"] + ".argv")
    return [a.decode() for a in record.read_bytes().split(b"\0")[:-1]]


def _call(site, work: Path, line: str, **env: str) -> list[str]:
    """Load the module with real Lmod, run ``line`` in ``work``; what the runtime was given."""
    Path(site.env["SHPC_LITE_TEST_RECORD"] + ".argv").unlink(missing_ok=True)
    proc = run_bash("lmod", f"module use {site.root / 'modules'}\nmodule load tiny\ncd {str(work)!r}\n{line}\n",
                    {**site.env, **env})
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    return _argv(site)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work dir"
    path.mkdir()
    return path


@pytest.mark.parametrize("runtime", ["podman", "podman-hpc"])
def test_podman_install_pulls_by_digest_and_wrappers_exec_podman_run(site, registry, unique_repo, work, runtime):
    record = _install(site, registry, unique_repo, runtime, gpu="nvidia", bind="/srv, '/opt/a:/data:ro', '/x:/y:rw'")
    pinned = f"{registry.host}/{unique_repo}@{record['digest']}"
    if runtime == "podman":  # from the blob cache: no second download
        assert _calls(site) == [["load", "-i", _calls(site)[0][2]]]
        _check_archive(Path(site.env["SHPC_LITE_TEST_RECORD"] + ".tar"), f"{registry.host}/{unique_repo}:1.0",
                       record["digest"])
    else:  # podman-hpc pulls itself (its pull squashes the image for its shared storage)
        assert _calls(site) == [["pull", "--tls-verify=false", pinned]]  # loopback registry: no TLS
    assert (site.root / "containers" / (record["digest"].replace(":", "-") + ".sif")).is_file()
    home = site.env["HOME"]
    userns = ["--userns=keep-id"] if runtime == "podman" and os.geteuid() != 0 else []
    gpu = ["--device", "nvidia.com/gpu=all"] if runtime == "podman" else ["--gpu"]
    common = ["run", "--rm", "-i", *userns, "--network=host", "--ipc=host", "-v", f"{work}:{work}",
              f"--workdir={work}", "-v", "/srv:/srv", "-v", "/opt/a:/data:ro", "-v", "/x:/y",
              f"--env=GREETING={ENV_VALUE}"]
    mounts = ["-v", f"{home}:{home}", f"--env=HOME={home}"]
    args = ["two words", "", "$(id)"]
    assert _call(site, work, "bsh -c 'exit 3' x 'two words' '' '$(id)' </dev/null", SHPC_LITE_GPU="always") == [
        *common, *gpu, *mounts, "--entrypoint=/bin/sh", pinned, "-e", "-c", "exit 3", "x", *args]
    assert _call(site, work, "tiny-run 'two words' '' '$(id)'", SHPC_LITE_GPU="never",
                 SHPC_LITE_RUNTIME_OPTS="--pull=never --quiet") == [
        *common, "--pull=never", "--quiet", *mounts, pinned, *args]
    assert _call(site, work, "tiny-shell -c 'echo hi'", SHPC_LITE_GPU="never") == [
        *common, *mounts, "--entrypoint=/bin/sh", pinned, "-c", "echo hi"]
    assert _call(site, work, "tiny-exec /bin/cat /etc/motd", SHPC_LITE_GPU="never") == [
        *common, *mounts, "--entrypoint=/bin/cat", pinned, "/etc/motd"]


def test_podman_tty_only_when_both_ends_are_terminals(site, registry, unique_repo, work):
    need_tools("script")
    _install(site, registry, unique_repo, "podman")
    wrapper = site.root / "wrappers/tiny/1.0/bin/tiny-exec"
    for redirect, tty in (("", True), ("</dev/null", False), ("| cat", False)):
        Path(site.env["SHPC_LITE_TEST_RECORD"] + ".argv").unlink(missing_ok=True)
        subprocess.run(["script", "-qec", f"{wrapper} true {redirect}", "/dev/null"], env=site.env, cwd=work,
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=True)
        assert ("-t" in _argv(site)) is tty, redirect


def test_shifter_names_docker_hub_images_without_their_host():
    from shpc_lite.runtimes import SHIFTER

    assert SHIFTER.shifter_image("docker.io/library/ubuntu@sha256:ab") == "docker:library/ubuntu@sha256:ab"
    assert SHIFTER.shifter_image("ghcr.io/o/r@sha256:ab") == "docker:ghcr.io/o/r@sha256:ab"


def test_exec_without_a_command_is_a_usage_error(site, registry, unique_repo, work):
    _install(site, registry, unique_repo, "podman")
    proc = subprocess.run([str(site.root / "wrappers/tiny/1.0/bin/tiny-exec")], env=site.env, cwd=work,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125 and proc.stderr == "usage: tiny-exec COMMAND [ARG...]\n"


def test_podman_pull_failure_leaves_no_module(site, registry, unique_repo):
    registry.pusher().push_image(unique_repo, busybox_image(), tags=["1.0"])
    image_recipe(site, "tiny", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    (site.bin / "podman").write_text("#!/bin/sh\necho 'Error: storage is broken' >&2\nexit 125\n")
    (site.bin / "podman").chmod(0o755)
    proc = site.cli("install", "tiny:1.0", extra_env={"SHPC_LITE_RUNTIME": "podman"})
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("podman load failed: Error: storage is broken"), proc.stderr
    assert not (site.root / "modules" / "tiny").exists() or not any((site.root / "modules" / "tiny").iterdir())
    assert not list((site.root / "containers").glob("*.sif"))


def test_shifter_install_pulls_into_the_gateway_and_wrappers_exec_shifter(site, registry, unique_repo, work):
    record = _install(site, registry, unique_repo, "shifter", gpu="nvidia", bind="'/opt/a:/data:ro', /srv")
    image = f"--image=docker:{registry.host}/{unique_repo}@{record['digest']}"
    assert _calls(site) == [["pull", image.removeprefix("--image=")]]
    common = [image, f"--workdir={work}", "--volume=/opt/a:/data:ro", "--volume=/srv:/srv",
              f"--env=GREETING={ENV_VALUE}"]
    assert _call(site, work, "bsh -c 'exit 3' x 'two words'", SHPC_LITE_GPU="always") == [
        *common, "--module=gpu", "/bin/sh", "-e", "-c", "exit 3", "x", "two words"]
    assert _call(site, work, "tiny-run a 'b c'", SHPC_LITE_GPU="never", SHPC_LITE_RUNTIME_OPTS="--clearenv") == [
        *common, "--clearenv", "--entrypoint", "a", "b c"]
    assert _call(site, work, "tiny-shell", SHPC_LITE_GPU="never") == [*common, "/bin/sh"]
    assert _call(site, work, "tiny-exec /bin/cat '$x'", SHPC_LITE_GPU="never") == [*common, "/bin/cat", "$x"]


def _recorded(site, what: str) -> str:
    path = Path(site.env["SHPC_LITE_TEST_RECORD"] + "." + what)
    return path.read_text() if path.exists() else ""


def _pull_with_recorder(site, image: str, unique_repo: str, registry, **env: str) -> dict:
    registry.pusher().push_image(unique_repo, busybox_image(), tags=["1.0"])
    image_recipe(site, "tiny", image, {"1.0": "1.0"})
    # Stored first (another kind), its layers then gone from the cache: podman must pull itself.
    site.cli("install", "tiny:1.0", check=True, extra_env=env)
    shutil.rmtree(site.root / "cache" / "blobs")
    _recorder(site, "podman")
    site.cli("install", "tiny:1.0", check=True, extra_env={"SHPC_LITE_RUNTIME": "podman", **env})
    return json.loads((site.root / "wrappers/tiny/1.0/install.json").read_text())


def test_podman_pull_credentials_only_in_a_private_auth_file(site, registry_basic, unique_repo):
    from shpc_lite.oci.credentials import env_prefix

    host = registry_basic.host
    prefix = env_prefix(host)
    record = _pull_with_recorder(site, f"{host}/{unique_repo}", unique_repo, registry_basic,
                                 **{prefix + "USER": registry_basic.username, prefix + "PASSWORD": registry_basic.password})
    assert _calls(site) == [["pull", "--tls-verify=false", f"{host}/{unique_repo}@{record['digest']}"]]
    auth = json.loads(_recorded(site, "auth"))["auths"][host]["auth"]
    assert base64.b64decode(auth).decode() == f"{registry_basic.username}:{registry_basic.password}"
    assert _recorded(site, "authmode").strip() == "600"
    assert not os.path.exists(_recorded(site, "authpath"))  # removed after the pull
    assert _recorded(site, "conf") == ""  # no mirror: podman's own registries.conf


def test_podman_pull_through_a_mirror_keeps_the_image_name(site, registry, unique_repo):
    mirror = f"http://mirror-user:mirror-pw@{registry.host}"
    Path(site.env["SHPC_LITE_SYSTEM_CONFIG"]).write_text(f"mirrors:\n  docker.io: {mirror!r}\n")
    record = _pull_with_recorder(site, f"docker.io/{unique_repo}", unique_repo, registry)
    assert _calls(site) == [["pull", f"docker.io/{unique_repo}@{record['digest']}"]]
    assert _recorded(site, "conf") == (
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\ninsecure = false\n'
        f'[[registry.mirror]]\nlocation = "{registry.host}"\ninsecure = true\n')
    auth = json.loads(_recorded(site, "auth"))["auths"]
    assert base64.b64decode(auth[registry.host]["auth"]).decode() == "mirror-user:mirror-pw"


# ------------------------------------------------------------------------------------ real podman


def _oci_busybox() -> it.Image:
    """busybox as an OCI image: podman refuses busybox_image's zstd layer in a Docker v2 manifest."""
    return it.make_image(
        [it.make_layer([it.Dir("bin"), it.Dir("etc"), it.Dir("tmp", 0o1777), it.Symlink("bin/sh", "busybox"),
                        it.Symlink("bin/cat", "busybox"), it.File("bin/busybox", BUSYBOX.read_bytes(), 0o755),
                        it.File("etc/motd", "hello from inside the image\n")], "zstd")],
        oci=True, env=["PATH=/bin"])


def _install_with_podman(site, registry, unique_repo, aliases: str = "", env: str = "") -> str:
    """Install the pushed image as tiny:1.0 with the real podman; returns its pinned reference."""
    image_recipe(site, "tiny", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    site.write_recipe("tiny", (site.recipes / "tiny.yaml").read_text().replace("aliases:\n", "aliases:\n" + aliases) + env)
    site.env["SHPC_LITE_RUNTIME"] = "podman"
    site.env.pop("HOME")  # podman keeps its storage and config under the real user's home
    site.cli("install", "tiny:1.0", check=True)
    record = json.loads((site.root / "wrappers/tiny/1.0/install.json").read_text())
    return f"{registry.host}/{unique_repo}@{record['digest']}"


def _podman_has(pinned: str) -> bool:
    return subprocess.run(["podman", "image", "exists", pinned], timeout=60).returncode == 0


@pytest.mark.parametrize("multi_platform", [False, True])
def test_real_podman_gets_the_image_from_the_cache_or_the_registry(site, registry, unique_repo, multi_platform):
    """podman load from the blob cache, then (layers gone) podman pull: either way podman has the
    image under the pinned digest the wrappers run (an index digest too), named registry/repo:tag."""
    need_tools("podman")
    image = _oci_busybox()
    if multi_platform:
        registry.pusher().push_index(unique_repo, it.make_index({"linux/amd64": image}, oci=True), tags=["1.0"])
    else:
        registry.pusher().push_image(unique_repo, image, tags=["1.0"])
    pinned = _install_with_podman(site, registry, unique_repo)
    try:
        assert _podman_has(pinned) and _podman_has(f"{registry.host}/{unique_repo}:1.0")
        subprocess.run(["podman", "rmi", "--force", pinned], capture_output=True, timeout=120, check=True)
        assert not _podman_has(pinned)
        shutil.rmtree(site.root / "cache" / "blobs")
        site.cli("install", "tiny:1.0", check=True)
        assert _podman_has(pinned)
    finally:
        subprocess.run(["podman", "rmi", "--force", pinned], capture_output=True, timeout=120)


@pytest.fixture
def podman_site(site, registry, unique_repo):
    """The module installed with the real podman (pulled from the test registry at install), or
    a skip with podman's own words where this machine cannot run a container."""
    need_tools("podman")
    registry.pusher().push_image(unique_repo, _oci_busybox(), tags=["1.0"])
    pinned = _install_with_podman(site, registry, unique_repo, "  bsh: /bin/sh\n  motd: cat /etc/motd\n",
                                  f"env:\n  GREETING: '{ENV_VALUE}'\n")
    try:
        assert _podman_has(pinned)
        probe = subprocess.run(["podman", "run", "--rm", pinned, "true"], capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            pytest.skip(f"podman run does not work on this machine: {probe.stderr.strip()}")
        yield site
    finally:
        subprocess.run(["podman", "rmi", "--force", pinned], capture_output=True, timeout=120)


def test_real_podman_cwd_env_status_and_stdin(podman_site, work):
    (work / "data.txt").write_text("from the host\n")
    proc = run_bash("lmod", f"""
        module use {podman_site.root / 'modules'}
        module load tiny
        cd {str(work)!r}
        motd
        bsh -c 'pwd; cat data.txt; printf "%s|" "$GREETING" "$#" "$@"; echo' bsh 'two words' '' '$(id)'
        echo 'from stdin' | bsh -c 'cat'
        bsh -c 'exit 42'; echo "status $?"
        """, podman_site.env, timeout=300)
    out = proc.stdout.decode().splitlines()
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert out == ["hello from inside the image", str(work), "from the host",
                   f"{ENV_VALUE}|3|two words||$(id)|", "from stdin", "status 42"]
