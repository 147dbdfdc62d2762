"""Tag selection (shpc_lite.tags) over the real tag lists in tests/data/tags/."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from shpc_lite.errors import ResolveError
from shpc_lite.recipe import SelectRule, load_recipe
from shpc_lite.tags import Choice, explain, is_signature_tag, select
from shpc_lite.versions import version_key

ROOT = Path(__file__).resolve().parent.parent
TAGS = Path(__file__).resolve().parent / "data" / "tags"

LISTS = {
    "python": "dockerhub_library-python_2024-02-15.txt",
    "pytorch": "dockerhub_pytorch-pytorch.txt",
    "tensorflow": "dockerhub_tensorflow-tensorflow.txt",
    "ngc-pytorch": "nvcr_nvidia-pytorch.txt",
    "ngc-tensorflow": "nvcr_nvidia-tensorflow.txt",
}

# Written by hand from reading the tag lists.
EXPECTED = {
    # 3.13-rc-bookworm and 3.13.0a4-bookworm are pre-releases; 3.10 and older are below ">=3.11".
    "python": [("3.12", "3.12-bookworm"), ("3.11", "3.11-bookworm")],
    # CUDA 12 runtime images only (2.9.0 exists only with CUDA 13.0); the highest CUDA per version.
    "pytorch": [
        ("2.9.1", "2.9.1-cuda12.8-cudnn9-runtime"),
        ("2.8.0", "2.8.0-cuda12.9-cudnn9-runtime"),
        ("2.7.1", "2.7.1-cuda12.8-cudnn9-runtime"),
    ],
    # GPU images; 2.17.0rc1-gpu is a release candidate; 2.16.1-gpu is the 4th newest.
    "tensorflow": [("2.21.0", "2.21.0-gpu"), ("2.18.0", "2.18.0-gpu"), ("2.17.0", "2.17.0-gpu")],
    # No -py3-igpu (Jetson) and no cosign sha256-<hex>.sig tags.
    "ngc-pytorch": [("26.03", "26.03-py3"), ("26.02", "26.02-py3"), ("26.01", "26.01-py3")],
    # TF2 only (tf1 ended with 23.03).
    "ngc-tensorflow": [("25.02", "25.02-tf2-py3"), ("25.01", "25.01-tf2-py3"), ("24.12", "24.12-tf2-py3")],
}


def tags_of(name: str) -> list[str]:
    lines = (TAGS / LISTS[name]).read_text().splitlines()
    return [line.split("\t")[0] for line in lines if line.strip()]


def rule_of(name: str) -> SelectRule:
    recipe = load_recipe(ROOT / "registry" / f"{name}.yaml")
    assert recipe.select is not None
    return recipe.select


def pairs(choices: list[Choice]) -> list[tuple[str, str]]:
    return [(c.version, c.tag) for c in choices]


def test_every_builtin_recipe_has_a_tag_list_and_an_expectation():
    builtin = sorted(p.stem for p in (ROOT / "registry").glob("*.yaml"))
    assert builtin == sorted(LISTS) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_recipes_choose_what_a_careful_person_would(name):
    assert pairs(select(rule_of(name), tags_of(name), name)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_choice_does_not_depend_on_tag_order(name):
    tags = tags_of(name)
    rule = rule_of(name)
    rng = random.Random(1234)
    for _ in range(20):
        rng.shuffle(tags)
        assert pairs(select(rule, tags + tags[:5], name)) == EXPECTED[name]
        assert explain(rule, tags) == explain(rule, sorted(tags))


LOOSE = {
    # Patterns careless enough to let rc, alpha, sig, att and latest tags through to the version check.
    "python": r"(?P<version>[^-]+(?:-rc)?)(?:-bookworm)?",
    "tensorflow": r"(?P<version>[0-9a-z.]+)(?:-gpu)?",
    "ngc-pytorch": r"\D*(?P<version>\d+(?:\.\d+)?).*",
}


@pytest.mark.parametrize("name", sorted(LOOSE))
def test_rc_alpha_sig_and_latest_never_win_even_with_a_loose_pattern(name):
    chosen = select(SelectRule(pattern=LOOSE[name], newest=50), tags_of(name), name)
    assert chosen
    for choice in chosen:
        assert not is_signature_tag(choice.tag)
        assert choice.tag != "latest"
        assert "rc" not in choice.tag and "a4" not in choice.tag
    if name == "ngc-pytorch":  # sha256-... would otherwise be version 256, the newest of all
        assert chosen[0].version == "26.03"


def test_python_rc_tags_are_rejected_as_pre_releases():
    rule = SelectRule(pattern=r"(?P<version>3\.\d+(?:-rc|\.0a\d+)?)-bookworm", versions=">=3.11", newest=5)
    assert pairs(select(rule, tags_of("python"))) == EXPECTED["python"]
    reasons = {d.tag: d.reason for d in explain(rule, tags_of("python"))}
    assert reasons["3.13-rc-bookworm"] == "'3.13-rc' is a pre-release"
    assert reasons["3.13.0a4-bookworm"] == "'3.13.0a4' is a pre-release"
    assert reasons["3.10-bookworm"] == "3.10 is outside versions '>=3.11'"


def test_tensorflow_rc_releases_never_win_without_a_gpu_suffix():
    rule = SelectRule(pattern=r"(?P<version>\d+\.\d+\.\d+(?:rc\d+)?)", newest=2)
    assert pairs(select(rule, tags_of("tensorflow"))) == [("2.18.0", "2.18.0"), ("2.17.0", "2.17.0")]


def test_specifier_excludes_prereleases_explicitly():
    # packaging 26 lets pre-releases satisfy contains() by default; a specifier that names a
    # pre-release must still not bring one in.
    rule = SelectRule(pattern=r"(?P<version>.+)", versions=">=2.0rc1", newest=5)
    assert pairs(select(rule, ["2.0rc1", "2.0rc2", "2.1.dev3", "1.9", "2.0", "2.0.post1"])) == [
        ("2.0.post1", "2.0.post1"),
        ("2.0", "2.0"),
    ]


def test_signature_attestation_and_sbom_tags():
    digest = "36555b43d382425a4281ecfbcb41de2f95fb542ca8e531c5486be10df8026f9d"
    for suffix in ("sig", "att", "sbom"):
        assert is_signature_tag(f"sha256-{digest}.{suffix}")
    assert not is_signature_tag("sha256-thing")
    assert not is_signature_tag("26.03-py3")
    rule = SelectRule(pattern=r"sha(?P<version>\d+)-.*")
    assert select(rule, [f"sha256-{digest}.sig", f"sha256-{digest}.att"]) == []


def test_ngc_igpu_and_sig_tags_are_explained():
    decisions = {d.tag: d for d in explain(rule_of("ngc-pytorch"), tags_of("ngc-pytorch"))}
    assert decisions["24.03-py3-igpu"].reason == "does not match the pattern"
    sig = next(t for t in decisions if t.endswith(".sig"))
    assert decisions[sig].reason == "signature/attestation tag"
    assert decisions["25.12-py3"].reason == "module version 25.12 is not among the newest 3"


def test_explain_covers_each_distinct_tag_once_and_agrees_with_select():
    tags = tags_of("pytorch")
    rule = rule_of("pytorch")
    decisions = explain(rule, tags + ["latest"])
    assert sorted(d.tag for d in decisions) == sorted(set(tags))
    chosen = [d for d in decisions if d.chosen]
    assert [(d.version, d.tag) for d in chosen] == EXPECTED["pytorch"]
    assert decisions[: len(chosen)] == chosen  # chosen first, newest first
    reasons = {d.tag: d.reason for d in decisions}
    assert reasons["latest"] == "'latest' is never chosen"
    assert reasons["2.9.1-cuda12.6-cudnn9-runtime"] == (
        "2.9.1-cuda12.8-cudnn9-runtime is preferred for module version 2.9.1"
    )
    assert reasons["2.9.0-cuda13.0-cudnn9-runtime"] == "does not match the pattern"
    assert reasons["2.1.2-cuda12.1-cudnn8-runtime"] == "2.1.2 is outside versions '>=2.2'"
    assert reasons["2.9.1-cuda12.8-cudnn9-runtime"] == "chosen as module version 2.9.1"


def test_other_groups_compare_as_versions_not_text():
    rule = SelectRule(pattern=r"(?P<version>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn(?P<cudnn>\d+)")
    tags = ["2.5.0-cuda12.9-cudnn9", "2.5.0-cuda12.10-cudnn8", "2.5.0-cuda12.10-cudnn9", "2.5.0-cuda12.2-cudnn10"]
    assert pairs(select(rule, tags)) == [("2.5.0", "2.5.0-cuda12.10-cudnn9")]


def test_prefer_ranks_before_other_groups_first_matching_regex_wins():
    tags = ["1.0-cuda12.8-ubuntu", "1.0-cuda12.6-rocky", "1.0-cuda12.4-alma"]
    base = dict(pattern=r"(?P<version>\d+\.\d+)-cuda(?P<cuda>[\d.]+)-(?P<os>\w+)")
    assert select(SelectRule(**base), tags)[0].tag == "1.0-cuda12.8-ubuntu"
    assert select(SelectRule(**base, prefer=("rocky",)), tags)[0].tag == "1.0-cuda12.6-rocky"
    assert select(SelectRule(**base, prefer=("alma", "rocky")), tags)[0].tag == "1.0-cuda12.4-alma"
    assert select(SelectRule(**base, prefer=("nothing", "rocky|alma")), tags)[0].tag == "1.0-cuda12.6-rocky"


def test_equal_groups_fall_back_to_the_tag_string():
    rule = SelectRule(pattern=r"(?P<version>\d+\.\d+)(?:-py3|-python3)")
    for tags in (["1.0-python3", "1.0-py3"], ["1.0-py3", "1.0-python3"]):
        assert pairs(select(rule, tags)) == [("1.0", "1.0-py3")]


def test_exclude_drops_tags_anywhere_in_the_tag():
    rule = SelectRule(pattern=r"(?P<version>\d{2}\.\d{2})-py3(?:-igpu)?", exclude=("igpu",), newest=1)
    assert pairs(select(rule, ["24.03-py3-igpu", "24.02-py3"])) == [("24.02", "24.02-py3")]
    assert explain(rule, ["24.03-py3-igpu"])[0].reason == "excluded by 'igpu'"


def test_version_template_and_two_digit_versions_keep_their_text():
    rule = SelectRule(pattern=r"(?P<version>\d{2}\.\d{2})-(?P<flavour>tf2)-py3", version="{version}-{flavour}")
    assert pairs(select(rule, tags_of("ngc-tensorflow")))[0] == ("25.02-tf2", "25.02-tf2-py3")
    # 24.01 is Version 24.1, but the module version keeps the tag's text and still sorts by value
    ngc = select(SelectRule(pattern=r"(?P<version>\d{2}\.\d{2})-py3", newest=30), tags_of("ngc-pytorch"))
    assert "24.01" in [c.version for c in ngc] and "24.1" not in [c.version for c in ngc]
    assert [c.version for c in ngc] == sorted((c.version for c in ngc), key=version_key, reverse=True)


def test_template_can_merge_patch_releases_into_one_module_version():
    rule = SelectRule(pattern=r"(?P<version>(?P<series>\d+\.\d+)\.\d+)-gpu", version="{series}", newest=2)
    assert pairs(select(rule, ["2.7.1-gpu", "2.7.3-gpu", "2.8.0-gpu", "2.8.4-gpu", "2.8.10-gpu"])) == [
        ("2.8", "2.8.10-gpu"),
        ("2.7", "2.7.3-gpu"),
    ]


def test_per_minor_keeps_the_newest_patch_of_each_series():
    base = dict(pattern=r"(?P<version>\d+\.\d+\.\d+)-cuda(?P<cuda>12\.\d+)-cudnn(?P<cudnn>\d+)-runtime")
    by_version = select(SelectRule(**base, newest=4), tags_of("pytorch"))
    assert [c.version for c in by_version] == ["2.9.1", "2.8.0", "2.7.1", "2.7.0"]
    per_minor = select(SelectRule(**base, newest=4, per="minor"), tags_of("pytorch"))
    assert [c.version for c in per_minor] == ["2.9.1", "2.8.0", "2.7.1", "2.6.0"]
    reasons = {d.tag: d.reason for d in explain(SelectRule(**base, newest=4, per="minor"), tags_of("pytorch"))}
    assert reasons["2.7.0-cuda12.6-cudnn9-runtime"] == "2.7.1 is newer in series 2.7 (per: minor)"
    per_major = select(SelectRule(pattern=r"(?P<version>\d+\.\d+\.\d+)", per="major"), tags_of("tensorflow"))
    assert [c.version for c in per_major] == ["2.18.0"]


def test_newest_counts_module_versions():
    rule = SelectRule(pattern=r"(?P<version>\d{2}\.\d{2})-py3", newest=1)
    assert pairs(select(rule, tags_of("ngc-pytorch"))) == [("26.03", "26.03-py3")]
    # 21.01 .. 26.03 monthly, without 25.07 (never published): 62 module versions
    assert len(select(SelectRule(pattern=r"(?P<version>\d{2}\.\d{2})-py3", newest=1000), tags_of("ngc-pytorch"))) == 62


def test_invalid_versions_are_skipped():
    rule = SelectRule(pattern=r"(?P<version>[\w.]+)-gpu", newest=5)
    assert pairs(select(rule, ["devel-gpu", "latest-gpu", "2.1.0-gpu"])) == [("2.1.0", "2.1.0-gpu")]
    assert explain(rule, ["devel-gpu"])[0].reason == "'devel' is not a valid version"


def test_unsafe_module_versions_are_refused():
    rule = SelectRule(pattern=r"(?P<version>\d+)(?P<rest>.*)", version="{version}{rest}")
    assert select(rule, ["1 ;rm"]) == []


@pytest.mark.parametrize(
    "rule, message",
    [
        (SelectRule(pattern=r"(\d+)-py3"), "demo: select.pattern: needs a named group 'version'"),
        (SelectRule(pattern=r"(?P<v>\d+)"), "demo: select.pattern: needs a named group 'version'"),
        (SelectRule(pattern=r"(?P<version>\d+"), "demo: select.pattern: invalid regular expression"),
        (SelectRule(pattern=r"(?P<version>\d+)", version="{cuda}"), "demo: select.version: template '{cuda}' uses {cuda}"),
        (SelectRule(pattern=r"(?P<version>\d+)", version="{version"), "demo: select.version: invalid template"),
        (SelectRule(pattern=r"(?P<version>\d+)", versions=">=two"), "demo: select.versions: '>=two' is not a PEP 440"),
        (SelectRule(pattern=r"(?P<version>\d+)", per="patch"), "demo: select.per: 'patch' is not one of"),
        (SelectRule(pattern=r"(?P<version>\d+)", newest=0), "demo: select.newest"),
        (SelectRule(pattern=r"(?P<version>\d+)", exclude=("[",)), "demo: select.exclude: invalid regular expression"),
        (SelectRule(pattern=r"(?P<version>\d+)", prefer=("(",)), "demo: select.prefer: invalid regular expression"),
    ],
)
def test_bad_rules_are_clear_errors_naming_the_recipe(rule, message):
    with pytest.raises(ResolveError) as err:
        select(rule, ["1"], "demo")
    assert str(err.value).startswith(message)


def test_version_key_orders_versions_numerically_and_others_below():
    assert sorted(["3.9", "3.10", "weird", "3.11"], key=version_key) == ["weird", "3.9", "3.10", "3.11"]
