"""Config + plugin registry -> validated plugin instances: the only place tasks, heads, strategies and sources are built.

Every parameter table is validated against its plugin's ``Params`` here, and
every failure is one ``ConfigError`` line naming the config key (e.g.
``tasks.landmarks.params.sigma_mm``). The cache builder, the trainer, the
results writer and ``mtlbench predict`` all call these functions, so a plugin
is constructed the same way everywhere.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from mtlbench.api import WARPS, DatasetInfo, DatasetSource, Head, SourceRequest, Strategy, Task
from mtlbench.config import DataConfig, TrainConfig, deep_merge, expand_grid, validate_params
from mtlbench.errors import ConfigError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.config import Config
    from mtlbench.plugins import PluginManager

#: Batch keys of the core; a task's own targets may not use them.
CORE_ARRAYS = ("image", "labels")


def _manager(manager: "PluginManager | None") -> "PluginManager":
    from mtlbench.plugins import get_manager

    return manager or get_manager()


def _get(manager: "PluginManager", kind: str, name: str, where: str) -> type:
    try:
        return manager.get(kind, name).obj
    except PluginError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------- data


def source_request(cfg: "Config") -> SourceRequest:
    """What the config asks of its dataset source."""
    return SourceRequest(
        organs=tuple(cfg.data.organs),
        landmarks=tuple(cfg.data.landmarks),
        mask_mismatch=cfg.data.mask_mismatch,
        geometry_tolerance=float(cfg.data.geometry_tolerance),
    )


def make_source(cfg: "Config", manager: "PluginManager | None" = None) -> DatasetSource:
    """The configured dataset source, its ``[data.<source>]`` table validated."""
    manager = _manager(manager)
    cls = _get(manager, "datasets", cfg.data.source, "data.source")
    params = validate_params(cls.Params, cfg.source_params(), f"data.{cfg.data.source}")
    return cls(params, source_request(cfg))


def dataset_info(cfg: "Config") -> DatasetInfo:
    """What tasks and heads are told about the data."""
    size = cfg.preprocess.slice_size
    return DatasetInfo(
        organs=tuple(cfg.data.organs), landmarks=tuple(cfg.data.landmarks), slice_size=(int(size[0]), int(size[1]))
    )


# ----------------------------------------------------------------------------- tasks and heads


def make_task(cfg: "Config", label: str, manager: "PluginManager | None" = None) -> Task:
    """The task configured under ``[tasks.<label>]``, with validated params and checked target declarations."""
    manager = _manager(manager)
    entry = cfg.tasks[label]
    cls = _get(manager, "tasks", cfg.task_use(label), f"tasks.{label}")
    params = validate_params(cls.Params, entry.params, f"tasks.{label}.params")
    try:
        task = cls(params, dataset_info(cfg))
    except ConfigError as exc:
        raise ConfigError(f"tasks.{label}.{exc}" if str(exc).startswith("params.") else f"tasks.{label}: {exc}") from None
    check_declared_targets(label, task)
    return task


def make_tasks(cfg: "Config", manager: "PluginManager | None" = None) -> dict[str, Task]:
    """Every configured task, by label, in config order."""
    manager = _manager(manager)
    return {label: make_task(cfg, label, manager) for label in cfg.tasks}


def check_declared_targets(label: str, task: Task) -> None:
    """A task's ``targets()`` must be unique, well-formed names that do not shadow the core's arrays."""
    seen: set[str] = set()
    where = f"task {label!r} ({type(task).__name__})"
    for t in task.targets():
        if not isinstance(t.name, str) or not t.name or "/" in t.name or t.name in CORE_ARRAYS:
            raise PluginError(
                f"{where}: target name {t.name!r} is not usable (empty, with '/', or one of {', '.join(CORE_ARRAYS)})"
            )
        if t.name in seen:
            raise PluginError(f"{where}: target {t.name!r} is declared twice")
        if t.warp not in WARPS:
            raise PluginError(f"{where}: target {t.name!r} has warp {t.warp!r}; expected one of {', '.join(WARPS)}")
        if int(t.channels) < 0:
            raise PluginError(f"{where}: target {t.name!r} has {t.channels} channels")
        try:
            import numpy as np

            np.dtype(t.dtype)
        except TypeError:
            raise PluginError(f"{where}: target {t.name!r} has an unknown dtype {t.dtype!r}") from None
        seen.add(t.name)


def make_heads(cfg: "Config", tasks: dict[str, Task], manager: "PluginManager | None" = None) -> dict[str, Head]:
    """Each task's head: ``tasks.<label>.head`` or the task's default, with validated ``head_params``."""
    manager = _manager(manager)
    heads = {}
    for label, entry in cfg.tasks.items():
        cls = _get(manager, "heads", entry.head or type(tasks[label]).head, f"tasks.{label}.head")
        heads[label] = cls(validate_params(cls.Params, entry.head_params, f"tasks.{label}.head_params"))
    return heads


# ----------------------------------------------------------------------------- strategies


def make_strategy(
    cfg: "Config", label: str, params: dict[str, Any], manager: "PluginManager | None" = None
) -> Strategy:
    """The strategy ``[strategies.<label>]`` at one parameter point (one point of its grid)."""
    manager = _manager(manager)
    if label not in cfg.strategies:
        raise ConfigError(f"unknown strategy {label!r}; configured: {', '.join(cfg.strategies)}")
    cls = _get(manager, "strategies", cfg.strategy_use(label), f"strategies.{label}")
    validated = validate_params(cls.Params, params, f"strategies.{label}.params")
    try:  # strategies check their params against the tasks (e.g. joint's weights)
        strategy = cls(validated, list(cfg.tasks), cfg.experiment.main_task)
    except (ConfigError, PluginError) as exc:
        raise type(exc)(f"strategies.{label}: {exc}") from None
    unknown = [t for t in strategy.model_tasks() if t not in cfg.tasks]
    if unknown:
        raise ConfigError(f"strategies.{label}: asks for unknown tasks: {', '.join(unknown)}")
    return strategy


def train_config(cfg: "Config", label: str) -> TrainConfig:
    """The ``[train]`` settings of strategy ``label``: the base table with its ``train`` overrides."""
    entry = cfg.strategies[label]
    return validate_params(TrainConfig, deep_merge(cfg.train.model_dump(), entry.train), f"strategies.{label}.train")


# ----------------------------------------------------------------------------- the whole config


def resolve_plugins(cfg: "Config", manager: "PluginManager | None" = None, source: str = "<config>") -> None:
    """Check every plugin name and parameter table of ``cfg`` by building each plugin once.

    Errors are one line prefixed with ``source`` (the config file).
    """
    manager = _manager(manager)
    try:
        for key in cfg.data.model_extra or {}:
            if key not in manager.registry("datasets"):
                names = list(DataConfig.model_fields) + manager.registry("datasets").names()
                hint = difflib.get_close_matches(key, names, n=1)
                extra = f" (did you mean 'data.{hint[0]}'?)" if hint else ""
                raise ConfigError(f"unknown key 'data.{key}'{extra}")
        make_source(cfg, manager)
        tasks = make_tasks(cfg, manager)
        make_heads(cfg, tasks, manager)
        for label, entry in cfg.strategies.items():
            for point in expand_grid(entry):
                make_strategy(cfg, label, point, manager)
            train_config(cfg, label)
            if entry.compare_to is not None and entry.compare_to not in cfg.strategies:
                raise ConfigError(f"strategies.{label}.compare_to: no strategy {entry.compare_to!r}")
        if cfg.experiment.baseline not in cfg.strategies:
            raise ConfigError(
                f"experiment.baseline: no strategy {cfg.experiment.baseline!r}; have: {', '.join(cfg.strategies)}"
            )
    except (ConfigError, PluginError) as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None
