"""A site's whole stack: a manifest of modules, planned, installed concurrently, kept in sync.

The manifest (docs/site.md) lists entries such as ``python:3.11`` or ``pytorch`` (every version
the lock or the recipe offers), or maps with per-entry overrides. ``plan`` turns it into tasks
without touching anything; ``run`` carries them out with a bounded pool, one failure never
stopping the others.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from shpc_lite.config import Config
from shpc_lite.errors import ShpcLiteError, SiteError
from shpc_lite.recipe import SAFE_NAME, SAFE_VERSION, Recipe

if TYPE_CHECKING:
    from shpc_lite.choice import ImageChoice
    from shpc_lite.install import Prepared

ENTRY_KEYS = {"name", "versions", "newest", "bind", "default", "sif"}
# Seconds a batch waits for more pulls to finish before writing the modules it has ready.
FLUSH_AFTER = 0.5


@dataclass(frozen=True)
class Entry:
    name: str
    versions: tuple[str, ...] = ()  # empty: all versions offered
    newest: Optional[int] = None  # keep only the N newest of those
    bind: tuple[str, ...] = ()
    default: Optional[str] = None
    sif: Optional[str] = None  # install from this SIF file (as ``install --sif``), not the registry

    @property
    def label(self) -> str:
        return self.name + (":" + ",".join(self.versions) if self.versions else "")


@dataclass(frozen=True)
class Task:
    """One module version to have installed."""

    name: str
    version: str
    tag: str
    digest: Optional[str]
    image: str
    bind: tuple[str, ...] = ()
    default: bool = False
    sif: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def choice(self) -> "ImageChoice":
        from shpc_lite.choice import choose

        return choose(self.version, self.image, self.tag, self.digest)


@dataclass
class Outcome:
    task: Optional[Task]
    label: str
    status: str  # installed | updated | unchanged | failed | would-install | would-update
    detail: str = ""
    seconds: float = 0.0
    size: Optional[int] = None

    def to_json(self) -> dict:
        return {"module": self.label, "status": self.status, "detail": self.detail,
                "seconds": round(self.seconds, 3), "bytes": self.size}


@dataclass
class Plan:
    tasks: list[Task] = field(default_factory=list)
    errors: list[Outcome] = field(default_factory=list)


def load_manifest(path: Path) -> list[Entry]:
    from shpc_lite.yamlio import YamlRefused, load

    path = Path(path)
    try:
        data = load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SiteError(f"{path}: cannot read manifest: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise SiteError(f"{path}: manifest is not UTF-8 text (byte {err.start})") from None
    except YamlRefused as err:
        raise SiteError(f"{path}:{f' line {err.line}:' if err.line else ''} malformed YAML: {err.problem}") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
        raise SiteError(f"{path}: expected a mapping with a 'modules' list")
    unknown = set(data) - {"modules"}
    if unknown:
        raise SiteError(f"{path}: unknown field {sorted(unknown)[0]!r}")
    entries = []
    for i, item in enumerate(data["modules"]):
        where = f"{path}: modules[{i}]"
        if isinstance(item, str):
            name, _, version = item.partition(":")
            item = {"name": name, **({"versions": [version]} if version else {})}
        if not isinstance(item, dict):
            raise SiteError(f"{where}: expected NAME[:VERSION] or a mapping")
        extra = set(item) - ENTRY_KEYS
        if extra:
            raise SiteError(f"{where}: unknown field {sorted(extra)[0]!r}")
        name = item.get("name", "")
        if not isinstance(name, str) or not SAFE_NAME.match(name):
            raise SiteError(f"{where}: invalid module name {name!r}")
        versions = _versions(item.get("versions"), where)
        newest = item.get("newest")
        if newest is not None and (not isinstance(newest, int) or isinstance(newest, bool) or newest < 1):
            raise SiteError(f"{where}: newest must be a whole number >= 1")
        bind = item.get("bind") or []
        if not isinstance(bind, list) or not all(isinstance(b, str) and b for b in bind):
            raise SiteError(f"{where}: bind must be a list of paths")
        default = item.get("default")
        sif = item.get("sif")
        if sif is not None and (not isinstance(sif, str) or not sif.endswith(".sif")):
            raise SiteError(f"{where}: sif must be the path of a .sif file")
        if sif is not None:
            sif = str((path.parent / Path(sif).expanduser()))
        entries.append(Entry(name, versions, newest, tuple(bind), None if default is None else str(default), sif))
    return entries


def _versions(value: Any, where: str) -> tuple[str, ...]:
    """An entry's ``versions``: a list of version strings. A bare ``versions: 3.10`` is refused
    rather than guessed at: YAML reads it as the number 3.1."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SiteError(f"{where}: versions must be a list of version strings, e.g. versions: ['3.10'], "
                        f"not {value!r}")
    versions = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise SiteError(f"{where}: invalid version {v!r} (a version is a string)")
        if not SAFE_VERSION.match(str(v)):
            raise SiteError(f"{where}: invalid version {str(v)!r}")
        versions.append(str(v))
    return tuple(versions)


