"""The static table of torchjd 0.18's aggregators that this plugin turns into mtlbench strategies.

Written by hand after reading ``torchjd.aggregation`` (0.18.0): one
:class:`AggregatorSpec` per exported ``Aggregator`` subclass, with one
:class:`Option` per argument of its ``__init__`` (same names, order and
defaults; the tests compare this table with ``inspect.signature`` of every
class, so a torchjd release that adds, drops or changes an aggregator or an
argument fails them). Nothing here imports torch or torchjd: the CLI imports
every plugin when it starts.

Bounds are torchjd's own checks (its property setters) and the papers'
ranges, so that a bad value is a one-line configuration error before any
training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, Field


class _Required:
    """Marks an option that has no default (torchjd requires it)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Value types of the exposed options (pydantic annotations).
Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Pos = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
UnitOpen = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
PrefVector = list[NonNeg] | None


def _in_unit_interval(value: float | list[float]) -> float | list[float]:
    if isinstance(value, list):
        if any(not 0.0 <= v <= 1.0 for v in value):
            raise ValueError(f"every value must be in [0, 1] (got {value!r})")
    elif not 0.0 <= value <= 1.0:
        raise ValueError("must be in [0, 1]")
    return value


#: One value in [0, 1], or a list of them (PCD's tau). The range is checked after the union so that an
#: error names the key, not one member of the union.
UnitOrUnits = Annotated[Finite | list[Finite], AfterValidator(_in_unit_interval)]

#: How an option reaches the torchjd constructor:
#: ``value``: as validated; ``tensor``: a list becomes ``torch.tensor`` (dtype and device of the
#: trunk's parameters), a float or None stays; ``n_tasks``: not exposed, the number of tasks;
#: ``projector``: not exposed itself, its place is taken by :data:`PROJECTOR_OPTIONS`, which build
#: a ``torchjd.linalg.QuadprogProjector``; ``fixed``: not exposed (not expressible in TOML),
#: torchjd's default is used.
OptionKind = Literal["value", "tensor", "n_tasks", "projector", "fixed"]


@dataclass(frozen=True)
class Option:
    """One constructor argument of an aggregator."""

    name: str
    type: Any = None  # the pydantic annotation of the exposed value (None when not exposed)
    default: Any = REQUIRED
    kind: OptionKind = "value"
    #: For ``tensor`` options given as a list: the length it must have, "tasks" (one per task)
    #: or "tasks-1" (one per secondary task).
    length: Literal["tasks", "tasks-1"] | None = None
    help: str = ""

    @property
    def exposed(self) -> bool:
        return self.kind in ("value", "tensor")


#: The options of ``torchjd.linalg.QuadprogProjector`` (keyword-only), exposed in place of the
#: ``projector`` argument of UPGrad and DualProj (the only projector torchjd 0.18 ships).
PROJECTOR_OPTIONS: tuple[Option, ...] = (
    Option("norm_eps", NonNeg, 0.0001, help="QuadprogProjector: added when normalising the Gramian (>= 0)"),
    Option("reg_eps", NonNeg, 0.0001, help="QuadprogProjector: added to the Gramian's diagonal (>= 0)"),
)

#: The pip extras of this plugin: the modules each needs (as torchjd checks them before building
#: the aggregator) and torchjd's own extra that brings them.
EXTRAS: dict[str, tuple[str, ...]] = {
    "quadprog_projector": ("numpy", "qpsolvers", "quadprog"),
    "cagrad": ("numpy", "cvxpy", "clarabel"),
    "nash_mtl": ("numpy", "cvxpy", "ecos"),
    "fairgrad": ("numpy", "scipy"),
}
TORCHJD_EXTRAS: dict[str, str] = {
    "quadprog_projector": "quadprog-projector",
    "cagrad": "cagrad",
    "nash_mtl": "nash-mtl",
    "fairgrad": "fairgrad",
}

Check = Callable[[dict[str, Any], int], "str | None"]


