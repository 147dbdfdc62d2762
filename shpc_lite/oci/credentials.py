"""Registry credentials: environment variables, then Apptainer's and Docker's config files.

Lookup order for a registry host (``docker.io``, ``nvcr.io``, ``localhost:5000``):

1. ``SHPC_LITE_REGISTRY_<HOST>_USER`` and ``SHPC_LITE_REGISTRY_<HOST>_PASSWORD``, where ``<HOST>`` is
   the host upper-cased with every other character than A-Z and 0-9 replaced by ``_``
   (``SHPC_LITE_REGISTRY_NVCR_IO_USER='$oauthtoken'``).
2. ``~/.apptainer/docker-config.json``, then ``$DOCKER_CONFIG/config.json`` (default
   ``~/.docker/config.json``); in each, a ``credHelpers`` entry for the host, else ``credsStore``,
   else ``auths.<host>.auth`` (base64 ``user:password``). Docker Hub's key is
   ``https://index.docker.io/v1/``.

A :class:`Credential` never shows its password in ``repr``/``str``, and registers it (and its Basic
base64 forms) with :mod:`shpc_lite.scrub` when it is made.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Protocol

from ..errors import ConfigError
from ..scrub import register_credential

log = logging.getLogger(__name__)

ENV_PREFIX = "SHPC_LITE_REGISTRY_"
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io"}
HELPER_TIMEOUT = 10.0


@dataclass(frozen=True)
class Credential:
    username: str
    password: str = field(repr=False)
    source: str = ""

    def __post_init__(self) -> None:
        # Known to the scrubber from the moment it is loaded: no message may show it afterwards.
        register_credential(self.username, self.password)

    def __repr__(self) -> str:
        return f"Credential(username={self.username!r}, password='***', source={self.source!r})"

    __str__ = __repr__


class CredentialProvider(Protocol):
    def get(self, host: str) -> Optional[Credential]:
        """Credentials for a registry host, or None for anonymous access."""


def env_prefix(host: str) -> str:
    """``SHPC_LITE_REGISTRY_<HOST>_`` for a host: ``nvcr.io`` -> ``SHPC_LITE_REGISTRY_NVCR_IO_``."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", host.upper()) + "_"


