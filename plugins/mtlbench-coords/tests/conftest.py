"""Isolated caches for the plugin's tests, and the ``slow`` marker."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests (the real CLI end to end)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point MTLBENCH_CACHE_DIR at a temporary folder so no test touches the user's cache."""
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtlbench-cache"))
