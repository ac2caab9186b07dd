"""Where mtlbench keeps generated data: the cache folder (MTLBENCH_CACHE_DIR or the user's cache)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MTLBENCH_CACHE_DIR"


def cache_dir() -> Path:
    """The cache root: $MTLBENCH_CACHE_DIR, else the platform's user cache folder + 'mtlbench'."""
    raw = os.environ.get(CACHE_ENV)
    if raw:
        return Path(raw).expanduser().resolve()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mtlbench"))
