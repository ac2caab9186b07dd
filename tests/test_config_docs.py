"""Every configuration key is documented in docs/config.md."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mtlbench import config

DOC = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()


def test_every_config_key_is_documented():
    sections = {
        "experiment": config.ExperimentConfig, "data": config.DataConfig, "preprocess": config.PreprocessConfig,
        "model": config.ModelConfig, "tasks.<label>": config.TaskEntry, "train": config.TrainConfig,
        "augment": config.AugmentConfig, "strategies.<label>": config.StrategyEntry,
        "resources": config.ResourcesConfig, "run": config.RunConfig,
    }
    for name in config.Config.model_fields:
        assert f"`{name}`" in DOC or f"[{name}" in DOC, name
    for section, model in sections.items():
        assert f"## `[{section}]`" in DOC, section
        assert issubclass(model, BaseModel)
        for key in model.model_fields:
            assert f"| `{key}` |" in DOC, f"{section}.{key} undocumented"