def plan(config: Config, entries: list[Entry]) -> Plan:
    """Tasks for every entry; an entry that cannot be planned becomes a failed outcome."""
    from shpc_lite.install import choose_version
    from shpc_lite.lock import load_lock
    from shpc_lite.versions import version_key
    from shpc_lite.recipe import recipe_index

    index = recipe_index(config)
    lock = load_lock(config.layout.lock_file)
    result = Plan()
    for entry in entries:
        try:
            recipe = index.get(entry.name)
            offered = {p.version for p in recipe.versions}
            if lock is not None:
                offered |= set(lock.versions(recipe.name))
            versions = list(entry.versions) or sorted(offered, key=version_key, reverse=True)
            if entry.newest:
                versions = sorted(versions, key=version_key, reverse=True)[: entry.newest]
            if entry.default and entry.default not in versions:
                raise SiteError(f"{entry.name}: default {entry.default!r} is not among the versions installed")
            for version in versions:
                if entry.sif:  # the tag the recipe pins is recorded, as ``install --sif`` does
                    pin = recipe.version(version)
                    result.tasks.append(Task(recipe.name, version, pin.tag, None, recipe.image, entry.bind,
                                             default=entry.default == version, sif=entry.sif))
                    continue
                choice = choose_version(config, recipe, version)
                result.tasks.append(Task(recipe.name, choice.version, choice.tag, choice.digest, recipe.image,
                                         entry.bind, default=entry.default == choice.version))
        except ShpcLiteError as err:
            result.errors.append(Outcome(None, entry.label, "failed", str(err)))
    return result


def _recipe_for(config: Config, task: Task) -> Recipe:
    from shpc_lite.recipe import recipe_index

    recipe = recipe_index(config).get(task.name)
    return dataclasses.replace(recipe, bind=recipe.bind + task.bind) if task.bind else recipe


def current_state(config: Config, task: Task, digest: Optional[str], image: Optional[str] = None) -> str:
    """'unchanged' when this version is installed from the same tag (and digest, when known; the
    same stored image, by file name in this or the central store, for a task from a SIF file)."""
    from shpc_lite.modules import installed

    for record in installed(config.layout, task.name):
        if record.version == task.version:
            same = record.tag == task.tag and (digest is None or record.digest == digest)
            same = same and (image is None or Path(record.sif).name == image)
            return "unchanged" if same and Path(record.sif).exists() else "update"
    return "install"


def _pinned(task: Task, client) -> "ImageChoice":
    """The task's image with its digest, asking the registry when neither lock nor pin said."""
    choice = task.choice
    return choice if choice.digest else dataclasses.replace(choice, digest=client.head_digest(choice.ref))


@dataclass
class _Ready:
    """A task whose image is stored, waiting for its chunk to be written."""

    task: Task
    prepared: "Prepared"
    state: str  # install | update
    start: float


def prepare_task(config: Config, task: Task, client, quiet: bool = True) -> "Outcome | _Ready":
    """Pull (once, under the store's lock) or import the task's image and make the module's
    spec; an Outcome when there is nothing to write (unchanged, failed). Never raises
    ShpcLiteError."""
    from shpc_lite.install import prepare_sif, prepare_version

    start = time.monotonic()
    try:
        recipe = _recipe_for(config, task)
        if task.sif is not None:
            state = current_state(config, task, None, _sif_image(config, task.sif))
            if state == "unchanged":
                return Outcome(task, task.label, "unchanged", "", time.monotonic() - start)
            prepared = prepare_sif(config, recipe, task.version, Path(task.sif), default=task.default)
        else:
            choice = _pinned(task, client)
            state = current_state(config, task, choice.digest)
            if state == "unchanged":
                return Outcome(task, task.label, "unchanged", "", time.monotonic() - start)
            prepared = prepare_version(config, recipe, choice, quiet=quiet, client=client, default=task.default)
        return _Ready(task, prepared, state, start)
    except ShpcLiteError as err:
        return Outcome(task, task.label, "failed", str(err), time.monotonic() - start)