@dataclass(frozen=True)
class AggregatorSpec:
    """One torchjd aggregator and how it becomes a strategy."""

    cls: str  # the class name in torchjd.aggregation
    cite: str  # "Authors year"; "" when it is no paper's method
    paper: str  # "Title (venue)"
    url: str
    summary: str  # a few words: what it does
    options: tuple[Option, ...] = ()
    extra: str | None = None  # the pip extra it needs, or None
    #: Checks against the number of tasks: return a one-line message when the params do not fit.
    check: Check | None = None

    @property
    def name(self) -> str:
        return f"jd_{self.cls.lower()}"

    @property
    def description(self) -> str:
        """One line: the torchjd class, the paper and what it does."""
        cite = f" ({self.cite}, {self.paper.split(' (')[0]})" if self.cite else ""
        return f"torchjd {self.cls}{cite}: {self.summary}."

    def exposed_options(self) -> tuple[Option, ...]:
        out: list[Option] = []
        for opt in self.options:
            if opt.kind == "projector":
                out.extend(PROJECTOR_OPTIONS)
            elif opt.exposed:
                out.append(opt)
        return tuple(out)


# ----------------------------------------------------------------------------- task-count checks


def _check_krum(params: dict[str, Any], n_tasks: int) -> str | None:
    f, k = params["n_byzantine"], params["n_selected"]
    if n_tasks < f + 3:
        return f"n_byzantine = {f} needs at least n_byzantine + 3 = {f + 3} tasks; this run has {n_tasks}"
    if k > n_tasks:
        return f"n_selected = {k} is more than the {n_tasks} tasks of this run"
    return None


def _check_trimmed_mean(params: dict[str, Any], n_tasks: int) -> str | None:
    k = params["trim_number"]
    if n_tasks < 2 * k + 1:
        return f"trim_number = {k} needs at least 2 * trim_number + 1 = {2 * k + 1} tasks; this run has {n_tasks}"
    return None


# ----------------------------------------------------------------------------- the table

_PREF = "one weight per task (>= 0), main task first; default: equal weights"

