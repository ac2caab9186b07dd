"""Shared fixtures: the real-data folder (skipped when ../shared is absent) and isolated caches."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real test data not found at {REALDATA} (../shared is absent in this checkout)")
    return REALDATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point MTLBENCH_CACHE_DIR at one temporary folder for the whole session.

    Shared on purpose: the phantom and slice caches are built once and reused
    (as for a user); tests that need a private cache set their own.
    """
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtlbench-cache"))
