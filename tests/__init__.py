"""Test package (so conftest helpers import as tests.conftest, once)."""
