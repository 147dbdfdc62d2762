"""Fixtures for a real CNCF distribution registry (filled in by the OCI client work)."""
