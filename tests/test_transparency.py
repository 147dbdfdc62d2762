"""Issue 10, "What it must show": a command run through a module's wrapper behaves as if run on the
host: same directory, home and binds, exit status (signals as 128+n), stdin/stdout/stderr (50 MB
byte-identical), signals reaching the process, recipe env and SHPC_LITE_RUNTIME_OPTS, argv byte-exact,
under srun, sbatch --wrap, mpirun and dash.

The image (a static busybox, tests/test_container_runs.py) is pushed to the real test registry and
installed with the builtin puller, once per runtime kind and module system (module-scoped), then
loaded with real Lmod and real Environment Modules.

- charliecloud: nothing is stood in: the generated wrapper mounts the SIF with squashfuse and execs
  the real ch-run (Debian charliecloud-runtime).
- apptainer, singularity: Apptainer is not packaged for Debian 12, so the runtime is a stand-in,
  tests/runtime_apptainer.sh, that implements the options the wrappers use (-B, --pwd, --home,
  --no-home, --env, <KIND>ENV_ prefixes; --nv/--rocm recorded) and really runs the SIF, mounted with
  squashfuse, under ch-run. Everything before its exec is shpc-lite's own output.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chenv import charliecloud_env, release_mounts
from tests.modsys import have, preamble, run_bash
from tests.needs import need_system, need_tools, requires
from tests.test_container_runs import BUSYBOX, busybox_image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("charliecloud", "apptainer", "singularity")
SYSTEMS = ("lmod", "tcl")
MOTD = "hello from inside the image"
GREETING = 'hi "there" $HOME'
OPTS = {"charliecloud": "--set-env=EXTRA=1", "apptainer": "--env EXTRA=1", "singularity": "--env EXTRA=1"}
OVERRIDE = {"charliecloud": "--set-env=GREETING=mine", "apptainer": "--env GREETING=mine",
            "singularity": "--env GREETING=mine"}

pytestmark = [
    requires(shutil.which("ch-run") and shutil.which("squashfuse") and shutil.which("flock")
             and shutil.which("fusermount3"),
             reason="Charliecloud (ch-run), squashfuse, fuse3 or flock not installed (.ci/run installs them)"),
    requires(BUSYBOX.is_file(), reason="busybox-static not installed (.ci/run installs it)"),
    requires(os.geteuid() == 0 and os.path.exists("/dev/fuse"), reason="squashfuse needs root and /dev/fuse"),
    requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed"),
    requires(have("lmod"), reason="Debian lmod not installed"),
]


@dataclass
class Install:
    kind: str
    system: str
    root: Path
    env: dict

    def wrapper(self, name: str = "bsh") -> str:
        return str(self.root / "wrappers" / "tiny" / "1.0" / "bin" / name)


class World:
    """One pushed image, host dirs outside /tmp (so binding them is real), one install per kind x system."""

    def __init__(self, registry, base: Path):
        self.registry = registry
        self.base = base
        self.repo = f"transparency/busybox-{os.getpid()}"
        registry.pusher().push_image(self.repo, busybox_image(), tags=["1.0"])
        self.home = Path(tempfile.mkdtemp(prefix="shpc-lite-home-", dir="/home"))
        self.outside = Path(tempfile.mkdtemp(prefix="shpc-lite-work-", dir="/var/tmp"))
        self.work = self.outside / "work dir"
        self.work.mkdir()
        (self.work / "data.txt").write_text("from the work dir\n")
        (self.home / "home.txt").write_text("from the home dir\n")
        self.cfg_bind = base / "cfg-bind"
        self.recipe_bind = base / "recipe-bind"
        for path, text in ((self.cfg_bind, "config bind"), (self.recipe_bind, "recipe bind")):
            path.mkdir()
            (path / "seen.txt").write_text(text + "\n")
        self.bin = base / "bin"
        self.bin.mkdir()
        for name in ("apptainer", "singularity"):
            shutil.copy(HERE / "runtime_apptainer.sh", self.bin / name)
        self.mounts = base / "mounts"  # the charliecloud wrapper's and the stand-in's mounts
        self.mounts.mkdir()
        self.installs: dict[tuple[str, str], Install] = {}

    def install(self, kind: str, system: str) -> Install:
        if (kind, system) in self.installs:
            return self.installs[(kind, system)]
        top = self.base / f"{kind}-{system}"
        recipes = top / "recipes"
        recipes.mkdir(parents=True)
        (recipes / "tiny.yaml").write_text(
            f"name: tiny\nimage: {self.registry.host}/{self.repo}\ndescription: test image\n"
            "versions:\n  '1.0': '1.0'\n"
            "aliases:\n  motd: cat /etc/motd\n  bsh: /bin/sh\n  bcat: /bin/cat\n"
            "features:\n  gpu: nvidia\n"
            f"env:\n  GREETING: '{GREETING}'\n"
            f"bind:\n  - '{self.recipe_bind}:/srv/recipe'\n")
        env = charliecloud_env(
            top, recipes, home=self.home, mounts=self.mounts, bin_dir=self.bin,
            SHPC_LITE_MODULE_SYSTEM=system,
            SHPC_LITE_RUNTIME="ch-run" if kind == "charliecloud" else str(self.bin / kind),
            SHPC_LITE_BIND_PATHS=f"{self.cfg_bind}:/mnt/cfg",
            SHPC_LITE_TEST_GPU_RECORD=str(top / "gpu-record"))
        proc = subprocess.run([sys.executable, "-m", "shpc_lite", "install", "tiny:1.0"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        self.installs[(kind, system)] = Install(kind, system, top / "root", env)
        return self.installs[(kind, system)]

    def live_mounts(self) -> list[str]:
        base = str(self.base)
        return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1].startswith(base)]

    def wait_unmounted(self, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while self.live_mounts() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.live_mounts()

    def close(self) -> None:
        release_mounts(self.base)
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.outside, ignore_errors=True)


@pytest.fixture(scope="module")
def world(registry, tmp_path_factory):
    w = World(registry, tmp_path_factory.mktemp("transparency"))
    try:
        yield w
    finally:
        w.close()


def _install(world, kind, system) -> Install:
    need_system(system)
    return world.install(kind, system)


# ---------------------------------------------------------------------------- through module load

SESSION = r"""
set -u
module use "$ROOT/modules"
module load tiny
cd "$WORK"
bsh -c 'echo "pwd=$(pwd)"; echo "home=$HOME"; cat "$HOME/home.txt" data.txt /mnt/cfg/seen.txt /srv/recipe/seen.txt
        echo "greeting=$GREETING"; echo "path=$PATH"; echo "extra=${EXTRA-unset}"'
