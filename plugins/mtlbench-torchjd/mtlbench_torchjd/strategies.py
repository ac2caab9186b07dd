"""One mtlbench strategy per torchjd aggregator, generated from the static table in :mod:`.table`.

Every strategy does Jacobian descent on the trunk with ``torchjd.autojac``:
``mtl_backward`` puts each task's gradient in its tail's ``.grad`` and the
Jacobian of the losses (one row per task, main task first) with respect to the
trunk's parameters in their ``.jac``, differentiating through the shared
``features``; ``jac_to_grad`` then aggregates that Jacobian into the trunk's
``.grad`` with the strategy's aggregator.

torch and torchjd are imported inside functions only: the CLI imports this
module when it starts. The Params models are pydantic models built from the
table when this module is imported (cheap, no torch).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, create_model

from mtlbench import api
from mtlbench.api import StepContext, Strategy
from mtlbench.errors import ConfigError, PluginError

from mtlbench_torchjd.table import AGGREGATORS, EXTRAS, REQUIRED, AggregatorSpec, Option

if TYPE_CHECKING:  # pragma: no cover
    import torch

DISTRIBUTION = "mtlbench-torchjd"


# ----------------------------------------------------------------------------- optional packages


def find_module(name: str) -> bool:
    """Whether module ``name`` can be imported (without importing it). Tests monkeypatch this."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(extra: str | None) -> list[str]:
    """The modules of ``extra`` that are not installed ([] when none, or no extra)."""
    if extra is None:
        return []
    return [m for m in EXTRAS[extra] if not find_module(m)]


def extra_error(name: str, extra: str) -> PluginError:
    return PluginError(f"strategy {name} needs the extra: pip install '{DISTRIBUTION}[{extra}]'")


# ----------------------------------------------------------------------------- params


def params_model(spec: AggregatorSpec) -> type[api.Params]:
    """The strategy's Params: one field per exposed option, with torchjd's default and the table's bounds."""
    fields: dict[str, Any] = {}
    for opt in spec.exposed_options():
        default = ... if opt.default is REQUIRED else opt.default
        fields[opt.name] = (opt.type, Field(default, description=opt.help or None))
    model = create_model(f"{spec.cls}Params", __base__=api.Params, __module__=__name__, **fields)
    model.__doc__ = f"Parameters of {spec.name} (the arguments of torchjd.aggregation.{spec.cls})."
    return model


def _check_lengths(spec: AggregatorSpec, values: dict[str, Any], tasks: list[str]) -> None:
    """A one-line ConfigError when a per-task list does not have one value per task (or per auxiliary task)."""
    n = len(tasks)
    for opt in spec.options:
        value = values.get(opt.name)
        if opt.kind != "tensor" or not isinstance(value, list):
            continue
        want = n if opt.length == "tasks" else n - 1
        if len(value) != want:
            what = "task" if opt.length == "tasks" else "auxiliary task"
            order = ", ".join(tasks if opt.length == "tasks" else tasks[1:]) or "none"
            raise ConfigError(
                f"{spec.name}: {opt.name} has {len(value)} values; it needs one per {what} ({want}: {order})"
            )
    if spec.check is not None:
        message = spec.check(values, n)
        if message:
            raise ConfigError(f"{spec.name}: {message}")


# ----------------------------------------------------------------------------- the strategies


