"""Issue 11, parts 1 and 2: Jupyter kernels and personal venvs on top of container modules.

Nothing is stood in: a Python image built by the tests from this machine's Debian python3.11
(tests/pyimage.py; one with ipykernel from PyPI, one without) is pushed to the real test registry,
installed with the builtin puller for runtime kind charliecloud, and run by the real ch-run on
the SIF mounted with squashfuse (the generated wrapper does it, as in tests/test_transparency.py).
The kernel is started by jupyter_client's KernelManager from the kernelspec shpc-lite wrote;
modules are loaded with real Lmod and Environment Modules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chenv import charliecloud_env
from tests.modsys import have, run_bash
from tests.needs import need_system, requires
from tests.pyimage import IMAGE_PKG, available

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

pytestmark = [
    requires(shutil.which("ch-run") and shutil.which("squashfuse") and shutil.which("flock")
             and shutil.which("fusermount3"),
             reason="Charliecloud (ch-run), squashfuse, fuse3 or flock not installed (.ci/run installs them)"),
    requires(os.geteuid() == 0 and os.path.exists("/dev/fuse"), reason="squashfuse needs root and /dev/fuse"),
    requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed"),
    requires(available(), reason="Debian python3.11, busybox-static and dpkg are needed for the test image"),
    requires(have("lmod"), reason="Debian lmod not installed"),
]


@dataclass
class Site:
    base: Path
    root: Path
    env: dict
    mounts: Path

    def cli(self, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "shpc_lite", *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=600, cwd=str(self.base))
        if check:
            assert proc.returncode == 0, f"shpc-lite {' '.join(args)}: {proc.stderr}"
        return proc

    def user_env(self, name: str) -> dict:
        """A user of the site: their own HOME and data dir (``--user`` tree), the site's root central."""
        home = self.base / f"home-{name}"
        home.mkdir(exist_ok=True)
        return {"HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share"),
                "XDG_CONFIG_HOME": str(home / ".config")}

    def live_mounts(self) -> list[str]:
        return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1].startswith(str(self.mounts))]

    def wait_unmounted(self, timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while self.live_mounts() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.live_mounts()


@pytest.fixture(scope="module")
def site(python_images, tmp_path_factory):
    """pyk (Python + ipykernel, a python alias, ``jupyter: true``) and pybare (no ipykernel, no
    python alias), installed centrally for Charliecloud in Lmod; pyk also in a Tcl tree."""
    base = tmp_path_factory.mktemp("environments")
    recipes = base / "recipes"
    recipes.mkdir()
    (recipes / "pyk.yaml").write_text(
        f"name: pyk\nimage: {python_images.ipykernel}\ndescription: Python with ipykernel\n"
        "versions:\n  '3.11': '3.11'\naliases:\n  python: /usr/bin/python3.11\nfeatures:\n  jupyter: true\n")
    (recipes / "pybare.yaml").write_text(
        f"name: pybare\nimage: {python_images.bare}\ndescription: Python alone\nversions:\n  '3.11': '3.11'\n")
    mounts = base / "mounts"
    mounts.mkdir()
    env = charliecloud_env(base, recipes, home=base / "home", mounts=mounts)
    (base / "home").mkdir()
    s = Site(base, base / "root", env, mounts)
    s.cli("install", "pyk:3.11")
    s.cli("install", "pybare:3.11")
    try:
        yield s
    finally:
        for mnt in s.live_mounts():
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)


# ------------------------------------------------------------------------------ kernels

