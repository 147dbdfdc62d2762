"""Resolve recipes to (module version, tag, digest), and check what is installed or locked.

A recipe's versions are its pinned ``versions`` plus what its ``select`` rule picks from the
registry's tag list (shpc_lite.tags); a pin wins over the rule for the same module version and
keeps its pinned digest (a registry that now says otherwise is reported, not obeyed). Each distinct
repository's tag list is walked once and each distinct chosen tag is resolved with one HEAD request
(HEADs do not count against Docker Hub's pull limit). Many recipes are resolved at once in one
bounded thread pool (config ``jobs``) sharing one RegistryClient, so connections and tokens are
reused. A failing recipe never stops the others: it becomes a ``ResolveFailure``.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from shpc_lite.errors import ResolveError, ShpcLiteError
from shpc_lite.pool import request_pool
from shpc_lite.lock import Lock, LockedRecipe, LockedVersion, now
from shpc_lite.recipe import Recipe
from shpc_lite.tags import CompiledRule, Decision, explain
from shpc_lite.versions import version_key


def credentials_from_config(config: Any):
    """The registry credentials every command uses, for the client and for ``apptainer pull``:
    a mirror URL's ``user:password@`` for the registry it mirrors, then the environment and
    Apptainer's and Docker's config files. The one place they are looked up."""
    from shpc_lite.oci.client import UrlCredentials, split_userinfo
    from shpc_lite.oci.credentials import DockerCredentials
    from shpc_lite.oci.reference import parse_reference

    in_urls = {}
    for registry, url in config["mirrors"].items():
        cred = split_userinfo(url)[1]
        if cred is not None:
            in_urls[parse_reference(f"{registry}/x").registry] = cred
    provider = DockerCredentials()
    return UrlCredentials(in_urls, provider) if in_urls else provider


def client_from_config(config: Any, **overrides: Any):
    """The RegistryClient every command uses, from config keys mirrors, insecure_registries,
    platform, timeout, retries (and jobs, for its connection pool), with the credentials of
    :func:`credentials_from_config`. Nothing else builds a client."""
    from shpc_lite.oci.client import RegistryClient

    options: dict[str, Any] = dict(
        mirrors=config["mirrors"],
        insecure_registries=config["insecure_registries"],
        platform=config["platform"] or None,
        timeout=float(config["timeout"]),
        retries=config["retries"],
        pool_size=max(16, 2 * int(config["jobs"])),
        credentials=credentials_from_config(config),
    )
    options.update(overrides)
    return RegistryClient(**options)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ResolvedVersion:
    name: str
    version: str
    tag: str
    digest: str
    pinned: bool = False  # from the recipe's ``versions`` (else chosen by its ``select`` rule)


@dataclass(frozen=True)
class ResolvedRecipe:
    name: str
    image: str
    versions: tuple[ResolvedVersion, ...]  # newest first
    warnings: tuple[str, ...] = ()  # e.g. a pinned digest the registry no longer reports
    decisions: tuple[Decision, ...] = ()  # the select rule's verdict on every tag (--explain)

    def to_locked(self, resolved_at: str) -> LockedRecipe:
        return LockedRecipe(
            self.name,
            self.image,
            tuple(LockedVersion(v.version, v.tag, v.digest, resolved_at) for v in self.versions),
        )


@dataclass(frozen=True)
class ResolveFailure:
    name: str
    error: str  # one line, naming the recipe

    def __str__(self) -> str:
        return self.error


@dataclass(frozen=True)
class ResolveResult:
    recipes: tuple[ResolvedRecipe, ...] = ()
    failures: tuple[ResolveFailure, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures

    def locked(self, resolved_at: Optional[str] = None) -> list[LockedRecipe]:
        stamp = resolved_at or now()
        return [r.to_locked(stamp) for r in self.recipes]


def result_to_json(result: ResolveResult, explain_tags: bool = False) -> dict[str, Any]:
    """``{name: {"image", "versions": [{"version", "tag", "digest", "pinned"}], "warnings"}}``;
    a failed recipe is ``{name: {"error": "..."}}``."""
    out: dict[str, Any] = {}
    for r in result.recipes:
        entry: dict[str, Any] = {
            "image": r.image,
            "versions": [{"version": v.version, "tag": v.tag, "digest": v.digest, "pinned": v.pinned} for v in r.versions],
            "warnings": list(r.warnings),
        }
        if explain_tags:
            from shpc_lite.tags import decisions_to_json

            entry["tags"] = decisions_to_json(r.decisions)
        out[r.name] = entry
    for f in result.failures:
        out[f.name] = {"error": f.error}
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# A small scheduler: tag lists and HEADs of many recipes in one bounded pool, each asked once.


class _Requests:
    def __init__(self, client: Any, pool: ThreadPoolExecutor):
        self.client = client
        self.pool = pool
        self.tags: dict[str, Future] = {}
        self.heads: dict[tuple[str, str], Future] = {}
        self.running: set[Future] = set()

    def list_tags(self, image: str) -> Future:
        if image not in self.tags:
            self.tags[image] = self._submit(lambda: self.client.list_tags(_ref(image)))
        return self.tags[image]

    def head(self, image: str, tag: str) -> Future:
        key = (image, tag)
        if key not in self.heads:
            self.heads[key] = self._submit(lambda: self.client.head_digest(_ref(image, tag)))
        return self.heads[key]

    def _submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` in the pool; parsing the reference inside it makes a bad image a failure too."""
        future = self.pool.submit(fn)
        self.running.add(future)
        return future

    def drain(self, on_done: Callable[[Future], None]) -> None:
        """Run until every submitted request is done; ``on_done`` may submit more."""
        while self.running:
            done, self.running = wait(self.running, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(future)


def _ref(image: str, tag: Optional[str] = None):
    from shpc_lite.oci.reference import parse_reference

    return parse_reference(f"{image}:{tag}" if tag else image)


def _why(err: BaseException) -> str:
    if isinstance(err, ShpcLiteError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _status(err: Optional[BaseException]) -> Optional[int]:
    return getattr(err, "status", None)


@dataclass
class _Job:
    recipe: Recipe
    rule: Optional[CompiledRule]
    error: Optional[str] = None
    decisions: tuple[Decision, ...] = ()
    # module version -> (tag, pinned digest or None, pinned?)
    wanted: dict[str, tuple[str, Optional[str], bool]] = field(default_factory=dict)


def resolve(recipes: Sequence[Recipe], client: Any, *, jobs: int = 4) -> ResolveResult:
    """Resolve every recipe; one recipe's error never stops the others."""
    work: list[_Job] = []
    for recipe in recipes:
        job = _Job(recipe, None)
        if recipe.select is not None:
            try:
                job.rule = CompiledRule(recipe.select, recipe.name)
            except ResolveError as err:
                job.error = str(err)
        for pin in recipe.versions:
            job.wanted[pin.version] = (pin.tag, pin.digest, True)
        work.append(job)

    with request_pool(jobs, "resolve") as pool:
        asked = _Requests(client, pool)
        by_tags: dict[Future, list[_Job]] = {}
        for job in work:
            if job.error:
                continue
            if job.rule is not None:
                by_tags.setdefault(asked.list_tags(job.recipe.image), []).append(job)
            for tag, _, _ in job.wanted.values():  # pins need no tag list: ask at once
                asked.head(job.recipe.image, tag)

        def on_done(future: Future) -> None:
            for job in by_tags.get(future, ()):
                err = future.exception()
                if err is not None:
                    job.error = f"{job.recipe.name}: {_why(err)}"
                    continue
                job.decisions = tuple(explain(job.rule, future.result()))
                for d in job.decisions:
                    if d.chosen and d.version not in job.wanted:
                        job.wanted[d.version] = (d.tag, None, False)
                        asked.head(job.recipe.image, d.tag)

        asked.drain(on_done)

    resolved, failures = [], []
    for job in sorted(work, key=lambda j: j.recipe.name):
        outcome = _finish(job, asked.heads) if not job.error else job.error
        if isinstance(outcome, str):
            failures.append(ResolveFailure(job.recipe.name, outcome))
        else:
            resolved.append(outcome)
    return ResolveResult(tuple(resolved), tuple(failures))


def _finish(job: _Job, heads: Mapping[tuple[str, str], Future]) -> ResolvedRecipe | str:
    recipe = job.recipe
    if not job.wanted:
        tags = len(job.decisions)
        return f"{recipe.name}: the select rule chose none of the {tags} tags of {recipe.image} and no versions are pinned"
    versions, warnings = [], []
    for version, (tag, pinned_digest, pinned) in job.wanted.items():
        future = heads[(recipe.image, tag)]
        err = future.exception()
        label = f"{recipe.name} {version}: {'pinned ' if pinned else ''}tag {tag}"
        if err is not None:
            if pinned_digest and _status(err) == 404:
                warnings.append(f"{label} no longer exists in {recipe.image}; keeping the pinned digest")
                versions.append(ResolvedVersion(recipe.name, version, tag, pinned_digest, True))
                continue
            return f"{label}: {_why(err)}"
        digest = future.result()
        if pinned_digest and pinned_digest != digest:
            warnings.append(
                f"{label} is now {digest} in the registry, not the pinned {pinned_digest}; keeping the pin"
            )
            digest = pinned_digest
        versions.append(ResolvedVersion(recipe.name, version, tag, digest, pinned))
    versions.sort(key=lambda v: version_key(v.version), reverse=True)
    return ResolvedRecipe(recipe.name, recipe.image, tuple(versions), tuple(warnings), job.decisions)


# ---------------------------------------------------------------------------------------------
# check: installed and locked digests against the registry, and newer versions by the rule


@dataclass(frozen=True)
class Finding:
    """One thing ``check`` found. ``kind``: up-to-date, repushed, newer, or not-compared."""

    name: str
    version: str
    kind: str
    source: str  # "installed" or "lock"
    tag: str
    recorded: str = ""  # the digest installed or locked
    current: str = ""  # the digest the registry reports now
    detail: str = ""

    @property
    def out_of_date(self) -> bool:
        return self.kind in ("repushed", "newer")


@dataclass(frozen=True)
class CheckReport:
    findings: tuple[Finding, ...] = ()
    failures: tuple[ResolveFailure, ...] = ()

    @property
    def out_of_date(self) -> bool:
        return any(f.out_of_date for f in self.findings)


def check(
    recipes: Mapping[str, Recipe],
    installed: Iterable[Any],
    lock: Optional[Lock],
    client: Any,
    *,
    jobs: int = 4,
) -> CheckReport:
    """Compare installed records (name, version, image, tag, digest) and the lock with the registry.

    Digests are compared with HEAD requests only; newer module versions are what a recipe's select
    rule chooses above the newest one installed (or, when none is installed, locked).
    """
    records: list[tuple[str, str, str, str, str, str]] = []  # name, version, source, image, tag, digest
    for rec in installed:
        records.append((rec.name, rec.version, "installed", rec.image, rec.tag, rec.digest or ""))
    for locked in (lock.recipes if lock else ()):
        for v in locked.versions:
            records.append((locked.name, v.version, "lock", locked.image, v.tag, v.digest))
    names = sorted({r[0] for r in records})
    with request_pool(jobs, "check") as pool:
        asked = _Requests(client, pool)
        for _, _, _, image, tag, digest in records:
            if digest and tag:
                asked.head(image, tag)
        for name in names:
            recipe = recipes.get(name)
            if recipe is not None and recipe.select is not None:
                asked.list_tags(recipe.image)
        asked.drain(lambda future: None)

    findings: list[Finding] = []
    failures: dict[str, list[str]] = {}
    for name, version, source, image, tag, digest in records:
        if not (digest and tag):
            findings.append(Finding(name, version, "not-compared", source, tag, digest,
                                    detail="no registry digest recorded (installed from a SIF file)"))
            continue
        future = asked.heads[(image, tag)]
        err = future.exception()
        if err is not None:
            failures.setdefault(name, []).append(f"{name} {version} ({source}): {_why(err)}")
            continue
        current = future.result()
        kind = "up-to-date" if current == digest else "repushed"
        findings.append(Finding(name, version, kind, source, tag, digest, current))
    for name in names:
        recipe = recipes.get(name)
        if recipe is None or recipe.select is None:
            continue
        future = asked.tags[recipe.image]
        if future.exception() is not None:
            failures.setdefault(name, []).append(f"{name}: {_why(future.exception())}")
            continue
        try:
            chosen = [d for d in explain(CompiledRule(recipe.select, name), future.result()) if d.chosen]
        except ResolveError as err:
            failures.setdefault(name, []).append(str(err))
            continue
        have = {r[1] for r in records if r[0] == name and r[2] == "installed"}
        source = "installed"
        if not have:
            have, source = {r[1] for r in records if r[0] == name}, "lock"
        top = max(have, key=version_key)
        for d in chosen:
            if d.version not in have and version_key(d.version) > version_key(top):
                findings.append(Finding(name, d.version, "newer", source, d.tag,
                                        detail=f"newer than {top} ({source})"))
    order = {"repushed": 0, "newer": 1, "not-compared": 2, "up-to-date": 3}
    findings.sort(key=lambda f: (order[f.kind], f.source))
    findings.sort(key=lambda f: version_key(f.version), reverse=True)
    findings.sort(key=lambda f: f.name)
    return CheckReport(
        tuple(findings),
        tuple(ResolveFailure(n, "; ".join(msgs)) for n, msgs in sorted(failures.items())),
    )


def report_to_json(report: CheckReport) -> dict[str, Any]:
    return {
        "out_of_date": report.out_of_date,
        "findings": [
            {"name": f.name, "version": f.version, "kind": f.kind, "source": f.source, "tag": f.tag,
             "recorded": f.recorded or None, "current": f.current or None, "detail": f.detail or None}
            for f in report.findings
        ],
        "errors": [{"name": f.name, "error": f.error} for f in report.failures],
    }
