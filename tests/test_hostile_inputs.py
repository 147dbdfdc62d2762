"""Hostile or broken input from registries, images and config files (issue 9, "Hardening").

What a user must see: no credentials anywhere in what shpc-lite prints or logs, one error line
naming the file or image (never a traceback), escape sequences from images shown rather than run,
and a prompt exit on Ctrl-C or SIGTERM while a registry stalls or paginates without end.
Misbehaving registries are small http.server instances on 127.0.0.1 (tests.test_registry_client).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shpc_lite.config import load_config
from shpc_lite.errors import ConfigError, PullError, RegistryError, SifError, SiteError
from shpc_lite.inspect import inspect_sif
from shpc_lite.oci.document import check_image_config, inner_config
from shpc_lite.pull import apptainer_files
from shpc_lite.scrub import install_log_scrubbing, printable, register_credential, scrub
from shpc_lite.sif import DataType, build_container_sif, primary_partition, read_data, read_sif
from shpc_lite.site import load_manifest
from tests.imagetools import sha256
from tests.test_registry_client import FakeServer, fake, fast_client, one_line  # noqa: F401  (fixture)

USER, SECRET = "alice", "Sup3r-Secret-Pa55word"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DEEP = 200_000


def secret_forms(user: str, password: str, *extra: str) -> list[str]:
    raw = f"{user}:{password}".encode()
    return [password, quote(password, safe=""), base64.b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode(), *extra]


def assert_clean(text: str, forms: list[str]) -> None:
    for form in forms:
        assert form not in text, f"secret {form[:6]}... printed:\n{text}"


def assert_one_line(proc, *needles: str) -> str:
    assert proc.returncode not in (0, None)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def recipe(site, host: str, name: str = "app") -> None:
    site.write_recipe(name, f"name: {name}\nimage: {host}/team/{name}\ndescription: test\n"
                            "versions:\n  '1.0': '1.0'\nselect:\n  pattern: '^(?P<version>\\d+\\.\\d+)$'\n")


def write_lock(site, host: str, name: str = "app") -> bytes:
    doc = {"lockfile_version": 1, "recipes": {name: {"image": f"{host}/team/{name}", "versions": [
        {"version": "1.0", "tag": "1.0", "digest": "sha256:" + "0" * 64,
         "resolved_at": "2026-01-01T00:00:00Z"}]}}}
    site.root.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(doc, indent=2) + "\n").encode()
    (site.root / "shpc-lite.lock").write_bytes(data)
    return data


def manifest_for(config: bytes) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": sha256(config), "size": len(config)},
                       "layers": []}).encode()


def image_server(fake, manifest: bytes, config: bytes = b"{}") -> FakeServer:
    """A registry (no auth) serving one manifest for every tag and one config blob."""
    def handle(req):
        path = urlsplit(req.path).path
        if path == "/v2/":
            return 200, {}, b"{}"
        if "/manifests/" in path:
            return 200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256(manifest)}, manifest
        if path.endswith(sha256(config)):
            return 200, {}, config
        return 404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}'

    return fake(handle)


# ==================================================================================================
# 1. Credentials are never printed
# ==================================================================================================

def test_scrubber_masks_every_spelling_of_a_secret(tmp_path):
    register_credential(USER, SECRET)
    text = " | ".join(secret_forms(USER, SECRET)) + f" | https://bob:other-pass@mirror.example/v2/"
    cleaned = scrub(text)
    assert_clean(cleaned, secret_forms(USER, SECRET) + ["other-pass", "bob:"])
    assert "https://***@mirror.example/v2/" in cleaned
    # an Authorization value nobody registered is masked too; ordinary words are not
    assert scrub("sent Basic dW5rbm93bjp1bmtub3du=") == "sent Basic ***"
    assert scrub("Basic authentication failed for Bearer tokens") == \
        "Basic authentication failed for Bearer tokens"


def test_log_records_are_scrubbed_in_log_files(tmp_path):
    install_log_scrubbing()
    register_credential(USER, SECRET)
    log_file = tmp_path / "shpc-lite.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("shpc_lite.oci.client")
    logger.addHandler(handler)
    try:
        basic = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        logger.warning("registry said: %s and %s via %s", f"Basic {basic}", SECRET,
                       f"http://{USER}:{SECRET}@127.0.0.1:1/v2/")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = log_file.read_text()
    assert "registry said" in text
    assert_clean(text, secret_forms(USER, SECRET))


@pytest.fixture
def leaky(fake):
    """A registry that echoes every credential it saw in its error bodies: the Basic header its
    token endpoint got, the Bearer token, and the password itself."""
    token = "tok-" + secrets.token_hex(16)
    seen = {"basic": ""}

    def handle(req):
        url = urlsplit(req.path)
        auth = req.headers.get("Authorization", "")
        if url.path == "/v2/":
            realm = f"http://127.0.0.1:{req.server.server_address[1]}/token"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="leaky"'}, b"{}"
        if url.path == "/token":
            seen["basic"] = auth
            return 200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode()
        if req.command == "HEAD" and "/manifests/" in url.path:
            return 200, {"Docker-Content-Digest": "sha256:" + "1" * 64, "Content-Type": OCI_MANIFEST}, b""
        message = f"{seen['basic']} {auth} {SECRET}"
        return 403, {"Content-Type": "application/json"}, json.dumps(
            {"errors": [{"code": "DENIED", "message": message}]}).encode()

    server = fake(handle)
    server.token = token
    return server


def test_no_credentials_in_any_output(site, leaky, tmp_path):
    """resolve, check, install and doctor (text and --json) against a registry echoing the
    credentials: the errors are shown, the password, its Basic base64 and the token never."""
    recipe(site, leaky.host)
    prefix = "SHPC_LITE_REGISTRY_127_0_0_1_" + str(leaky.port) + "_"
    env = {prefix + "USER": USER, prefix + "PASSWORD": SECRET,
           "SHPC_LITE_MIRRORS": f"docker.io=http://{USER}:{SECRET}@{leaky.host}"}
    runs = {
        "resolve": site.cli("resolve", "app", "--json", extra_env=env),
        "install": site.cli("install", "app:1.0", extra_env=env),
        "doctor": site.cli("doctor", extra_env=env),
        "doctor-json": site.cli("doctor", "--json", extra_env=env),
    }
    write_lock(site, leaky.host)
    runs["check"] = site.cli("check", "--json", extra_env=env)
    forms = secret_forms(USER, SECRET, leaky.token)
    for name, proc in runs.items():
        assert_clean(proc.stdout + proc.stderr, forms)
    assert leaky.paths().count("/v2/") >= 1 and any(p.startswith("/token") for p in leaky.paths())
    assert "DENIED" in runs["resolve"].stderr and "***" in runs["resolve"].stderr
    assert_one_line(runs["install"], "app", "DENIED")
    assert f"http://{leaky.host}/v2/ answers" in runs["doctor"].stdout  # the mirror, without userinfo
    assert json.loads(runs["doctor-json"].stdout)
    assert "DENIED" in runs["check"].stderr


@pytest.mark.registry
def test_mirror_url_with_password_against_a_basic_auth_registry(site, registry_basic):
    """A mirror written ``http://user:password@host`` works (its userinfo is the mirror's
    credentials) and is shown without them."""
    url = f"http://{registry_basic.username}:{registry_basic.password}@{registry_basic.host}"
    forms = secret_forms(registry_basic.username, registry_basic.password)
    for argv in (["doctor"], ["--set", f"mirrors=docker.io={url}", "config"]):
        proc = site.cli(*argv, extra_env={"SHPC_LITE_MIRRORS": f"docker.io={url}"})
        assert_clean(proc.stdout + proc.stderr, forms)
        assert registry_basic.host in proc.stdout
    site.write_recipe("nosuch", "name: nosuch\nimage: docker.io/test/nosuch\ndescription: d\n"
                                "versions:\n  '1.0': '1.0'\n")
    proc = site.cli("install", "nosuch:1.0", extra_env={"SHPC_LITE_MIRRORS": f"docker.io={url}"})
    line = assert_one_line(proc, "not found")  # authenticated with the URL's credentials: no 401
    assert_clean(line, forms)


@pytest.mark.registry
def test_apptainer_gets_the_mirror_credentials_by_environment_only(site, registry, small_sif):
    """The apptainer back end: the mirror URL's ``user:password@`` goes to apptainer as its
    credential environment, never into its command line (``ps`` shows that to every user)."""
    from tests.conftest import read_record
    from tests.imagetools import make_image, make_layer

    repo = "team/viaapptainer-mirror"
    registry.pusher().push_image(repo, make_image([make_layer({"x": "y"})]), tags=["1.0"])
    site.write_recipe("app", f"name: app\nimage: docker.io/{repo}\ndescription: d\nversions:\n  '1.0': '1.0'\n")
    (site.bin / "apptainer").write_text(
        '#!/bin/sh\nprintf "%s\\0" "$@" > "$SHPC_LITE_TEST_RECORD.argv"\nenv -0 > "$SHPC_LITE_TEST_RECORD.env"\n'
        'for a; do case "$a" in *.sif) cp "$SIF_SOURCE" "$a";; esac; done\n')
    mirror = f"http://{USER}:{quote(SECRET)}@{registry.host}"
    proc = site.cli("--set", "puller=apptainer", "install", "app:1.0",
                    extra_env={"SIF_SOURCE": str(small_sif), "SHPC_LITE_MIRRORS": f"docker.io={mirror}"})
    assert proc.returncode == 0, proc.stderr
    argv, env = read_record(site)
    assert argv[-1].startswith(f"docker://{registry.host}/{repo}@sha256:".encode())
    assert not any(SECRET.encode() in a or USER.encode() in a for a in argv)
    assert env[b"APPTAINER_DOCKER_USERNAME"] == USER.encode()
    assert env[b"APPTAINER_DOCKER_PASSWORD"] == SECRET.encode()
    assert_clean(proc.stdout + proc.stderr, secret_forms(USER, SECRET))


# ==================================================================================================
# 3. Ctrl-C and SIGTERM are prompt; endless tag lists are bounded
# ==================================================================================================

def stalling_registry(fake, how: str) -> FakeServer:
    """``slow``: the tag list takes 30 s; ``endless``: every tag page links to one more."""
    def handle(req):
        url = urlsplit(req.path)
        if url.path == "/v2/":
            return 200, {}, b"{}"
        if url.path.endswith("/tags/list"):
            if how == "slow":
                server.stop_event.wait(30)
                return 200, {}, b'{"tags":["1.0"]}'
            n = int(parse_qs(url.query).get("last", ["t0"])[0][1:]) + 1
            server.stop_event.wait(0.02)
            return 200, {"Link": f'</v2/team/app/tags/list?n=1000&last=t{n}>; rel="next"'}, \
                json.dumps({"tags": [f"t{n}"]}).encode()
        return 200, {"Docker-Content-Digest": "sha256:" + "0" * 64, "Content-Type": OCI_MANIFEST}, b""

    server = fake(handle)
    return server


@pytest.mark.parametrize("command, how, sig", [
    ("resolve", "slow", signal.SIGINT), ("resolve", "endless", signal.SIGTERM),
    ("check", "slow", signal.SIGTERM), ("check", "endless", signal.SIGINT),
])
def test_interrupt_is_prompt(site, fake, command, how, sig):
    server = stalling_registry(fake, how)
    recipe(site, server.host)
    lock = write_lock(site, server.host)
    before = sorted(p.name for p in site.root.iterdir())
    names = ["app"] if command == "resolve" else []
    proc = subprocess.Popen([sys.executable, "-m", "shpc_lite", command, *names], env=site.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("/tags/list" in p for p in server.paths()):
            time.sleep(0.02)
        time.sleep(0.2)  # well inside the stalled request or the page walk
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, sig)
        start = time.monotonic()
        out, err = proc.communicate(timeout=15)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert took < 2, f"{command} took {took:.1f} s to stop"
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    assert err.strip().splitlines() == ["shpc-lite: interrupted; nothing half-written was left behind"]
    assert (site.root / "shpc-lite.lock").read_bytes() == lock
    assert sorted(p.name for p in site.root.iterdir()) == before


def test_endless_pagination_is_a_clear_error(fake, monkeypatch):
    import shpc_lite.oci.client as client_module

    server = stalling_registry(fake, "endless")
    monkeypatch.setattr(client_module, "MAX_TAGS", 20)
    with fast_client() as client:
        with pytest.raises(RegistryError) as info:
            client.list_tags(f"{server.host}/team/app")
    assert "does not end" in one_line(info.value) and f"{server.host}/team/app" in str(info.value)
    assert len(server.paths()) <= 23


def test_tags_and_registry_messages_carry_no_terminal_escapes(fake):
    def handle(req):
        if "/tags/list" in req.path and "other" not in req.path:
            return 200, {}, json.dumps({"tags": ["1.0", "\x1b[2Jevil", "two words", "2.0"]}).encode()
        return 404, {}, json.dumps({"errors": [{"code": "NAME_UNKNOWN", "message": "\x1b]0;owned\x07"}]}).encode()

    server = fake(handle)
    with fast_client() as client:
        assert client.list_tags(f"{server.host}/team/app") == ["1.0", "2.0"]
        with pytest.raises(RegistryError) as info:
            client.list_tags(f"{server.host}/team/other")
    assert "\x1b" not in str(info.value) and "\\x1b]0;owned\\x07" in str(info.value)


def test_pages_without_new_tags_stop_the_walk(fake):
    def handle(req):
        n = len(server.requests)  # a new URL each time, the same tag every time
        return 200, {"Link": f'</v2/team/app/tags/list?n=1000&last=x{n}>; rel="next"'}, b'{"tags":["1.0"]}'

    server = fake(handle)
    with fast_client() as client:
        with pytest.raises(RegistryError, match="does not end"):
            client.list_tags(f"{server.host}/team/app")
    assert len(server.requests) <= 5


# ==================================================================================================
# 2. Broken documents: one typed error naming the image or file
# ==================================================================================================

BAD_CONFIG_FIELDS = {
    "entrypoint-number": {"Entrypoint": 5},
    "labels-list": {"Labels": [1, 2]},
    "workingdir-number": {"WorkingDir": 7},
    "env-string": {"Env": "x"},
    "cmd-object": {"Cmd": {}},
    "env-numbers": {"Env": [1]},
    "config-list": None,
}


def config_blob(fields) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "config": [1] if fields is None else fields}).encode()


@pytest.mark.parametrize("case", sorted(BAD_CONFIG_FIELDS))
def test_image_config_with_wrong_types_from_a_registry(fake, case):
    config = config_blob(BAD_CONFIG_FIELDS[case])
    server = image_server(fake, manifest_for(config), config)
    with fast_client() as client:
        image = client.resolve_image(f"{server.host}/team/app:1.0")
        with pytest.raises(RegistryError) as info:
            client.get_config(image)
    text = one_line(info.value)
    assert f"{server.host}/team/app:1.0" in text and "config" in text


@pytest.mark.parametrize("what", ["manifest", "config"])
def test_documents_nested_200000_deep(fake, what):
    deep = b"[" * DEEP + b"]" * DEEP
    config = deep if what == "config" else b"{}"
    manifest = deep if what == "manifest" else manifest_for(config)
    server = image_server(fake, manifest, config)
    with fast_client() as client:
        with pytest.raises(RegistryError) as info:
            client.get_config(client.resolve_image(f"{server.host}/team/app:1.0"))
    assert "nested too deeply" in one_line(info.value) and server.host in str(info.value)


def test_install_of_an_image_with_a_bad_config_is_one_line(site, fake):
    config = config_blob({"Entrypoint": 5})
    server = image_server(fake, manifest_for(config), config)
    recipe(site, server.host)
    proc = site.cli("install", "app:1.0")
    assert_one_line(proc, f"{server.host}/team/app", "Entrypoint")
    assert not (site.root / "modules").exists()
    assert not list(site.root.rglob("*.sif"))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(["Env", "Entrypoint", "Cmd", "WorkingDir", "Labels", "config", "architecture"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=FIELDS, value=JSON)
def test_any_json_value_in_an_image_config_is_accepted_or_a_typed_error(field, value):
    """Whatever a registry puts in a field, the checked parse either refuses it (RegistryError)
    or the /.singularity.d files and inspect's labels/env can be made from it."""
    doc = {"architecture": "amd64", "config": {"Env": ["PATH=/bin"]}}
    if field in ("config", "architecture"):
        doc[field] = value
    else:
        doc["config"][field] = value
    try:
        checked = check_image_config(doc, "img", RegistryError)
    except RegistryError as err:
        assert str(err).startswith("img") and "\n" not in str(err)
        return
    files = apptainer_files(checked, source_ref="img", source_digest="sha256:00")
    assert ".singularity.d/runscript" in files
    from shpc_lite.inspect import _labels_and_env

    _labels_and_env("x.sif", json.dumps(inner_config(checked)).encode())


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["annotations", "urls", "platform", "mediaType"]), value=JSON)
def test_any_json_value_in_a_manifest_descriptor_is_accepted_or_a_typed_error(field, value):
    from shpc_lite.oci.client import Descriptor

    doc = {"digest": "sha256:" + "a" * 64, "size": 1, field: value}
    try:
        desc = Descriptor.from_json(doc, "img")
    except RegistryError as err:
        assert str(err).startswith("img") and "\n" not in str(err)
        return
    assert desc.is_attestation in (True, False)