def test_kernel_round_trip_runs_in_the_image(site, python_images, tmp_path, monkeypatch):
    """kernel install --prefix, then jupyter_client starts it: code runs in the image, 1+1 is 2,
    a sleeping cell is interrupted, shutdown ends the process and the mount is released."""
    from jupyter_client import KernelManager

    prefix = tmp_path / "prefix"
    out = site.cli("kernel", "install", "pyk", "--prefix", str(prefix), "--name", "pyk-test",
                   "--display-name", 'Py "quoted" \\ name\nline two').stdout
    spec_file = prefix / "share/jupyter/kernels/pyk-test/kernel.json"
    assert str(spec_file.parent) in out
    spec = json.loads(spec_file.read_text())
    assert spec["display_name"] == 'Py "quoted" \\ name\nline two'  # text, exactly
    assert spec["argv"] == [str(site.root / "wrappers/pyk/3.11/bin/python"), "-m", "ipykernel_launcher",
                            "-f", "{connection_file}"]
    listed = json.loads(site.cli("kernel", "list", "--prefix", str(prefix), "--json").stdout)
    assert [(k["name"], k["module"]) for k in listed] == [("pyk-test", "pyk/3.11")]

    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share/jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    km = KernelManager(kernel_name="pyk-test")
    km.start_kernel(env={**site.env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}, cwd=str(tmp_path))
    pid = km.provisioner.pid
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        outputs: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                outputs.append(msg["content"]["text"])
            elif msg["msg_type"] == "execute_result":
                outputs.append("result:" + msg["content"]["data"]["text/plain"])

        code = (f"import sys, {IMAGE_PKG}; print(sys.executable); print(open('/etc/os-release').read().strip()); "
                f"print({IMAGE_PKG}.WHERE)")
        reply = kc.execute_interactive(code, output_hook=hook, timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        reply = kc.execute_interactive("1+1", output_hook=hook, timeout=60)
        assert reply["content"]["status"] == "ok"
        text = "".join(o for o in outputs if not o.startswith("result:"))
        assert text.splitlines() == ["/usr/bin/python3.11", *python_images.os_release.strip().splitlines(),
                                     "only in the image"]
        assert outputs[-1] == "result:2"

        msg_id = kc.execute("import time; time.sleep(60)")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the cell runs before interrupting it
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                break
        time.sleep(0.5)
        started = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 20
        assert kc.execute_interactive("2*21", output_hook=hook, timeout=60)["content"]["status"] == "ok"
        assert outputs[-1] == "result:42"  # the kernel lives on after the interrupt
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert not km.is_alive()
    assert not Path(f"/proc/{pid}").exists()
    assert site.wait_unmounted() == []  # the reaper (its own session) outlived Jupyter's killpg

    removed = site.cli("kernel", "remove", "pyk-test", "--prefix", str(prefix))
    assert "removed kernel pyk-test" in removed.stdout and not spec_file.parent.exists()


def test_kernel_install_user_dir_by_default(site, tmp_path):
    """Without --user or --prefix the kernel goes to Jupyter's user data dir ($JUPYTER_DATA_DIR)."""
    data = tmp_path / "jupyter-data"
    env = {"JUPYTER_DATA_DIR": str(data)}
    site.cli("kernel", "install", "pyk:3.11", "--no-check", env=env)
    assert json.loads((data / "kernels/pyk-3.11/kernel.json").read_text())["metadata"]["shpc-lite"] == {
        "module": "pyk/3.11"}
    assert site.cli("kernel", "list", "--user", env=env).stdout.split("\t")[:2] == ["pyk-3.11", "pyk/3.11"]
    foreign = data / "kernels/python3"
    foreign.mkdir()
    (foreign / "kernel.json").write_text('{"argv": ["python3"], "display_name": "mine"}')
    refused = site.cli("kernel", "remove", "python3", env=env, check=False)
    assert refused.returncode != 0 and "not a kernel shpc-lite wrote" in refused.stderr and foreign.exists()
    refused = site.cli("kernel", "install", "pyk", "--name", "python3", "--no-check", env=env, check=False)
    assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1
    assert json.loads((foreign / "kernel.json").read_text())["display_name"] == "mine"


def test_kernel_refused_without_ipykernel(site, tmp_path):
    """The image without ipykernel (and without a python alias: checked through pybare-exec)."""
    prefix = tmp_path / "prefix"
    proc = site.cli("kernel", "install", "pybare:3.11", "--prefix", str(prefix), check=False)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "has no ipykernel" in proc.stderr
    assert "pybare/3.11" in proc.stderr
    assert not prefix.exists()
    # a container that cannot start is not reported as a missing ipykernel
    broken = site.cli("kernel", "install", "pyk:3.11", "--prefix", str(prefix), check=False,
                      env={"SHPC_LITE_RUNTIME_OPTS": "--no-such-option"})
    assert broken.returncode != 0 and len(broken.stderr.strip().splitlines()) == 1
    assert "could not run the module's python" in broken.stderr and "ipykernel" in broken.stderr
    assert not prefix.exists()
    forced = site.cli("kernel", "install", "pybare:3.11", "--prefix", str(prefix), "--no-check")
    argv = json.loads((prefix / "share/jupyter/kernels/pybare-3.11/kernel.json").read_text())["argv"]
    assert argv[:2] == [str(site.root / "wrappers/pybare/3.11/bin/pybare-exec"), "python3"], forced.stdout


@pytest.mark.parametrize("name", ["../evil", "a/b", "Evil", ".hidden", "a b", "x" * 65, "k\n", ""])
def test_kernel_hostile_name_refused(site, tmp_path, name):
    prefix = tmp_path / "prefix"
    proc = site.cli("kernel", "install", "pyk", "--prefix", str(prefix), "--name", name, "--no-check", check=False)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "invalid kernel name" in proc.stderr
    assert not prefix.exists()


# Run by the test's Python (which has jupyter_client) after `module load`, as a Jupyter started
# from that shell (an Open OnDemand app's script) would: find the kernel, start it, run a cell.
JUPYTER_ELSEWHERE = """
import json
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel

specs = KernelSpecManager().find_kernel_specs()
km, kc = start_new_kernel(kernel_name="pyk-3.11", startup_timeout=120)
out = []
hook = lambda msg: out.append(msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None
reply = kc.execute_interactive("print(open('/etc/os-release').readline().strip())", output_hook=hook, timeout=60)
kc.stop_channels()
km.shutdown_kernel()
print(json.dumps({"specs": specs, "status": reply["content"]["status"], "out": "".join(out)}))
"""


def _pyk_sif(site) -> Path:
    """pyk's stored image, from its record (the store also holds pybare's, in no set order)."""
    return Path(json.loads((site.root / "wrappers/pyk/3.11/install.json").read_text())["sif"])


@pytest.mark.parametrize("system", ["lmod", "tcl"])
def test_jupyter_feature_puts_the_kernel_on_jupyter_path(site, system, tmp_path):
    """``jupyter: true``: after `module load`, jupyter_client finds the module's kernel on
    JUPYTER_PATH and runs it in the image."""
    need_system(system)
    root = site.root if system == "lmod" else tmp_path / "tcl-root"
    if system == "tcl":
        sif = _pyk_sif(site)
        site.cli("--root", str(root), "--module-system", "tcl", "install", "pyk:3.11", "--sif", str(sif))
    (tmp_path / "elsewhere.py").write_text(JUPYTER_ELSEWHERE)
    proc = run_bash(system, f"""
        module use {root}/modules
        module load pyk
        cd {tmp_path}
        echo "$JUPYTER_PATH"
        {sys.executable} elsewhere.py
        """, {**site.env, "JUPYTER_DATA_DIR": str(tmp_path / "nothing"),
              "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    jupyter_path, result = proc.stdout.decode().splitlines()[-2:]
    assert jupyter_path == str(root / "wrappers/pyk/3.11/jupyter")
    result = json.loads(result)
    assert result["specs"]["pyk-3.11"] == str(root / "wrappers/pyk/3.11/jupyter/kernels/pyk-3.11")
    argv = json.loads(Path(result["specs"]["pyk-3.11"], "kernel.json").read_text())["argv"]
    assert argv[0] == str(root / "wrappers/pyk/3.11/bin/python") and os.access(argv[0], os.X_OK)
    assert (result["status"], result["out"]) == ("ok", 'PRETTY_NAME="shpc-lite python test image"\n')
    unloaded = run_bash(system, f"module use {root}/modules\nmodule load pyk\nmodule unload pyk\n"
                                'echo "[${JUPYTER_PATH:-}]"', site.env)
    assert unloaded.stdout.decode().strip() == "[]"


# ------------------------------------------------------------------------------ venvs

def make_wheel(directory: Path) -> Path:
    """thatpkg 1.0, pure Python, with a console script ``thattool`` (built by hand: a wheel is a zip)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "thatpkg-1.0-py3-none-any.whl"
    files = {
        "thatpkg/__init__.py": 'VALUE = "from the wheel"\n\ndef main():\n    print("thattool ran", VALUE)\n',
        "thatpkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: thatpkg\nVersion: 1.0\n",
        "thatpkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "thatpkg-1.0.dist-info/entry_points.txt": "[console_scripts]\nthattool = thatpkg:main\n",
    }
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr("thatpkg-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + "thatpkg-1.0.dist-info/RECORD,,\n")
    return wheel


def _session(site: Site, env: dict, script: str) -> tuple[int, list[str], str]:
    use = site.cli("--user", "use", env=env).stdout
    proc = run_bash("lmod", use + script, {**site.env, **env}, timeout=300)
    return proc.returncode, proc.stdout.decode().splitlines(), proc.stderr.decode()


def test_personal_venvs(site, tmp_path):
    """venv create (user A, under /home: bound into the container), pip install of a local wheel
    through the venv module, imports of it and of an image-only package, a console script after
    a refresh, survival of the base module's reinstall, and user B's venv independent of A's.

    The two users are two HOMEs (two --user trees) of one uid: a real second uid cannot mount
    here (squashfuse needs /dev/fuse, which is 0600 root on the test machines)."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels)
    home_base = Path(tempfile.mkdtemp(prefix="shpc-lite-venvs-", dir="/home"))
    try:
        alice, bob = site.user_env("alice"), site.user_env("bob")
        venv_a = home_base / "shared storage" / "venv-a"  # a space in the path, on purpose
        out = site.cli("--user", "venv", "create", str(venv_a), "--module", "pyk:3.11", env=alice).stdout
        assert "module pyk-venv/3.11" in out
        assert json.loads((venv_a / ".shpc-lite-venv.json").read_text())["module"] == "pyk-venv/3.11"
        assert (venv_a / "pyvenv.cfg").is_file() and "include-system-site-packages = true" in (
            venv_a / "pyvenv.cfg").read_text()
        check = (f"import sys, thatpkg, {IMAGE_PKG}; print(sys.prefix); print(thatpkg.VALUE); "
                 f"print({IMAGE_PKG}.WHERE); print(open('/etc/os-release').readline().strip())")
        status, lines, err = _session(site, alice, f"""
            module load pyk-venv
            cd {tmp_path}
            pip install -q --no-cache-dir --disable-pip-version-check --no-index --find-links {wheels} thatpkg
            python -c "{check}"
            """)
        assert status == 0, err
        assert lines == [str(venv_a), "from the wheel", "only in the image", 'PRETTY_NAME="shpc-lite python test image"']
        assert (venv_a / "lib/python3.11/site-packages/thatpkg/__init__.py").is_file()  # on the host
        # the console script pip just installed: `venv create` again refreshes the module
        assert "thattool" in site.cli("--user", "venv", "create", str(venv_a), "--module", "pyk", env=alice).stdout
        status, lines, err = _session(site, alice, "module load pyk-venv\ncd /\nthattool")
        assert (status, lines) == (0, ["thattool ran from the wheel"]), err

        # a venv module's kernel runs the venv's python in the image (ipykernel from the image)
        kernel_prefix = tmp_path / "kernels"
        site.cli("--user", "kernel", "install", "pyk-venv", "--prefix", str(kernel_prefix), env=alice)
        kernel_argv = json.loads((kernel_prefix / "share/jupyter/kernels/pyk-venv-3.11/kernel.json").read_text())["argv"]
        assert Path(kernel_argv[0]).read_text().count(f"{venv_a}/bin/python") == 1

        # the base module reinstalled by the admin (its image removed, then pulled again): the
        # venv lives outside the container and keeps working
        sif = _pyk_sif(site)
        site.cli("uninstall", "pyk:3.11")
        assert not sif.exists()
        site.cli("install", "pyk:3.11")
        status, lines, err = _session(site, alice, f'module load pyk-venv\ncd /\npython -c "{check}"')
        assert status == 0 and lines[1:3] == ["from the wheel", "only in the image"], err

        # a venv module in the same tree as its image holds the image: uninstalling the base
        # module keeps the SIF, and the venv module runs meanwhile
        venv_c = tmp_path / "venv-central"
        site.cli("venv", "create", str(venv_c), "--module", "pyk")
        manifest = tmp_path / "site.yaml"  # the site's stack: a user's venv module is not its to remove
        manifest.write_text("modules:\n  - pyk:3.11\n  - pybare:3.11\n")
        plan = json.loads(site.cli("batch", "sync", str(manifest), "--dry-run", "--json").stdout)
        assert "pyk-venv/3.11" not in {r["module"] for r in plan}, plan
        site.cli("uninstall", "pyk:3.11")
        assert sif.is_file()
        central = subprocess.run([str(site.root / "wrappers/pyk-venv/3.11/bin/python"), "-c",
                                  f"import sys, {IMAGE_PKG}; print(sys.prefix)"],
                                 env=site.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (central.returncode, central.stdout) == (0, f"{venv_c}\n"), central.stderr
        site.cli("install", "pyk:3.11")
        site.cli("venv", "remove", "pyk-venv", "--delete")
        assert not venv_c.exists() and sif.is_file()  # the reinstalled base module still uses it

        # user B: their own venv and module, nothing of A's
        venv_b = tmp_path / "venv-b"
        site.cli("--user", "venv", "create", str(venv_b), "--module", "pyk", env=bob)
        status, lines, err = _session(site, bob, f"""
            module load pyk-venv
            cd /
            python -c "import sys, {IMAGE_PKG}; print(sys.prefix)"
            python -c "import thatpkg" 2>/dev/null || echo "no thatpkg"
            """)
        assert (status, lines) == (0, [str(venv_b), "no thatpkg"]), err
        listed = json.loads(site.cli("--user", "venv", "list", "--json", env=bob).stdout)
        assert listed == [{"module": "pyk-venv/3.11", "venv": str(venv_b), "base": "pyk/3.11"}]
        assert json.loads(site.cli("--user", "venv", "list", "--json", env=alice).stdout)[0]["venv"] == str(venv_a)

        # remove: the module goes, the venv stays; --delete only for a venv we made
        site.cli("--user", "venv", "remove", "pyk-venv", env=bob)
        assert venv_b.is_dir() and site.cli("--user", "venv", "list", env=bob).stdout == ""
        site.cli("--user", "venv", "create", str(venv_b), "--module", "pyk", env=bob)  # adopted again
        (venv_b / ".shpc-lite-venv.json").write_text('{"module": "other/1"}')
        refused = site.cli("--user", "venv", "remove", "pyk-venv", "--delete", env=bob, check=False)
        assert refused.returncode != 0 and "not deleting it" in refused.stderr and venv_b.is_dir()
        assert json.loads(site.cli("--user", "venv", "list", "--json", env=bob).stdout)  # nothing removed
        site.cli("--user", "venv", "remove", "pyk-venv", "--delete", env=alice)
        assert not venv_a.exists()
        assert (venv_b / "pyvenv.cfg").is_file()
    finally:
        shutil.rmtree(home_base, ignore_errors=True)


def test_venv_create_refuses_a_foreign_directory(site, tmp_path):
    target = tmp_path / "not-a-venv"
    target.mkdir()
    (target / "data.txt").write_text("mine\n")
    env = site.user_env("carol")
    proc = site.cli("--user", "venv", "create", str(target), "--module", "pyk", env=env, check=False)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "not a venv shpc-lite created" in proc.stderr
    assert sorted(p.name for p in target.iterdir()) == ["data.txt"]
    assert not (Path(env["XDG_DATA_HOME"]) / "shpc-lite/modules").exists()


@pytest.mark.parametrize("args", [("--name", "../evil"), ("--name", "a/b/c"), ("--name", "x\ny"),
                                  ("--module", "pyk:../3.11"), ("--module", "no-such-module")])
def test_venv_create_hostile_names_refused(site, tmp_path, args):
    env = site.user_env("dave")
    argv = ["--user", "venv", "create", str(tmp_path / "v"), *(("--module", "pyk") if args[0] == "--name" else ()),
            *args]
    proc = site.cli(*argv, env=env, check=False)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "v").exists()
    assert not (Path(env["XDG_DATA_HOME"]) / "shpc-lite/modules").exists()