def _config_host(key: str) -> str:
    """The host a config.json key means (keys may be URLs such as ``https://host/v1/``)."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip()).split("/", 1)[0].lower()
    return "docker.io" if host in _HUB_HOSTS else host


def _canonical_host(host: str) -> str:
    host = host.lower()
    return "docker.io" if host in _HUB_HOSTS else host


class StaticCredentials:
    """Fixed credentials per host, e.g. ``StaticCredentials({"127.0.0.1:5000": ("u", "p")})``."""

    def __init__(self, entries: Optional[Mapping[str, object]] = None):
        self._entries: Dict[str, Credential] = {}
        for host, value in (entries or {}).items():
            cred = value if isinstance(value, Credential) else Credential(*value, source="static")
            self._entries[_canonical_host(host)] = cred

    def get(self, host: str) -> Optional[Credential]:
        return self._entries.get(_canonical_host(host))

    def __repr__(self) -> str:
        return f"StaticCredentials(hosts={sorted(self._entries)!r})"


class DockerCredentials:
    """Credentials from the environment and Apptainer/Docker config files (see module doc).

    Results are cached per host (credential helpers are slow); the object is thread-safe.
    """

    def __init__(
        self,
        *,
        environ: Optional[Mapping[str, str]] = None,
        home: Optional[Path] = None,
        config_files: Optional[list] = None,
        helper_timeout: float = HELPER_TIMEOUT,
    ):
        self._environ = os.environ if environ is None else environ
        if config_files is None:
            home = Path(home) if home is not None else Path.home()
            docker_dir = self._environ.get("DOCKER_CONFIG")
            config_files = [
                home / ".apptainer" / "docker-config.json",
                (Path(docker_dir) if docker_dir else home / ".docker") / "config.json",
            ]
        self._files = [Path(p) for p in config_files]
        self._helper_timeout = helper_timeout
        self._cache: Dict[str, Optional[Credential]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DockerCredentials(files={[str(p) for p in self._files]!r})"

    def get(self, host: str) -> Optional[Credential]:
        host = _canonical_host(host)
        with self._lock:
            if host not in self._cache:
                self._cache[host] = self._lookup(host)
            return self._cache[host]

    def _lookup(self, host: str) -> Optional[Credential]:
        cred = self._from_env(host)
        if cred is None:
            for path in self._files:
                cred = self._from_file(path, host)
                if cred is not None:
                    break
        if cred is not None:
            log.debug("credentials for %s from %s", host, cred.source)
        return cred

    def _from_env(self, host: str) -> Optional[Credential]:
        prefix = env_prefix(host)
        user = self._environ.get(prefix + "USER")
        password = self._environ.get(prefix + "PASSWORD")
        if user is None and password is None:
            return None
        if user is None or password is None:
            missing = prefix + ("USER" if user is None else "PASSWORD")
            raise ConfigError(f"credentials for {host}: {missing} is not set (both are needed)")
        return Credential(user, password, source=f"environment {prefix}USER")

    def _from_file(self, path: Path, host: str) -> Optional[Credential]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot read registry credentials: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a JSON object")
        helpers = data.get("credHelpers") or {}
        helper = None
        if isinstance(helpers, dict):
            for key, value in helpers.items():
                if _config_host(key) == host:
                    helper = value
                    break
        helper = helper or data.get("credsStore")
        if helper:
            cred = self._from_helper(str(helper), host, path)
            if cred is not None:
                return cred
        auths = data.get("auths") or {}
        if not isinstance(auths, dict):
            return None
        for key, entry in auths.items():
            if _config_host(key) != host or not isinstance(entry, dict):
                continue
            return self._decode_auth(entry, path, key)
        return None

    @staticmethod
    def _decode_auth(entry: dict, path: Path, key: str) -> Optional[Credential]:
        source = f"{path} auths[{key!r}]"
        if entry.get("auth"):
            try:
                text = base64.b64decode(entry["auth"], validate=False).decode("utf-8")
            except (binascii.Error, ValueError, TypeError):
                raise ConfigError(f"{source}: 'auth' is not base64 user:password") from None
            user, sep, password = text.partition(":")
            if not sep:
                raise ConfigError(f"{source}: 'auth' is not base64 user:password")
            return Credential(user, password, source=source)
        if entry.get("username") and entry.get("password"):
            return Credential(str(entry["username"]), str(entry["password"]), source=source)
        return None

    def _from_helper(self, helper: str, host: str, path: Path) -> Optional[Credential]:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
            raise ConfigError(f"{path}: invalid credential helper name {helper!r}")
        program = f"docker-credential-{helper}"
        server = DOCKER_HUB_CONFIG_KEY if host == "docker.io" else host
        try:
            proc = subprocess.run(
                [program, "get"],
                input=server.encode(),
                capture_output=True,
                timeout=self._helper_timeout,
                check=False,
            )
        except FileNotFoundError:
            log.warning("credential helper %s (from %s) is not installed", program, path)
            return None
        except subprocess.TimeoutExpired:
            log.warning("credential helper %s timed out after %gs for %s",
                        program, self._helper_timeout, host)
            return None
        if proc.returncode != 0:
            # "credentials not found in native keychain" is the normal miss.
            log.debug("credential helper %s has no entry for %s", program, host)
            return None
        try:
            answer = json.loads(proc.stdout.decode("utf-8"))
            user, secret = answer["Username"], answer["Secret"]
        except (ValueError, KeyError, TypeError):
            log.warning("credential helper %s gave an unreadable answer for %s", program, host)
            return None
        if not secret:
            return None
        return Credential(str(user), str(secret), source=f"credential helper {program}")