def test_apptainer_files_refuses_unchecked_configs():
    with pytest.raises(PullError, match="img: image config: config Labels"):
        apptainer_files({"config": {"Labels": [1, 2]}}, source_ref="img", source_digest="sha256:00")


# --- SIF files whose oci-config.json is broken, or whose labels carry terminal escapes ----------

@pytest.fixture(scope="module")
def squashfs(small_sif, tmp_path_factory) -> Path:
    part = primary_partition(read_sif(small_sif))
    path = tmp_path_factory.mktemp("squash") / "fs.squashfs"
    path.write_bytes(read_data(small_sif, part))
    return path


def sif_with_config(squashfs: Path, dest: Path, data: bytes) -> Path:
    build_container_sif(dest, squashfs, deffile=b"bootstrap: docker\nfrom: test\n",
                        json_objects={"oci-config.json": data}, arch="amd64")
    return dest


BAD_OCI_CONFIGS = {
    "not-json": b"{not json",
    "json-list": b"[1, 2]",
    "env-number": b'{"Env": [1]}',
    "labels-list": b'{"Labels": [1, 2]}',
    "deep": b'{"Labels":' * DEEP + b"{}" + b"}" * DEEP,
    "not-utf8": b'{"Env": ["A=\xff"]}',
}


@pytest.mark.parametrize("case", sorted(BAD_OCI_CONFIGS))
def test_inspect_of_a_sif_with_a_broken_config(squashfs, tmp_path, case):
    sif = sif_with_config(squashfs, tmp_path / "bad.sif", BAD_OCI_CONFIGS[case])
    with pytest.raises(SifError) as info:
        inspect_sif(str(sif))
    assert str(sif) in one_line(info.value) and "oci-config.json" in str(info.value)


