"""Test package (so the shared helpers import as tests.helpers.<module>, once)."""