motd
echo "in tmp" >"$OUT/here.txt"
(cd "$OUT" && bsh -c 'echo "tmp=$(pwd)"; cat here.txt')
(cd / && bsh -c 'echo "root=$(pwd)"')
HOSTVAR='from  the host' bsh -c 'echo "hostvar=$HOSTVAR"'
for n in 0 1 42 255; do bsh -c "exit $n"; echo "status=$?"; done
bsh -c 'kill -TERM $$'; echo "status=$?"
bsh -c 'kill -KILL $$'; echo "status=$?"
printf 'line one\nline two\n' | bsh -c 'while read -r line; do echo "stdin=$line"; done'
bsh -c 'echo to-out; echo to-err >&2' >"$OUT/out" 2>"$OUT/err"; echo "out=$(cat "$OUT/out") err=$(cat "$OUT/err")"
echo "blob=$(cat "$OUT/blob" | bcat | sha256sum)"
SHPC_LITE_RUNTIME_OPTS="$OPTS" bsh -c 'echo "extra=${EXTRA-unset}"'
SHPC_LITE_RUNTIME_OPTS="$OVERRIDE" bsh -c 'echo "greeting=$GREETING"'
tiny-shell -c 'echo "shell=$0 $#" "$@"' a 'b c'
tiny-exec cat /etc/motd
tiny-run echo 'run=two  spaces'
dash -c 'bsh -c "echo dash=\$(pwd) \$(cat /etc/motd)"'
mpirun -np 2 bsh -c 'echo "rank=$PMI_RANK $(cat /etc/motd) $(pwd)"' | sort
echo done
"""


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("blob") / "blob"
    data = os.urandom(50 * 1024 * 1024)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("kind", KINDS)
def test_module_alias_is_transparent(world, blob, kind, system, tmp_path):
    """cwd, home, binds, env, exit status, stdin/stdout/stderr, 50 MB through cat, runtime options,
    dash and mpirun: one shell session through `module load` and the aliases."""
    need_tools("mpirun", "dash", "sha256sum")
    inst = _install(world, kind, system)
    (tmp_path / "blob").symlink_to(blob[0])
    env = {**inst.env, "ROOT": str(inst.root), "WORK": str(world.work), "OUT": str(tmp_path), "OPTS": OPTS[kind],
           "OVERRIDE": OVERRIDE[kind]}
    proc = run_bash(system, SESSION, env, timeout=120)
    out = proc.stdout.decode().splitlines()
    assert proc.returncode == 0 and out[-1:] == ["done"], proc.stdout.decode() + proc.stderr.decode()
    assert out == [
        f"pwd={world.work}", f"home={world.home}",  # the caller's directory and home, same paths
        "from the home dir", "from the work dir", "config bind", "recipe bind",
        f"greeting={GREETING}", "path=/bin",  # recipe env byte-exact, image env
        "extra=unset",
        MOTD,
        f"tmp={tmp_path}", "in tmp",  # a cwd under /tmp (the host's /tmp), its files seen
        "root=/",
        "hostvar=from  the host",  # the caller's environment passes
        "status=0", "status=1", "status=42", "status=255", "status=143", "status=137",
        "stdin=line one", "stdin=line two",
        "out=to-out err=to-err",
        f"blob={blob[1]}  -",
        "extra=1",  # SHPC_LITE_RUNTIME_OPTS reached the runtime
        "greeting=mine",  # and override the recipe's env
        "shell=a 1 b c", MOTD, "run=two  spaces",  # the module's shell, exec and run commands
        f"dash={world.work} {MOTD}",
        f"rank=0 {MOTD} {world.work}", f"rank=1 {MOTD} {world.work}",
        "done",
    ]
    assert world.wait_unmounted() == []


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 3), (signal.SIGINT, 4)])
@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("kind", KINDS)
def test_signal_to_the_wrapper_reaches_the_container(world, kind, system, sig, status):
    """A signal sent to the process that ran the alias is caught by the command in the image."""
    inst = _install(world, kind, system)
    script = (preamble(system) + f"module use {inst.root}/modules\nmodule load tiny\ncd \"$HOME\"\n"
              "exec bsh -c 'trap \"echo got TERM; exit 3\" TERM; trap \"echo got INT; exit 4\" INT; "
              "echo ready; while :; do sleep 0.05; done'\n")
    proc = subprocess.Popen(["bash", "--noprofile", "--norc", "-c", script], env=inst.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)  # bounded: a hung start fails, not hangs
        assert ready and proc.stdout.readline() == b"ready\n"
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert (out, proc.returncode) == (f"got {sig.name[3:]}\n".encode(), status), err
    assert world.wait_unmounted() == []


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_always_on_a_gpu_recipe(world, kind):
    """SHPC_LITE_GPU=always: apptainer/singularity are given --nv (the stand-in records it);
    Charliecloud has no GPU option and says so instead of running without the GPU."""
    inst = _install(world, kind, "lmod")
    record = Path(inst.env["SHPC_LITE_TEST_GPU_RECORD"])
    record.unlink(missing_ok=True)
    calls = {mode: subprocess.run([inst.wrapper("motd")], env={**inst.env, "SHPC_LITE_GPU": mode}, cwd=world.home,
                                  capture_output=True, timeout=30) for mode in ("never", "always")}
    assert (calls["never"].returncode, calls["never"].stdout) == (0, MOTD.encode() + b"\n")
    if kind == "charliecloud":
        assert calls["always"].returncode == 125 and b"Charliecloud has no GPU option" in calls["always"].stderr
        assert not record.exists()
    else:
        assert (calls["always"].returncode, calls["always"].stdout) == (0, MOTD.encode() + b"\n")
        assert record.read_text() == "--nv\n"  # once: only the call with always
    assert world.wait_unmounted() == []


# ------------------------------------------------------------------------------ argv, byte-exact

ARG = st.binary(max_size=40).filter(lambda b: b"\0" not in b)


@pytest.mark.parametrize("kind", KINDS)
def test_arguments_arrive_byte_exact(world, kind):
    inst = _install(world, kind, "lmod")

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(args=st.lists(ARG, max_size=6))
    def check(args):
        proc = subprocess.run([inst.wrapper(), "-c", 'for a; do printf "%s\\0" "$a"; done', "sh", *args], env=inst.env,
                              cwd=world.home, capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"".join(a + b"\0" for a in args)

    check()
    assert world.wait_unmounted() == []


ENV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30)


def test_recipe_env_arrives_byte_exact_through_ch_run(world, tmp_path):
    """Recipe env values (through YAML, as a recipe file carries them) reach the command under the
    real ch-run unchanged: quotes, $, backslashes, newlines, non-ASCII."""
    import yaml

    from shpc_lite.config import load_config
    from shpc_lite.modules import make_spec, write_module
    from shpc_lite.recipe import recipe_from_dict

    inst = _install(world, "charliecloud", "lmod")
    sif = next((inst.root / "containers").glob("*.sif"))
    config = load_config({"root": str(tmp_path / "root"), "runtime": "ch-run"}, environ={})

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(value=ENV_TEXT)
    def check(value):
        data = {"name": "envy", "image": "example.org/envy", "description": "x", "versions": {"1.0": "1.0"},
                "aliases": {"show": ["/bin/sh", "-c", 'printf "%s" "$VALUE"']}, "env": {"VALUE": value}}
        recipe = recipe_from_dict(yaml.safe_load(yaml.safe_dump(data, allow_unicode=True)), "envy.yaml")
        spec = make_spec(recipe, "1.0", "1.0", "", sif, config.layout, config)
        write_module(spec, config.layout, config)
        assert "exec 'ch-run' --env-no-expand" in Path(spec.wrapper_dir, "show").read_text()
        proc = subprocess.run([f"{spec.wrapper_dir}/show"], env=inst.env, cwd=world.home, capture_output=True,
                              timeout=30)
        assert (proc.returncode, proc.stdout) == (0, value.encode()), proc.stderr

    check()
    assert world.wait_unmounted() == []


@pytest.mark.parametrize("kind", KINDS)
def test_recipe_home_path_and_no_home(world, kind, tmp_path):
    """features.home: a path is home inside (Apptainer's --home: seen there, HOME set to it);
    false: the caller's home is not shown (HOME still names it, as with --no-home)."""
    import yaml

    from shpc_lite.config import load_config
    from shpc_lite.modules import make_spec, write_module
    from shpc_lite.recipe import recipe_from_dict

    inst = _install(world, kind, "lmod")
    sif = next((inst.root / "containers").glob("*.sif"))
    (world.outside / "home.txt").write_text("from the recipe's home\n")
    out = {}
    for name, home in (("path", str(world.outside)), ("none", False)):
        config = load_config({"root": str(tmp_path / name), "runtime": inst.env["SHPC_LITE_RUNTIME"]}, environ={})
        data = {"name": "homy", "image": "example.org/homy", "description": "x", "versions": {"1.0": "1.0"},
                "aliases": {"show": ["/bin/sh", "-c", 'echo "$HOME"; cat "$HOME/home.txt" 2>&1']},
                "features": {"home": home}}
        recipe = recipe_from_dict(yaml.safe_load(yaml.safe_dump(data)), "homy.yaml")
        spec = make_spec(recipe, "1.0", "1.0", "", sif, config.layout, config)
        write_module(spec, config.layout, config)
        out[name] = subprocess.run([f"{spec.wrapper_dir}/show"], env=inst.env, cwd="/", capture_output=True,
                                   timeout=30)
    assert (out["path"].returncode, out["path"].stdout.decode()) == (0, f"{world.outside}\nfrom the recipe's home\n"), \
        out["path"].stderr
    none = out["none"].stdout.decode().splitlines()
    assert none[0] == str(world.home) and "from the home dir" not in none[1], out["none"].stderr
    assert world.wait_unmounted() == []


# ------------------------------------------------------------------------------------- Slurm

def test_under_srun_and_sbatch_wrap(world, slurm, tmp_path):
    """Every kind's wrapper under `srun` and `sbatch --wrap` (a /bin/sh job script on the node)."""
    installs = [_install(world, kind, "lmod") for kind in KINDS]
    check = "bsh -c 'echo \"$(pwd) $(cat /etc/motd) $GREETING\"' "
    jobs = {}
    for inst in installs:
        job = subprocess.run(
            ["sbatch", "--parsable", f"--partition={slurm.partition}", f"--chdir={world.work}",
             f"--output={tmp_path}/{inst.kind}.out", "--wrap", check.replace("bsh", inst.wrapper(), 1)],
            env=inst.env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        jobs[inst.kind] = job
    for inst in installs:
        proc = subprocess.run(["srun", f"--partition={slurm.partition}", "--ntasks=1", f"--chdir={world.work}",
                               inst.wrapper(), "-c", 'echo "$(pwd) $(cat /etc/motd) $GREETING"'],
                              env=inst.env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode() == f"{world.work} {MOTD} {GREETING}\n", inst.kind
    states = slurm.wait(list(jobs.values()), timeout=120)
    assert set(states.values()) == {"COMPLETED"}, states
    for kind in jobs:
        assert (tmp_path / f"{kind}.out").read_text() == f"{world.work} {MOTD} {GREETING}\n", kind
    assert world.wait_unmounted() == []


# ------------------------------------------------------------------------ charliecloud mounts

def test_concurrent_calls_share_one_mount(world):
    """20 concurrent calls of one wrapper (and 5 of another of the same image) share one squashfuse
    mount; none is left afterwards; a caller that reads the output to its end is not held up by the
    mount outliving it."""
    inst = _install(world, "charliecloud", "lmod")
    argvs = [[inst.wrapper(), "-c", "sleep 1; cat /etc/motd"]] * 20
    argvs += [[inst.wrapper("tiny-exec"), "/bin/sh", "-c", "sleep 1; cat /etc/motd"]] * 5
    procs = [subprocess.Popen(argv, env=inst.env, cwd=world.home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in argvs]
    try:
        time.sleep(0.5)
        during = world.live_mounts()
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
    assert {r[0] for r in results} == {MOTD.encode() + b"\n"}
    assert len(during) == 1
    assert world.wait_unmounted() == []
    # the mount lingers 3 s after the last call; a caller reading the output to its end returns at once
    env = {**inst.env, "SHPC_LITE_MOUNT_LINGER": "3"}
    started = time.monotonic()
    proc = subprocess.run([inst.wrapper("motd")], env=env, cwd=world.home, capture_output=True, timeout=30)
    took = time.monotonic() - started
    assert proc.stdout == MOTD.encode() + b"\n" and took < 2, (took, proc.stderr)
    assert len(world.live_mounts()) == 1
    assert world.wait_unmounted(timeout=15) == []


def _pids_with(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_a_mount_whose_squashfuse_was_killed_is_replaced(world):
    """squashfuse and the reaper killed (OOM killer, a job's clean-up): the mount is left dead
    ("Transport endpoint is not connected"); the next call mounts again and runs."""
    inst = _install(world, "charliecloud", "lmod")
    env = {**inst.env, "SHPC_LITE_MOUNT_LINGER": "30"}
    first = subprocess.run([inst.wrapper("motd")], env=env, cwd=world.home, capture_output=True, timeout=30)
    assert first.stdout == MOTD.encode() + b"\n", first.stderr
    assert len(world.live_mounts()) == 1
    for pid in _pids_with(str(world.mounts)) + _pids_with(inst.wrapper("motd")):  # squashfuse, reaper
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert len(world.live_mounts()) == 1  # still in the mount table, dead
    again = subprocess.run([inst.wrapper("motd")], env=inst.env, cwd=world.home, capture_output=True, timeout=30)
    assert (again.returncode, again.stdout) == (0, MOTD.encode() + b"\n"), again.stderr
    assert world.wait_unmounted() == []