def test_inspect_cli_is_one_line_and_shows_escapes_escaped(site, squashfs, tmp_path):
    site.write_recipe("app", "name: app\nimage: docker.io/library/demo\ndescription: d\n"
                             "versions:\n  '1.0': '1.0'\n  '2.0': '2.0'\n")
    evil = {"Labels": {"title\x1b]0;owned\x07": "\x1b[2J\x1b[31mred\u202e", "ok": "plain"},
            "Env": ["PATH=/bin", "X=\x1b[8mhidden"]}
    good = sif_with_config(squashfs, tmp_path / "evil.sif", json.dumps(evil).encode())
    bad = sif_with_config(squashfs, tmp_path / "bad.sif", b'{"Env": [1]}')
    site.cli("install", "app:1.0", "--sif", str(good), check=True)
    site.cli("install", "app:2.0", "--sif", str(bad), check=True)
    shown = site.cli("inspect", "app:1.0")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\u202e" not in shown.stdout and "\x07" not in shown.stdout
    assert "\\x1b[2J\\x1b[31mred\\u202e" in shown.stdout and "ok=plain" in shown.stdout
    assert "X=\\x1b[8mhidden" in shown.stdout
    assert json.loads(site.cli("inspect", "app:1.0", "--json").stdout)["labels"]["ok"] == "plain"
    assert_one_line(site.cli("inspect", "app:2.0"), "oci-config.json", "Env")