def _sif_image(config: Config, sif: str) -> Optional[str]:
    """The file name the store gives a SIF file's copy (from the file's digest, read once per
    file and batch however many tasks name it); None when the file cannot be read."""
    from shpc_lite.fsutil import identity
    from shpc_lite.store import file_digest

    key = identity(sif)
    try:
        if key is None:
            return None
        if key not in _DIGESTS:
            _DIGESTS[key] = file_digest(Path(sif))
        return config.layout.image(_DIGESTS[key], imported=True).name
    except OSError:
        return None


_DIGESTS: dict[tuple, str] = {}


def write_ready(config: Config, ready: list[_Ready]) -> list[Outcome]:
    """Write the modules of ready tasks together (one flush barrier, defaults once per name)."""
    from shpc_lite.install import commit

    outcomes = []
    for item, done in zip(ready, commit(config, [r.prepared for r in ready])):
        seconds = time.monotonic() - item.start
        if done.error is None:
            status = "installed" if item.state == "install" else "updated"
            outcomes.append(Outcome(item.task, item.task.label, status, str(done.prepared.image), seconds))
        elif isinstance(done.error, ShpcLiteError):
            outcomes.append(Outcome(item.task, item.task.label, "failed", str(done.error), seconds))
        elif isinstance(done.error, OSError):
            outcomes.append(Outcome(item.task, item.task.label, "failed",
                                    f"writing {item.task.label}: {done.error}", seconds))
        else:
            raise done.error
    return outcomes


