"""Read YAML that someone else may have written (recipes, imported registries, site manifests,
config files) without letting its shape hurt us.

libyaml's loader (what makes reading hundreds of recipes fast) crashes the whole process with a
segmentation fault on a document nested a few hundred thousand deep, and the pure-Python one
raises RecursionError. So the event stream (an iterative parser, no tree) is walked first: more
than ``MAX_DEPTH`` nested collections, or an alias (``*name``, which can make a structure that
refers to itself or grows exponentially when walked), is refused before anything is built.
"""

from __future__ import annotations

from typing import Any, Optional

MAX_DEPTH = 64  # a recipe is 4 levels deep; a site manifest 3


class YamlRefused(ValueError):
    """The text is not YAML we read; ``line`` (1-based) when known."""

    def __init__(self, problem: str, line: Optional[int] = None):
        super().__init__(problem)
        self.problem = problem
        self.line = line


def _line(mark: Any) -> Optional[int]:
    return mark.line + 1 if mark is not None else None


def load(text: str) -> Any:
    """The document in ``text``; YamlRefused for malformed, too deep or aliased YAML."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    opening = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
    closing = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    try:
        depth = 0
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, opening):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YamlRefused(f"nested too deeply (more than {MAX_DEPTH} levels)", _line(event.start_mark))
            elif isinstance(event, closing):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                raise YamlRefused("YAML aliases (*name) are not supported", _line(event.start_mark))
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise YamlRefused(getattr(err, "problem", None) or "invalid YAML",
                          _line(getattr(err, "problem_mark", None))) from None