@pytest.mark.parametrize("labels", [b"[1, 2]", b'{"a": "\xff"}', b"{" * 50], ids=["list", "not-utf8", "not-json"])
def test_inspect_of_a_sif_made_elsewhere_with_broken_labels(tmp_path, labels):
    """A SIF without oci-config.json (apptainer pull, --sif): labels come from the squashfs."""
    rootfs = tmp_path / "rootfs" / ".singularity.d"
    rootfs.mkdir(parents=True)
    (rootfs / "labels.json").write_bytes(labels)
    squash = tmp_path / "fs.squashfs"
    subprocess.run(["mksquashfs", str(rootfs.parent), str(squash), "-noappend", "-quiet", "-all-root"],
                   check=True, capture_output=True, timeout=60)
    sif = tmp_path / "other.sif"
    build_container_sif(sif, squash, deffile=b"bootstrap: docker\nfrom: x\n", json_objects={}, arch="amd64")
    with pytest.raises(SifError) as info:
        inspect_sif(str(sif))
    assert str(sif) in one_line(info.value) and "labels.json" in str(info.value)


# --- SIF headers claiming a huge descriptor table ------------------------------------------------

def test_sif_descriptor_table_is_bounded(site, small_sif, tmp_path):
    """A header claiming 350,000 descriptors (a 200 MB table in a sparse file) is refused
    without reading the table: by the reader, and by ``install --sif`` in one line."""
    data = bytearray(small_sif.read_bytes()[:128])
    count = 350_000
    # header: launch[32] magic[10] version[3] arch[3] uuid[16] created modified free total off size ...
    struct.pack_into("<qqqq", data, 80, count, count, 4096, count * 585)
    hostile = tmp_path / "hostile.sif"
    with open(hostile, "wb") as f:
        f.write(data)
        f.truncate(4096 + count * 585 + 4096)
    tracemalloc.start()
    try:
        with pytest.raises(SifError) as info:
            read_sif(hostile)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(hostile) in one_line(info.value) and "descriptors" in str(info.value)
    assert peak < 8 << 20
    site.write_recipe("app", "name: app\nimage: docker.io/library/demo\ndescription: d\nversions:\n  '1.0': '1.0'\n")
    assert_one_line(site.cli("install", "app:1.0", "--sif", str(hostile)), str(hostile), "descriptors")
    assert not (site.root / "modules").exists()


