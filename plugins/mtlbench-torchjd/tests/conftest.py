"""Every test of this plugin writes its caches into a temporary folder, never into the user's."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests (training through the real CLI)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtlbench-cache"))
