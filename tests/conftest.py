"""Shared fixtures. Fixtures of the real parts live in their own modules, registered here."""

pytest_plugins = [
    "tests.registry_fixture",
]