def test_sif_header_layout_used_above(small_sif):
    image = read_sif(small_sif)
    raw = small_sif.read_bytes()[:128]
    free, total, offset, size = struct.unpack_from("<qqqq", raw, 80)
    assert (free, total, offset) == (image.header.descriptors_free, image.header.descriptors_total,
                                     image.header.descriptors_offset)
    assert size == image.header.descriptors_size
    assert image.descriptors[0].data_type == DataType.DEFFILE


# --- config files and values ---------------------------------------------------------------------

def config_env(tmp_path: Path, **extra: str) -> dict:
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "SHPC_LITE_SYSTEM_CONFIG": str(tmp_path / "none.yaml"),
            "SHPC_LITE_ROOT": str(tmp_path / "root"), **extra}


@pytest.mark.parametrize("env, message", [
    ({"SHPC_LITE_LOCK_LEASE": "0"}, "lock_lease: 0 is too small"),
    ({"SHPC_LITE_LOCK_LEASE": "-1"}, "lock_lease: -1 is too small"),
    ({"SHPC_LITE_TIMEOUT": "0"}, "timeout: 0 is too small"),
    ({"SHPC_LITE_ROOT": ""}, "env SHPC_LITE_ROOT: root: is empty"),
    ({"SHPC_LITE_ROOT": "  "}, "root: is empty"),
])
def test_bad_config_values(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        load_config({}, config_env(tmp_path, **env))


def test_relative_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config({}, config_env(tmp_path, SHPC_LITE_ROOT="rel/root"))
    assert config["root"] == str(tmp_path / "rel" / "root")


@pytest.mark.parametrize("content, message", ids=["not-utf8", "deep"], argvalues=[
    (b"root: /tmp/\xff\xfe\n", "not UTF-8"),
    (b"jobs: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
])
def test_unreadable_config_file(tmp_path, content, message):
    path = tmp_path / "xdg" / "shpc-lite" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config({}, config_env(tmp_path))
    assert str(path) in one_line(info.value) and message in str(info.value)


def test_cli_config_errors_are_one_line(site):
    assert_one_line(site.cli("list", extra_env={"SHPC_LITE_ROOT": ""}), "SHPC_LITE_ROOT", "empty")
    assert_one_line(site.cli("list", extra_env={"SHPC_LITE_LOCK_LEASE": "0"}), "lock_lease")
    assert not any(Path(site.tmp).glob("modules"))


def test_a_lock_file_too_deep_for_the_parser_is_one_line(site):
    site.root.mkdir(parents=True)
    (site.root / "shpc-lite.lock").write_text("[" * DEEP + "]" * DEEP)
    assert_one_line(site.cli("check"), "nested too deeply", "shpc-lite.lock")


# --- site manifests ------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", ids=[
    "versions-number", "versions-string", "versions-map", "version-list", "name-list", "not-utf8", "deep",
], argvalues=[
    (b"modules:\n  - name: app\n    versions: 1.0\n", "versions must be a list"),
    (b"modules:\n  - name: app\n    versions: '1.0'\n", "versions must be a list"),
    (b"modules:\n  - name: app\n    versions: {a: 1}\n", "versions must be a list"),
    (b"modules:\n  - name: app\n    versions: [[1]]\n", "invalid version"),
    (b"modules:\n  - name: [app]\n", "invalid module name"),
    (b"modules:\n  - app:1.\xff\n", "not UTF-8"),
    (b"modules: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
])
def test_bad_site_manifest(tmp_path, content, message):
    path = tmp_path / "site.yaml"
    path.write_bytes(content)
    with pytest.raises(SiteError) as info:
        load_manifest(path)
    assert str(path) in one_line(info.value) and message in str(info.value)


def test_batch_with_bad_manifest_is_one_line(site, tmp_path):
    path = tmp_path / "site.yaml"
    path.write_bytes(b"modules:\n  - name: app\n    versions: 1.0\n")
    assert_one_line(site.cli("batch", "install", str(path)), str(path), "versions")
    assert site.files() == set()


def test_printable_escapes_controls_only():
    assert printable("caf\u00e9 \u4e2d ok") == "caf\u00e9 \u4e2d ok"
    assert printable("a\x1b[0mb\x00\x7f\x9b\u2066") == "a\\x1b[0mb\\x00\\x7f\\x9b\\u2066"