def run(config: Config, the_plan: Plan, *, jobs: int, quiet: bool = True,
        on_done: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Carry out a plan: images pulled by a pool of ``jobs``, modules written in chunks of up
    to config ``batch_chunk`` (one flush barrier each; a chunk is written as soon as it is full
    or no pull has finished for FLUSH_AFTER seconds). Outcomes come in plan order."""
    client = None
    if any(t.sif is None for t in the_plan.tasks):  # a batch of SIF files needs no registry client
        from shpc_lite.resolve import client_from_config

        client = client_from_config(config)
    chunk = config["batch_chunk"]
    order = {id(t): i for i, t in enumerate(the_plan.tasks)}
    outcomes: list[Outcome] = []

    def finished(done: list[Outcome]) -> None:
        outcomes.extend(done)
        for outcome in done:
            if on_done:
                on_done(outcome)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending = {pool.submit(prepare_task, config, t, client, quiet) for t in the_plan.tasks}
        ready: list[_Ready] = []
        while pending:
            done, pending = wait(pending, timeout=FLUSH_AFTER, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: order[id(_task_of(f.result()))]):
                step = future.result()
                if isinstance(step, Outcome):
                    finished([step])
                else:
                    ready.append(step)
            while len(ready) >= chunk or (ready and (not done or not pending)):
                finished(write_ready(config, ready[:chunk]))
                ready = ready[chunk:]
    outcomes.sort(key=lambda o: order[id(o.task)])
    return list(the_plan.errors) + outcomes


# A batch is split over worker processes only when each gets at least this many manifest
# entries (forking and returning results cost about as much as writing a few modules).
MIN_SHARD = 16


def shards(entries: list[Entry], count: int, minimum: int = MIN_SHARD) -> list[list[Entry]]:
    """``entries`` split into at most ``count`` shards of at least ``minimum`` entries, by
    module name (every entry of a name in one shard: one process writes a name's files and its
    defaults), balanced by the number of entries. One shard when the batch is too small."""
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.name, []).append(entry)
    count = max(1, min(count, len(groups), len(entries) // max(1, minimum)))
    parts: list[list[Entry]] = [[] for _ in range(count)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(parts, key=len).extend(group)
    return [p for p in parts if p] or [list(entries)]


def install(config: Config, entries: list[Entry], *, jobs: int, quiet: bool = True) -> list[Outcome]:
    """Plan and run ``entries``; a large batch split by module name over worker processes
    (config ``batch_workers``, 0: one per usable core; shpc_lite.workers), the pulls' ``jobs``
    shared among them. Outcomes in manifest order."""
    from shpc_lite.workers import map_forked, usable_cores

    explicit = config["batch_workers"]
    # auto: one per core, and never more than --jobs (the most pulls the admin wants at once)
    parts = shards(entries, explicit or min(usable_cores(), jobs), minimum=1 if explicit else MIN_SHARD)
    share = max(1, jobs // len(parts))

    if len(parts) > 1:  # processes sharing a terminal: bars would overwrite each other's lines
        from shpc_lite.progress import plain_lines

        plain_lines()  # here, and so in every worker forked from here

    def one(part: list[Entry]) -> list[Outcome]:
        return run(config, plan(config, part), jobs=share, quiet=quiet)

    def lost(part: list[Entry], reason: str) -> list[Outcome]:
        return [Outcome(None, e.label, "failed", reason) for e in part]

    results = map_forked(one, parts, lost)
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        first.setdefault(entry.name, i)
    merged = [(first.get(_name_of(o), 0), j, o) for part in results for j, o in enumerate(part)]
    return [o for _, _, o in sorted(merged, key=lambda m: m[:2])]


def _name_of(outcome: Outcome) -> str:
    return outcome.task.name if outcome.task is not None else outcome.label.split(":")[0]


def _task_of(step: "Outcome | _Ready") -> Task:
    assert step.task is not None
    return step.task


def dry_run(config: Config, the_plan: Plan, *, jobs: int) -> list[Outcome]:
    """What ``run`` would do: read-only registry queries for digests and sizes, nothing written."""
    from shpc_lite.puller import find_stored
    from shpc_lite.resolve import client_from_config

    client = client_from_config(config) if any(t.sif is None for t in the_plan.tasks) else None

    def look(task: Task) -> Outcome:
        try:
            if task.sif is not None:
                state = current_state(config, task, None, _sif_image(config, task.sif))
                if state == "unchanged":
                    return Outcome(task, task.label, "unchanged")
                return Outcome(task, task.label, f"would-{state}", f"from {task.sif}")
            choice = _pinned(task, client)
            state = current_state(config, task, choice.digest)
            if state == "unchanged":
                return Outcome(task, task.label, "unchanged")
            size = None
            detail = "module only (image already stored)" if find_stored(config, choice.digest) else "pull"
            if detail == "pull":
                size = client.resolve_image(choice.ref.with_digest(choice.digest)).size
            return Outcome(task, task.label, f"would-{state}", detail, size=size)
        except ShpcLiteError as err:
            return Outcome(task, task.label, "failed", str(err))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(the_plan.errors) + list(pool.map(look, the_plan.tasks))


def unlisted(config: Config, outcomes: list[Outcome]) -> list:
    """Installed records that the manifest no longer asks for (what ``sync`` removes), from the
    outcomes of planning (and running) it: a name whose entry could not be planned keeps all
    its versions."""
    from shpc_lite.modules import installed

    wanted = {(o.task.name, o.task.version) for o in outcomes if o.task is not None}
    failed_names = {_name_of(o) for o in outcomes if o.task is None}
    return [r for r in installed(config.layout)  # a venv module is its user's, not the manifest's
            if (r.name, r.version) not in wanted and r.name not in failed_names and not r.venv]


def summary_table(outcomes: list[Outcome]) -> str:
    width = max([len(o.label) for o in outcomes] + [6])
    lines = [f"{'module':<{width}}  {'status':<14} {'time':>7}  detail"]
    for o in outcomes:
        size = f" ({o.size / 1e6:.1f} MB)" if o.size else ""
        lines.append(f"{o.label:<{width}}  {o.status:<14} {o.seconds:>6.1f}s  {o.detail}{size}")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def outcomes_json(outcomes: list[Outcome]) -> str:
    return json.dumps([o.to_json() for o in outcomes], indent=2)


def task_to_json(task: Task) -> dict:
    return dataclasses.asdict(task)


def task_from_json(data: dict[str, Any]) -> Task:
    data = dict(data)
    data["bind"] = tuple(data.get("bind", ()))
    return Task(**data)

