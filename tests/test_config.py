"""Configuration layers: defaults < system file < user file < SHPC_LITE_<KEY> env < flags."""

from __future__ import annotations

import json

import pytest

from shpc_lite.config import KEYS, load_config
from shpc_lite.errors import ConfigError


def _env(tmp_path, **extra):
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "SHPC_LITE_SYSTEM_CONFIG": str(tmp_path / "system.yaml"),
        **extra,
    }


def test_defaults_never_point_into_site_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    config = load_config(environ=_env(tmp_path))
    assert config["root"] == str(tmp_path / "data" / "shpc-lite")
    assert config["runtime"] == "singularity" and config["module_system"] == "lmod"
    assert all(config.sources[k] == "default" for k in KEYS)


def test_each_layer_overrides_the_one_below(tmp_path):
    (tmp_path / "system.yaml").write_text("gpu: never\nruntime: apptainer\nmodule_system: tcl\njobs: 2\n")
    user = tmp_path / "xdg" / "shpc-lite"
    user.mkdir(parents=True)
    (user / "config.yaml").write_text("runtime: /opt/apptainer/bin/apptainer\nmodule_system: lmod\n")
    env = _env(tmp_path, SHPC_LITE_MODULE_SYSTEM="tcl", SHPC_LITE_BIND_PATHS="/scratch,/work:/w",
               SHPC_LITE_REGISTRY="/a:/b")
    config = load_config({"jobs": "7", "gpu": None}, environ=env)
    assert config["gpu"] == "never" and config.sources["gpu"] == str(tmp_path / "system.yaml")
    assert config["runtime"] == "/opt/apptainer/bin/apptainer"
    assert config.sources["runtime"] == str(user / "config.yaml")
    assert config["module_system"] == "tcl" and config.sources["module_system"] == "env SHPC_LITE_MODULE_SYSTEM"
    assert config["bind_paths"] == ["/scratch", "/work:/w"]
    assert config["registry"] == ["/a", "/b"]
    assert config["jobs"] == 7 and config.sources["jobs"] == "flag --jobs"


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpu: sometimes\n", "gpu: 'sometimes' is not one of auto, always, never"),
        ("colour: blue\n", "unknown key 'colour'"),
        ("bind_paths: /scratch\n", None),  # a string is accepted as a comma-separated list
        ("jobs: many\n", "jobs: 'many' is not a whole number"),
        ("gpu: [\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_config_file_names_file_and_key(tmp_path, text, message):
    (tmp_path / "system.yaml").write_text(text)
    if message is None:
        assert load_config(environ=_env(tmp_path))["bind_paths"] == ["/scratch"]
        return
    with pytest.raises(ConfigError) as err:
        load_config(environ=_env(tmp_path))
    assert str(tmp_path / "system.yaml") in str(err.value) and message in str(err.value)


def test_config_show_reports_sources(site):
    proc = site.cli("--gpu", "never", "config", "show", "--json", check=True)
    data = json.loads(proc.stdout)
    assert data["gpu"] == {"value": "never", "source": "flag --gpu"}
    assert data["root"]["source"] == "env SHPC_LITE_ROOT"
    text = site.cli("config", "show", check=True).stdout
    assert "module_system" in text and "(default)" in text
