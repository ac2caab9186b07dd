"""mtlbench plugin ``torchjd``: every aggregator of torchjd 0.18 as a training strategy (``jd_<class>``).

The table of aggregators lives in :mod:`mtlbench_torchjd.table`, the strategy
classes in :mod:`mtlbench_torchjd.strategies`; this module registers them
(entry point ``torchjd`` in the ``mtlbench`` group). Importing it imports
neither torch nor torchjd.
"""

from __future__ import annotations

from mtlbench import hookimpl

from mtlbench_torchjd.strategies import BY_NAME, STRATEGIES, TorchJDStrategy
from mtlbench_torchjd.table import AGGREGATORS, EXTRAS, AggregatorSpec, Option

__version__ = "0.1.0"
__all__ = ["AGGREGATORS", "BY_NAME", "EXTRAS", "STRATEGIES", "AggregatorSpec", "Option", "TorchJDStrategy"]


@hookimpl
def register_strategies(register):
    for cls in STRATEGIES:
        register(cls)
