"""Benchmark configuration: the TOML schema, profiles, ``--set`` overrides and validation.

``load_config(path, profile, sets)`` reads a TOML file, deep-merges the chosen
``[profiles.NAME]`` table over the base, applies ``--set a.b=value`` overrides,
and validates the result into a typed :class:`Config`. Plugin parameter tables
(``tasks.*.params``, ``strategies.*.params``, ``data.<source>``, heads) are
validated against the plugin's own ``Params`` model by
``mtlbench.assemble.resolve_plugins``; this module knows no plugin.
Every error is a :class:`ConfigError` whose message is one line naming the file
and the key path, with a "did you mean" suggestion for misspelt keys.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from mtlbench.errors import ConfigError


class Section(BaseModel):
    """A config table: unknown keys, inf and nan are errors (a trial would only fail on them later)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Whole numbers and booleans are strict: ``epochs = true`` or ``enabled = 1`` is an
# error, not a silent 1 / True (pydantic's lax mode would coerce them).
Int = StrictInt
Bool = StrictBool
PositiveInt = Annotated[StrictInt, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def pooling_divisor(widths: list[int]) -> int:
    """What a slice's height and width must be divisible by for a U-Net with these level widths."""
    return 2 ** (len(widths) - 1)


def check_trainable(cfg: "Config", source: str | None = None) -> None:
    """Raise ConfigError for what every trial would reject (the slice size against the U-Net depth).

    ``run`` calls it before anything is written or Ray starts; a cache-only
    config (``data prepare``) may use any slice size.
    """
    divisor = pooling_divisor(cfg.model.widths)
    h, w = cfg.preprocess.slice_size
    if h % divisor or w % divisor:
        raise ConfigError(
            ("" if source is None else f"{source}: ") + f"preprocess.slice_size {h}x{w} must be divisible by {divisor} "
            f"(2 ** (len(model.widths) - 1) for model.widths {cfg.model.widths})"
        )
LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


class ExperimentConfig(Section):
    name: str = "experiment"

    folds: Annotated[Int, Field(ge=2)] = 5
    fold_seed: Int = 0
    seeds: Annotated[list[Int], Field(min_length=1)] = [0]
    main_task: str = "segmentation"
    main_metric: str = "iou_mean"
    baseline: str = "single"
    cpu_profile: str | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not LABEL.fullmatch(v):
            raise ValueError("the name may hold letters, digits, '_' and '-' (it names the cache file and run folder)")
        return v


class DataConfig(Section):
    # Each registered dataset source's parameters live in ``[data.<source>]``;
    # they are kept as raw tables here and validated by mtlbench.assemble.resolve_plugins().
    model_config = ConfigDict(extra="allow")

    source: str = "phantom"
    organs: Annotated[list[str], Field(min_length=1)] = ["kidney_right", "kidney_left"]
    landmarks: list[str] = ["renal_pelvis_right", "renal_pelvis_left"]
    mask_mismatch: Literal["error", "resample"] = "error"
    geometry_tolerance: Annotated[float, Field(gt=0)] = 1e-3

    @field_validator("organs", "landmarks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        twice = sorted({x for x in v if v.count(x) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} is listed twice")
        return v


#: Keys that left ``[preprocess]`` for a task's params: old key -> where it lives now.
MOVED_PREPROCESS_KEYS = {
    "sigma_mm": "tasks.landmarks.params.sigma_mm",
    "truncate": "tasks.landmarks.params.truncate",
    "landmark_groups": "tasks.landmarks.params.groups",
}


class PreprocessConfig(Section):
    clamp: tuple[float, float] = (-1024.0, 1024.0)
    scale: Annotated[float, Field(gt=0)] = 500.0
    slice_size: tuple[PositiveInt, PositiveInt] = (256, 256)
    #: (row, col) mm per cache pixel: slices are resampled to this spacing around the image's centre,
    #: then cropped or padded to slice_size. None: the whole slice is resized to slice_size.
    spacing_mm: tuple[PositiveFloat, PositiveFloat] | None = None
    orientation: str = "LPS"

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str) -> str:
        from mtlbench.data.orient import check_code

        return check_code(v)

    @field_validator("clamp")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("clamp must be [low, high] with low < high")
        return v


class ModelConfig(Section):
    widths: Annotated[list[PositiveInt], Field(min_length=2)] = [64, 128, 256, 512, 1024]
    in_channels: PositiveInt = 1
    coordinates: Bool = False