class TorchJDStrategy(Strategy):
    """Jacobian descent on the trunk with one torchjd aggregator (``spec``); each tail learns its own loss.

    The Jacobian's rows are the tasks in ``model_tasks()`` order: the main task
    first, then the others in the order of the configuration's ``[tasks.*]``
    tables. Per-task lists (``pref_vector``, Constant's ``weights``,
    GradDrop's ``leak``) follow that order; PCD's primary objective is the main
    task.
    """

    spec: ClassVar[AggregatorSpec]

    def __init__(self, params: api.Params, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        first = [main_task] if main_task in self.all_tasks else []
        self.order = first + [t for t in self.all_tasks if t not in first]
        self.values = params.model_dump()
        _check_lengths(self.spec, self.values, self.order)
        if missing_modules(self.spec.extra):
            raise extra_error(self.name, self.spec.extra)  # type: ignore[arg-type]
        import torch

        self._key: tuple[Any, Any] = (torch.float32, torch.device("cpu"))
        self.aggregator = self.build(*self._key)

    def model_tasks(self) -> list[str]:
        return list(self.order)

    # The options that depend on the trunk's dtype and device (tensors).
    def _has_tensors(self) -> bool:
        return any(o.kind == "tensor" and isinstance(self.values.get(o.name), list) for o in self.spec.options)

    def kwargs(self, dtype: Any, device: Any) -> dict[str, Any]:
        """The torchjd constructor's keyword arguments for these params."""
        import torch

        out: dict[str, Any] = {}
        for opt in self.spec.options:
            if opt.kind == "n_tasks":
                out[opt.name] = len(self.order)
            elif opt.kind == "projector":
                from torchjd.linalg import QuadprogProjector

                out[opt.name] = QuadprogProjector(norm_eps=self.values["norm_eps"], reg_eps=self.values["reg_eps"])
            elif opt.kind == "tensor":
                value = self.values[opt.name]
                out[opt.name] = torch.tensor(value, dtype=dtype, device=device) if isinstance(value, list) else value
            elif opt.kind == "value":
                out[opt.name] = self.values[opt.name]
            # "fixed": torchjd's default
        return out

    def build(self, dtype: Any, device: Any) -> Any:
        """A new torchjd aggregator for these params, its tensors in ``dtype`` on ``device``."""
        try:
            import torchjd.aggregation as agg

            return getattr(agg, self.spec.cls)(**self.kwargs(dtype, device))
        except ImportError:
            raise extra_error(self.name, self.spec.extra or "full") from None
        except (ValueError, TypeError) as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{self.name}: {line}") from None

    def aggregator_for(self, dtype: Any, device: Any) -> Any:
        """The aggregator, rebuilt once if its tensor options must move to the trunk's dtype or device."""
        key = (dtype, device)
        if key != self._key and self._has_tensors():
            self.aggregator = self.build(dtype, device)
        self._key = key
        return self.aggregator

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        import torch
        from torchjd.autojac import jac_to_grad, mtl_backward

        missing = [t for t in self.order if t not in losses]
        if missing:
            raise PluginError(f"strategy {self.name}: no loss for task(s) {', '.join(missing)} in this step")
        if ctx.features is None:
            raise PluginError(f"strategy {self.name}: the trainer gave no features (StepContext.features)")
        shared = [p for p in ctx.shared_parameters if p.requires_grad]
        tails = [[p for p in ctx.task_parameters.get(t, []) if p.requires_grad] for t in self.order]
        tensors = [losses[t] for t in self.order]
        if not shared:  # a frozen trunk: each tail still learns its own loss
            torch.autograd.backward(tensors)
            return {}
        aggregator = self.aggregator_for(shared[0].dtype, shared[0].device)
        try:
            # Under bf16/fp16 autocast torch's vmap of batch-norm backward (mixed bf16 activations, float32
            # weights) raises; one plain backward per task (parallel_chunk_size=1) computes the same Jacobian.
            low = getattr(ctx.features, "dtype", None) in (torch.bfloat16, torch.float16)
            mtl_backward(tensors, ctx.features, tasks_params=tails, shared_params=shared,
                         parallel_chunk_size=1 if low else None)
            weights = jac_to_grad(shared, aggregator)
        finally:
            for p in shared:  # never leave a Jacobian behind (jac_to_grad frees them; an error may not)
                if hasattr(p, "jac"):
                    del p.jac
        if weights is None:
            return {}
        values = weights.detach().reshape(-1).tolist()
        return {f"jd/{t}_weight": float(v) for t, v in zip(self.order, values)}


def strategy_class(spec: AggregatorSpec) -> type[TorchJDStrategy]:
    """The strategy class of one table entry (a module attribute, so it pickles by reference)."""
    cls_name = f"JD{spec.cls}"
    doc = f"{spec.description}\n\n{TorchJDStrategy.__doc__}"
    cls = type(
        cls_name,
        (TorchJDStrategy,),
        {
            "name": spec.name,
            "description": spec.description,
            "Params": params_model(spec),
            "spec": spec,
            "__doc__": doc,
            "__module__": __name__,
            "__qualname__": cls_name,
        },
    )
    return cls  # type: ignore[return-value]


STRATEGIES: tuple[type[TorchJDStrategy], ...] = tuple(strategy_class(spec) for spec in AGGREGATORS)
BY_NAME: dict[str, type[TorchJDStrategy]] = {cls.name: cls for cls in STRATEGIES}
for _cls in STRATEGIES:
    globals()[_cls.__name__] = _cls
    globals()[_cls.Params.__name__] = _cls.Params
del _cls