AGGREGATORS: tuple[AggregatorSpec, ...] = (
    AggregatorSpec(
        "AlignedMTL",
        "Senushkin et al. 2023",
        "Independent Component Alignment for Multi-Task Learning (CVPR)",
        "https://openaccess.thecvf.com/content/CVPR2023/papers/Senushkin_Independent_Component_Alignment_for_Multi-Task_Learning_CVPR_2023_paper.pdf",
        "align the principal components of the task gradients (condition number 1), then weight",
        (
            Option("pref_vector", PrefVector, None, "tensor", "tasks", _PREF),
            Option("scale_mode", Literal["min", "median", "rmse"], "min",
                   help="eigenvalue that sets the scale: smallest, median or mean"),
        ),
    ),
    AggregatorSpec(
        "CAGrad",
        "Liu et al. 2021",
        "Conflict-Averse Gradient Descent for Multi-task Learning (NeurIPS)",
        "https://arxiv.org/pdf/2110.14048.pdf",
        "best worst-task improvement within a ball of radius c around the mean gradient",
        (
            Option("c", NonNeg, REQUIRED, help="radius scale of the ball constraint (>= 0; 0 = mean gradient)"),
            Option("norm_eps", NonNeg, 0.0001, help="added when normalising the Gramian (>= 0)"),
        ),
        extra="cagrad",
    ),
    AggregatorSpec(
        "ConFIG",
        "Liu et al. 2024",
        "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
        "https://arxiv.org/pdf/2408.11104",
        "the direction with equal positive cosine to every task gradient, scaled by their projections",
        (Option("pref_vector", PrefVector, None, "tensor", "tasks",
                "one weight per task (>= 0), main task first; default: all 1"),),
    ),
    AggregatorSpec(
        "Constant",
        "",
        "",
        "",
        "fixed weighted sum of the task gradients on the trunk",
        (Option("weights", list[Finite], REQUIRED, "tensor", "tasks",
                "one weight per task, main task first (required)"),),
    ),
    AggregatorSpec(
        "DualProj",
        "Lopez-Paz & Ranzato 2017",
        "Gradient Episodic Memory for Continual Learning (NeurIPS), Eq. 11",
        "https://proceedings.neurips.cc/paper/2017/file/f87522788a2be2d171666752f97ddebb-Paper.pdf",
        "project the mean gradient onto the dual cone of the task gradients",
        (
            Option("pref_vector", PrefVector, None, "tensor", "tasks", _PREF),
            Option("projector", kind="projector", default=None),
        ),
        extra="quadprog_projector",
    ),
    AggregatorSpec(
        "ExcessMTL",
        "He et al. 2024",
        "Robust Multi-Task Learning with Excess Risks (ICML)",
        "https://proceedings.mlr.press/v235/he24n.html",
        "exponentiated-gradient task weights driven by estimated excess risks (stateful)",
        (
            Option("robust_step_size", Pos, 1.0, help="step size of the exponentiated weight update (> 0)"),
            Option("n_warmup_steps", NonNegInt, 0, help="steps with uniform weights that collect statistics first"),
        ),
    ),
    AggregatorSpec(
        "FairGrad",
        "Ban & Ji 2024",
        "Fair Resource Allocation in Multi-Task Learning (ICML)",
        "https://arxiv.org/pdf/2402.15638.pdf",
        "alpha-fair allocation of the update among the tasks",
        (
            Option("alpha", NonNeg, REQUIRED, help="fairness parameter of alpha-fairness (>= 0; 0 = mean)"),
            Option("max_iters", PosInt | None, None, help="iterations of the least-squares solver (default: 100 x tasks)"),
        ),
        extra="fairgrad",
    ),
    AggregatorSpec(
        "GradDrop",
        "Chen et al. 2020",
        "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout (NeurIPS)",
        "https://arxiv.org/pdf/2010.06808.pdf",
        "randomly keep, per coordinate, only the positive or the negative task gradients",
        (
            Option("f", kind="fixed", default="<identity>", help="function of the sign purity: torchjd's identity"),
            Option("leak", list[Unit] | None, None, "tensor", "tasks",
                   "one leak in [0, 1] per task, main task first; default: no leak"),
        ),
    ),
    AggregatorSpec(
        "GradVac",
        "Wang et al. 2021",
        "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively "
        "Multilingual Models (ICLR)",
        "https://arxiv.org/abs/2010.05874",
        "raise each pair's gradient cosine to its moving-average target (stateful)",
        (
            Option("beta", Unit, 0.5, help="decay of the moving average of the cosine targets, in [0, 1]"),
            Option("eps", NonNeg, 1e-08, help="added to denominators (>= 0)"),
        ),
    ),
    AggregatorSpec(
        "IMTLG",
        "Liu et al. 2021",
        "Towards Impartial Multi-task Learning (ICLR)",
        "https://discovery.ucl.ac.uk/id/eprint/10120667/",
        "the update with equal projections on every task's unit gradient (generalised as in Quinton & Rey 2024)",
    ),
    AggregatorSpec(
        "Krum",
        "Blanchard et al. 2017",
        "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent (NeurIPS)",
        "https://proceedings.neurips.cc/paper/2017/file/f4b9ec30ad9f68f89b29639786cb62ef-Paper.pdf",
        "average of the task gradients closest to the others (Byzantine-robust; needs >= n_byzantine + 3 tasks)",
        (
            Option("n_byzantine", NonNegInt, REQUIRED, help="number of task gradients that may be adversarial (>= 0)"),
            Option("n_selected", PosInt, 1, help="number of gradients averaged (Multi-Krum; >= 1)"),
        ),
        check=_check_krum,
    ),
    AggregatorSpec(
        "MGDA",
        "Sener & Koltun 2018",
        "Multi-Task Learning as Multi-Objective Optimization (NeurIPS); Desideri 2012",
        "https://proceedings.neurips.cc/paper_files/paper/2018/file/432aca3a1e345e339f35a30c8f65edce-Paper.pdf",
        "minimum-norm point of the convex hull of the task gradients (Frank-Wolfe)",
        (
            Option("epsilon", Pos, 0.001, help="stop when the Frank-Wolfe step is below this (> 0)"),
            Option("max_iters", PosInt, 100, help="maximum Frank-Wolfe iterations (>= 1)"),
        ),
    ),
    AggregatorSpec(
        "Mean",
        "",
        "",
        "",
        "mean of the task gradients on the trunk",
    ),
    AggregatorSpec(
        "NashMTL",
        "Navon et al. 2022",
        "Multi-Task Learning as a Bargaining Game (ICML)",
        "https://arxiv.org/pdf/2202.01017.pdf",
        "Nash bargaining solution among the tasks (stateful)",
        (
            Option("n_tasks", kind="n_tasks", help="the number of tasks (filled in)"),
            Option("max_norm", NonNeg, 1.0, help="clip the update's norm to this (0: no clipping)"),
            Option("update_weights_every", PosInt, 1, help="recompute the weights every this many steps (>= 1)"),
            Option("optim_niter", PosInt, 20, help="iterations of the convex solver (>= 1)"),
        ),
        extra="nash_mtl",
    ),
    AggregatorSpec(
        "PCD",
        "TMLR 2026",
        "Not All Objectives Are Born Equal: Priority-Constrained Descent for "
        "Hierarchical Multi-Objective Optimization (TMLR; reference code github.com/DaraVaram/"
        "priority-constrained-descent)",
        "https://openreview.net/forum?id=HT01yGHLEt",
        "follow the main task's gradient, guaranteeing each auxiliary task a fraction tau of progress (stateful)",
        (
            Option("tau", UnitOrUnits, 0.02, "tensor", "tasks-1",
                   "guaranteed fraction in [0, 1]: one value, or one per auxiliary task"),
            Option("beta", UnitOpen, 0.999, help="decay of the moving average of squared gradient norms, in [0, 1)"),
            Option("eps", NonNeg, 1e-08, help="added to the moving average (>= 0)"),
        ),
    ),
    AggregatorSpec(
        "PCGrad",
        "Yu et al. 2020",
        "Gradient Surgery for Multi-Task Learning (NeurIPS)",
        "https://arxiv.org/pdf/2001.06782.pdf",
        "project each task gradient off the others it conflicts with, in random order, then sum",
    ),
    AggregatorSpec(
        "Random",
        "Lin et al. 2022",
        "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning (TMLR)",
        "https://arxiv.org/pdf/2111.10603.pdf",
        "random positive weights (softmax of a normal draw) at every step",
    ),
    AggregatorSpec(
        "Sum",
        "",
        "",
        "",
        "sum of the task gradients on the trunk",
    ),
    AggregatorSpec(
        "TrimmedMean",
        "Yin et al. 2018",
        "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates (ICML)",
        "https://proceedings.mlr.press/v80/yin18a/yin18a.pdf",
        "coordinate-wise mean after dropping the trim_number largest and smallest values",
        (Option("trim_number", NonNegInt, REQUIRED, help="values dropped at each end, per coordinate (>= 0)"),),
        check=_check_trimmed_mean,
    ),
    AggregatorSpec(
        "UPGrad",
        "Quinton & Rey 2024",
        "Jacobian Descent For Multi-Objective Optimization (arXiv 2406.16232)",
        "https://arxiv.org/pdf/2406.16232",
        "project each task gradient onto the dual cone of all of them, then average (never conflicts)",
        (
            Option("pref_vector", PrefVector, None, "tensor", "tasks", _PREF),
            Option("projector", kind="projector", default=None),
        ),
        extra="quadprog_projector",
    ),
)

#: Exported Aggregator subclasses that are not registered, and why.
NOT_REGISTERED: dict[str, str] = {
    "Aggregator": "the abstract base class",
    "WeightedAggregator": "a base class: combines the rows with a Weighting object given to it",
    "GramianWeightedAggregator": "a base class: combines the rows with a Gramian Weighting object given to it",
}

BY_NAME: dict[str, AggregatorSpec] = {spec.name: spec for spec in AGGREGATORS}
