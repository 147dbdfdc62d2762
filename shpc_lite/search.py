"""``shpc-lite search TERM``: recipes and installed modules by name, alias, keyword or package.

Users know the software they want (``torch``), not the image it ships in; each hit says why it
matched so a package hit is not mistaken for a module of that name. Pure functions over
recipes and install records; the CLI does the reading and printing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from shpc_lite.modules import Installed
from shpc_lite.recipe import Recipe, generated_commands


@dataclass(frozen=True)
class Match:
    """One hit: ``kind`` is ``recipe`` or ``module``; ``why`` is ``name``, ``alias``,
    ``keyword`` or ``package``; ``value`` is what matched (``torch/2.2.1``)."""

    kind: str
    name: str
    why: str
    value: str

    def line(self) -> str:
        return f"{self.kind:<7} {self.name:<28} {self.why}: {self.value}"


def _first(term: str, fields: Iterable[tuple[str, Iterable[str]]]) -> tuple[str, str] | None:
    """The first (field, value) holding ``term`` (case-insensitive substring), in field order."""
    needle = term.casefold()
    for why, values in fields:
        for value in values:
            if needle in value.casefold():
                return why, value
    return None


def match_recipe(recipe: Recipe, term: str) -> Match | None:
    hit = _first(term, [("name", [recipe.name]), ("alias", [a.name for a in recipe.aliases]),
                        ("keyword", recipe.keywords)])
    return Match("recipe", recipe.name, *hit) if hit else None


def match_installed(record: Installed, term: str, keywords: tuple[str, ...] = ()) -> Match | None:
    """An installed version by its name, commands, the packages found in its image, or the
    keywords of its recipe (``keywords``, when the recipe is still known)."""
    generated = generated_commands(record.name)
    aliases = [c for c in record.commands if c not in generated]
    hit = _first(term, [("name", [record.name]), ("alias", aliases), ("keyword", keywords),
                        ("package", record.packages)])
    return Match("module", f"{record.name}/{record.version}", *hit) if hit else None


def search(term: str, recipes: Iterable[Recipe], records: Iterable[Installed]) -> list[Match]:
    """Recipes first (by name), then installed modules (by name and version)."""
    recipes = list(recipes)
    keywords = {r.name: r.keywords for r in recipes}
    found = [m for r in recipes if (m := match_recipe(r, term)) is not None]
    found += [m for rec in records if (m := match_installed(rec, term, keywords.get(rec.name, ()))) is not None]
    return found