class TrainConfig(Section):
    epochs: PositiveInt = 50
    batch_size: PositiveInt = 8
    lr: Annotated[float, Field(gt=0)] = 1e-4
    lr_decay_epoch: Annotated[Int, Field(ge=0)] = 10
    lr_decay_factor: Annotated[float, Field(gt=0, le=1)] = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    slices_per_epoch: PositiveInt | None = None
    foreground_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    eval_every: PositiveInt = 1
    grad_norm_every: Annotated[Int, Field(ge=0)] = 25
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The step's numerics; mtlbench.devices.step_settings decides what "auto" means per device.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto"] | Bool = "auto"
    compile: Literal["auto"] | Bool = "auto"

    @field_validator("channels_last", "compile", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any) -> Any:
        if v != "auto" and not isinstance(v, bool):
            raise ValueError('must be true, false or "auto"')
        return v


class AugmentConfig(Section):
    enabled: Bool = True
    rotation_deg: tuple[float, float] = (-10.0, 10.0)
    scale: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.9, 1.1)
    translation: tuple[float, float] = (0.0, 0.0)
    image_interpolation: Literal["bilinear", "nearest"] = "bilinear"


class TaskEntry(Section):
    use: str | None = None
    params: dict[str, Any] = {}
    head: str | None = None
    head_params: dict[str, Any] = {}


class StrategyEntry(Section):
    use: str | None = None
    enabled: Bool = True
    params: dict[str, Any] = {}
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    train: dict[str, Any] = {}
    compare_to: str | None = None


class ResourcesConfig(Section):
    cpus_per_trial: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0)] = 1.0

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError("a share above 1 GPU must be a whole number of GPUs")
        return v
    max_concurrent: PositiveInt | None = None
    #: Where a trial's training slices come from: "memory" (all of them, shared through
    #: Ray's object store), "stream" (batches read from the HDF5 cache with a bounded
    #: read-ahead), or "auto": memory while they fit ``memory_budget_mb``, else stream.
    loader: Literal["auto", "memory", "stream"] = "auto"
    #: The most MB of training slices held in memory (for "auto"); default: a quarter of this machine's RAM.
    memory_budget_mb: PositiveInt | None = None
    #: Processes that load and preprocess patients while the slice cache is built; default: the CPUs
    #: available, at most 8 and at most one per 4 patients; 1 = in the main process.
    cache_workers: PositiveInt | None = None


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec(package) is not None


class MlflowConfig(Section):
    """``[run.mlflow]``: log every trial of ``mtlbench run`` to MLflow through Ray Tune's MLflowLoggerCallback."""

    enabled: Bool = True
    tracking_uri: str | None = None
    experiment_name: str | None = None
    tags: dict[str, str] = {}


class RunConfig(Section):
    max_failures: Annotated[Int, Field(ge=0)] = 0
    storage_path: str | None = None
    out_dir: str = "runs"
    tensorboard: Literal["auto"] | Bool = "auto"
    mlflow: MlflowConfig | None = None

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _tensorboard_value(cls, v: Any) -> Any:
        if v != "auto" and not isinstance(v, bool):
            raise ValueError('must be true, false or "auto" (on when the tensorboard package is installed)')
        return v

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, v: Any) -> Any:
        if v is True and not _installed("tensorboard"):
            raise ValueError("true needs the tensorboard package: pip install 'mtlbench[tensorboard]'")
        return v

    @field_validator("mlflow")
    @classmethod
    def _mlflow_installed(cls, v: MlflowConfig | None) -> MlflowConfig | None:
        if v is not None and v.enabled and not _installed("mlflow"):
            raise ValueError("MLflow logging needs the mlflow package: pip install 'mtlbench[mlflow]'")
        return v


def _default_tasks() -> dict[str, TaskEntry]:
    return {"segmentation": TaskEntry(), "landmarks": TaskEntry()}


def _default_strategies() -> dict[str, StrategyEntry]:
    return {"single": StrategyEntry()}


