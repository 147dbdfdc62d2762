"""Choose module versions from a registry's tag list with a recipe's ``select`` rule.

Pure functions, no network: a tag is parsed by the rule's regex first, and only its ``version``
group (and the other named groups) are compared with ``packaging.version.Version``. Whole tags are
never parsed as versions (``3.11-rc`` would be a pre-release, ``2.2.1-cuda12.1`` is invalid).
See docs/recipes.md, "Choosing versions from tags", for the rules in words.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from shpc_lite.errors import ResolveError
from shpc_lite.recipe import SAFE_VERSION, SelectRule

# cosign signatures, attestations and SBOMs are stored as tags named after the image digest.
SIGNATURE_TAG = re.compile(r"\Asha(?:256|384|512)-[0-9a-fA-F]+\.(?:sig|att|sbom)\Z")  # \Z: no final newline
NEVER = frozenset({"latest"})
PER = {"version": None, "minor": 2, "major": 1}


@dataclass(frozen=True)
class Choice:
    """A module version and the tag it comes from."""

    version: str
    tag: str


@dataclass(frozen=True)
class Decision:
    """What happened to one tag: chosen (as ``version``) or rejected, and why."""

    tag: str
    chosen: bool
    reason: str
    version: Optional[str] = None


def is_signature_tag(tag: str) -> bool:
    return bool(SIGNATURE_TAG.match(tag))


@dataclass(frozen=True)
class _Candidate:
    tag: str
    module: str
    value: Version
    prefer: int  # index of the first matching prefer regex; len(prefer) when none matches
    others: tuple  # the other named groups, as comparable keys, in pattern order


class CompiledRule:
    """A validated ``SelectRule``; every mistake is a ResolveError naming the recipe."""

    def __init__(self, rule: SelectRule, name: str = ""):
        where = f"{name}: select" if name else "select"
        self.rule = rule
        self.pattern = self._compile(rule.pattern, f"{where}.pattern")
        groups = sorted(self.pattern.groupindex.items(), key=lambda item: item[1])
        if "version" not in self.pattern.groupindex:
            raise ResolveError(
                f"{where}.pattern: needs a named group 'version', e.g. '^(?P<version>\\d+\\.\\d+)-suffix$'"
            )
        self.others = tuple(g for g, _ in groups if g != "version")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(rule.version) if f is not None]
        except ValueError as err:
            raise ResolveError(f"{where}.version: invalid template {rule.version!r}: {err}") from None
        for field in fields:
            if field not in self.pattern.groupindex:
                raise ResolveError(
                    f"{where}.version: template {rule.version!r} uses {{{field}}}, "
                    f"which is not a named group of the pattern"
                )
        try:
            self.specifier = SpecifierSet(rule.versions)
        except InvalidSpecifier:
            raise ResolveError(f"{where}.versions: {rule.versions!r} is not a PEP 440 specifier set") from None
        if rule.per not in PER:
            raise ResolveError(f"{where}.per: {rule.per!r} is not one of {', '.join(PER)}")
        if not isinstance(rule.newest, int) or rule.newest < 1:
            raise ResolveError(f"{where}.newest: must be a whole number of at least 1")
        self.prefer = tuple(self._compile(p, f"{where}.prefer") for p in rule.prefer)
        self.exclude = tuple(self._compile(p, f"{where}.exclude") for p in rule.exclude)

    @staticmethod
    def _compile(pattern: str, where: str) -> re.Pattern:
        try:
            return re.compile(pattern)
        except re.error as err:
            raise ResolveError(f"{where}: invalid regular expression {pattern!r}: {err}") from None

    def parse(self, tag: str) -> _Candidate | str:
        """A candidate, or the reason the tag cannot be one."""
        if is_signature_tag(tag):
            return "signature/attestation tag"
        if tag in NEVER:
            return f"{tag!r} is never chosen"
        for regex in self.exclude:
            if regex.search(tag):
                return f"excluded by {regex.pattern!r}"
        match = self.pattern.fullmatch(tag)
        if not match:
            return "does not match the pattern"
        text = match.group("version")
        if not text:
            return "no version in the tag"
        try:
            value = Version(text)
        except InvalidVersion:
            return f"{text!r} is not a valid version"
        if value.is_prerelease:  # also true for dev releases
            return f"{text!r} is a pre-release"
        if not self.specifier.contains(value, prereleases=False):
            return f"{text} is outside versions {str(self.specifier)!r}"
        groups = {k: (v or "") for k, v in match.groupdict().items()}
        module = self.rule.version.format(**groups)
        if not SAFE_VERSION.match(module):
            return f"module version {module!r} has characters that are not allowed"
        prefer = next((i for i, r in enumerate(self.prefer) if r.search(tag)), len(self.prefer))
        others = tuple(_group_key(match.group(g)) for g in self.others)
        return _Candidate(tag, module, value, prefer, others)

    def decide(self, tags: Iterable[str]) -> tuple[list[_Candidate], dict[str, str]]:
        """(chosen candidates newest first, {rejected tag: reason})."""
        rejected: dict[str, str] = {}
        groups: dict[str, list[_Candidate]] = {}
        for tag in sorted(set(tags)):
            parsed = self.parse(tag)
            if isinstance(parsed, str):
                rejected[tag] = parsed
            else:
                groups.setdefault(parsed.module, []).append(parsed)
        winners = []
        for module, cands in groups.items():
            ranked = _rank(cands)
            winners.append(ranked[0])
            for loser in ranked[1:]:
                rejected[loser.tag] = f"{ranked[0].tag} is preferred for module version {module}"
        # Newest module versions first; ties (templates with other groups) by those, then by name.
        winners.sort(key=lambda c: c.module)
        winners.sort(key=lambda c: (c.value, c.others), reverse=True)
        size = PER[self.rule.per]
        if size:
            seen: dict[tuple, _Candidate] = {}
            kept = []
            for cand in winners:
                series = (cand.value.epoch, *(cand.value.release + (0, 0))[:size])
                if series in seen:
                    label = ".".join(map(str, series[1:]))
                    rejected[cand.tag] = f"{seen[series].module} is newer in series {label} (per: {self.rule.per})"
                else:
                    seen[series] = cand
                    kept.append(cand)
            winners = kept
        for cand in winners[self.rule.newest :]:
            rejected[cand.tag] = f"module version {cand.module} is not among the newest {self.rule.newest}"
        return winners[: self.rule.newest], rejected


def _group_key(text: Optional[str]) -> tuple:
    """Compare named groups as versions where they are (cuda 12.10 > 12.9), else as text."""
    if text is None or text == "":
        return (0, Version("0"), "")
    try:
        return (2, Version(text), text)
    except InvalidVersion:
        pass
    digits = re.search(r"\d+(?:\.\d+)*", text)  # 'cudnn9' -> 9
    if digits:
        return (1, Version(digits.group()), text)
    return (0, Version("0"), text)


def _rank(cands: Sequence[_Candidate]) -> list[_Candidate]:
    """Best first: prefer regexes, then the version, then the other groups (higher wins), then the tag."""
    ranked = sorted(cands, key=lambda c: c.tag)
    ranked.sort(key=lambda c: (c.value, c.others), reverse=True)  # stable: ties keep tag order
    ranked.sort(key=lambda c: c.prefer)
    return ranked


def compile_rule(rule: SelectRule, name: str = "") -> CompiledRule:
    return CompiledRule(rule, name)


def select(rule: SelectRule | CompiledRule, tags: Iterable[str], name: str = "") -> list[Choice]:
    """The chosen module versions, newest first."""
    compiled = rule if isinstance(rule, CompiledRule) else CompiledRule(rule, name)
    chosen, _ = compiled.decide(tags)
    return [Choice(c.module, c.tag) for c in chosen]


def explain(rule: SelectRule | CompiledRule, tags: Iterable[str], name: str = "") -> list[Decision]:
    """One decision per distinct tag: chosen ones first (newest first), then the rest by tag."""
    compiled = rule if isinstance(rule, CompiledRule) else CompiledRule(rule, name)
    chosen, rejected = compiled.decide(tags)
    out = [Decision(c.tag, True, f"chosen as module version {c.module}", c.module) for c in chosen]
    out += [Decision(tag, False, reason) for tag, reason in sorted(rejected.items())]
    return out


def decisions_to_json(decisions: Iterable[Decision]) -> list[dict[str, Any]]:
    return [
        {"tag": d.tag, "chosen": d.chosen, "version": d.version, "reason": d.reason} for d in decisions
    ]
