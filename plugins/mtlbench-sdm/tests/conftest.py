"""Every test of this plugin writes its caches into a temporary folder, never into the user's."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtlbench-cache"))
