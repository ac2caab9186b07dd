"""What identifies a trial: (fold, strategy label, strategy parameters, seed), and its stable id."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrialSpec:
    """``strategy`` is the config label under [strategies]; ``params`` one point of its grid."""

    fold: int
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def id(self) -> str:
        """Stable, filesystem-safe: label, swept values, a hash of all params, fold, seed."""
        flat = flatten_params(self.params)
        tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(flat.items()))
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "", tag)[:40]
        digest = hashlib.sha1(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:6]
        middle = f"{tag}-{digest}" if self.params else "default"
        return f"{self.strategy}-{middle}-f{self.fold}-s{self.seed}"


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as dotted keys: {"weights": {"landmarks": 3}} -> {"weights.landmarks": 3}.

    An empty table stays a value ({"a": {}} -> {"a": {}}), so it differs from a missing key.
    """
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name + "."))
        else:
            out[name] = value
    return out