class Config(Section):
    experiment: ExperimentConfig = ExperimentConfig()
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    tasks: dict[str, TaskEntry] = Field(default_factory=_default_tasks)
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    strategies: dict[str, StrategyEntry] = Field(default_factory=_default_strategies)
    resources: ResourcesConfig = ResourcesConfig()
    run: RunConfig = RunConfig()
    profile: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "Config":
        for section, labels in (("tasks", self.tasks), ("strategies", self.strategies)):
            for label in labels:
                if not LABEL.fullmatch(label):
                    raise ValueError(
                        f"{section}.{label}: a label may hold letters, digits, '_' and '-' "
                        "(it names folders and metric keys)"
                    )
        if self.experiment.main_task not in self.tasks:
            raise ValueError(
                f"experiment.main_task {self.experiment.main_task!r} is not one of tasks: "
                f"{', '.join(self.tasks) or 'none'}"
            )
        if not any(s.enabled for s in self.strategies.values()):
            raise ValueError("strategies: no strategy is enabled")
        return self

    def task_use(self, label: str) -> str:
        return self.tasks[label].use or label

    def strategy_use(self, label: str) -> str:
        return self.strategies[label].use or label

    def source_params(self) -> dict[str, Any]:
        extra = self.data.model_extra or {}
        raw = extra.get(self.data.source, {})
        if isinstance(raw, str):  # ``manifest = "file.csv"`` is short for ``{path = "file.csv"}``
            raw = {"path": raw}
        if not isinstance(raw, dict):
            raise ConfigError(f"data.{self.data.source} must be a table (or a path string)")
        return dict(raw)

    def to_toml_dict(self) -> dict[str, Any]:
        return _drop_none(self.model_dump(mode="json"))


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None,
    profile: str | None = None,
    sets: list[str] | None = None,
) -> Config:
    """Read, merge and validate a benchmark config. ``path=None`` gives the defaults."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a UTF-8 text file") from None
    raw = apply_profile(raw, profile, source)
    for item in sets or []:
        apply_override(raw, item)
    return validate_config(raw, source)


def apply_profile(raw: dict[str, Any], profile: str | None, source: str) -> dict[str, Any]:
    """Deep-merge ``[profiles.NAME]`` over the base; drop the profiles table."""
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: 'profiles' must be a table of tables")
    if profile is None:
        return raw
    if profile not in profiles:
        hint = difflib.get_close_matches(profile, list(profiles), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        avail = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"{source}: unknown profile {profile!r}{extra}; available: {avail}")
    if not isinstance(profiles[profile], dict):
        raise ConfigError(f"{source}: profiles.{profile} must be a table")
    merged = deep_merge(raw, profiles[profile])
    merged["profile"] = profile
    return merged


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (1, 0.5, true, [1, 2], {a = 1}), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, _, value = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key part in {key!r}")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a table")
        node = child
    node[parts[-1]] = parse_value(value.strip())


def validate_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    pre = raw.get("preprocess")
    for old, new in MOVED_PREPROCESS_KEYS.items():
        if isinstance(pre, dict) and old in pre:
            raise ConfigError(f"{source}: preprocess.{old} has moved to the landmarks task: set {new} instead")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, Config)}") from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """One line for the first error: the key path, what is wrong, a suggestion for typos."""
    err = exc.errors()[0]
    loc = tuple(str(x) for x in err["loc"] if not str(x).startswith("function-"))
    path = ".".join(prefix + loc)
    if err["type"] == "extra_forbidden":
        known = allowed_keys(model, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        extra = f" (did you mean {'.'.join(prefix + loc[:-1] + (hint[0],))!r}?)" if hint else ""
        allowed = f"; allowed: {', '.join(sorted(known))}" if known and not hint else ""
        return f"unknown key {path!r}{extra}{allowed}"
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"missing key {path!r}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    if not path:
        return msg
    return f"{path}: {msg}{shown}"


def allowed_keys(model: Any, loc: tuple[str, ...]) -> list[str]:
    """The keys a table at ``loc`` under ``model`` may hold (for suggestions)."""
    node: Any = model
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part)
            if field is None:
                return []
            node = field.annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def to_toml(cfg: Config) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_toml_dict())


# ----------------------------------------------------------------------------- plugins


def validate_params(model: type[BaseModel], data: dict[str, Any], where: str) -> BaseModel:
    """Validate a plugin's parameter table; errors name the key under ``where``."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, tuple(where.split(".")))) from None


def expand_grid(entry: StrategyEntry) -> list[dict[str, Any]]:
    """Every parameter point of a strategy entry: ``params`` with each ``grid`` combination set."""
    import itertools

    keys = list(entry.grid)
    points = []
    for combo in itertools.product(*(entry.grid[k] for k in keys)):
        params = copy.deepcopy(entry.params)
        for key, value in zip(keys, combo):
            node = params
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"grid key {key!r}: {part!r} is not a table in params")
            node[parts[-1]] = value
        points.append(params)
    return points
