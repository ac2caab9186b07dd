"""The experiment grid: folds x strategies x each strategy's parameter points x seeds."""

from __future__ import annotations

from mtlbench.config import Config, expand_grid
from mtlbench.engine.trialspec import TrialSpec
from mtlbench.errors import ConfigError


def expand(cfg: Config) -> list[TrialSpec]:
    """Every trial of the experiment, in a stable order (strategy, params, fold, seed)."""
    specs = []
    for label, entry in cfg.strategies.items():
        if not entry.enabled:
            continue
        for params in expand_grid(entry):
            for fold in range(cfg.experiment.folds):
                for seed in cfg.experiment.seeds:
                    specs.append(TrialSpec(fold=fold, strategy=label, params=params, seed=seed))
    seen: set[str] = set()
    for s in specs:
        if s.id in seen:
            raise ConfigError(f"trial {s.id} appears twice: a seed or a grid value of strategies.{s.strategy} is repeated")
        seen.add(s.id)
    return specs
