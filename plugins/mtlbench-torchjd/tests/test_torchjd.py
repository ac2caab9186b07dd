"""Tests of mtlbench-torchjd: the table covers torchjd 0.18, each strategy does what torchjd's aggregator does.

The central test (``test_strategy_equals_torchjd_on_the_same_jacobian``) runs
every strategy on a small fixed float64 model and compares the trunk's
``.grad`` with torchjd's aggregator called directly on the Jacobian computed
here, one ``torch.autograd.grad`` per task (not through the features as
``mtl_backward`` does), over three steps so that stateful aggregators are
compared too. The torchjd arguments are written out by hand for each case.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

import mtlbench_torchjd
from mtlbench.api import StepContext
from mtlbench.config import validate_params
from mtlbench.errors import ConfigError, PluginError
from mtlbench_torchjd import strategies as jds
from mtlbench_torchjd.table import (
    AGGREGATORS,
    EXTRAS,
    NOT_REGISTERED,
    PROJECTOR_OPTIONS,
    REQUIRED,
    TORCHJD_EXTRAS,
)

ta = pytest.importorskip("torchjd.aggregation")
from torchjd.linalg import QuadprogProjector  # noqa: E402

TASKS3 = ["seg", "lm", "aux"]
DT = torch.float64
PLUGIN_DIR = Path(__file__).resolve().parents[1]


def tasks(n: int) -> list[str]:
    return TASKS3[:n]


def installed(spec_name: str) -> bool:
    return not jds.missing_modules(mtlbench_torchjd.BY_NAME[spec_name].spec.extra)


def needs_extra(spec_name: str):
    extra = mtlbench_torchjd.BY_NAME[spec_name].spec.extra
    return pytest.mark.skipif(
        not installed(spec_name), reason=f"{spec_name} needs the extra {extra} (not installed)"
    )


def make(name: str, params: dict, task_list: list[str], main: str | None = None):
    cls = mtlbench_torchjd.BY_NAME[name]
    validated = validate_params(cls.Params, params, f"strategies.{name}.params")
    return cls(validated, list(task_list), main or task_list[0])


# ----------------------------------------------------------------------------- the cases, by hand

W = [0.7, 0.2, 0.1]


def _t(values):
    return torch.tensor(values, dtype=DT)


# (id, strategy name, strategy params for n tasks, torchjd class, torchjd kwargs for n tasks, task counts)
CASES = [
    ("alignedmtl", "jd_alignedmtl", lambda n: {}, "AlignedMTL", lambda n: {}, (2, 3)),
    ("alignedmtl-median-pref", "jd_alignedmtl", lambda n: {"pref_vector": W[:n], "scale_mode": "median"},
     "AlignedMTL", lambda n: {"pref_vector": _t(W[:n]), "scale_mode": "median"}, (3,)),
    ("cagrad", "jd_cagrad", lambda n: {"c": 0.5}, "CAGrad", lambda n: {"c": 0.5}, (2, 3)),
    ("cagrad-c0.2", "jd_cagrad", lambda n: {"c": 0.2, "norm_eps": 1e-3}, "CAGrad",
     lambda n: {"c": 0.2, "norm_eps": 1e-3}, (3,)),
    ("config", "jd_config", lambda n: {}, "ConFIG", lambda n: {}, (2, 3)),
    ("config-pref", "jd_config", lambda n: {"pref_vector": W[:n]}, "ConFIG",
     lambda n: {"pref_vector": _t(W[:n])}, (2, 3)),
    ("constant", "jd_constant", lambda n: {"weights": W[:n]}, "Constant", lambda n: {"weights": _t(W[:n])}, (2, 3)),
    ("dualproj", "jd_dualproj", lambda n: {}, "DualProj", lambda n: {}, (2, 3)),
    ("dualproj-pref-eps", "jd_dualproj", lambda n: {"pref_vector": W[:n], "norm_eps": 1e-3, "reg_eps": 1e-5},
     "DualProj", lambda n: {"pref_vector": _t(W[:n]), "projector": QuadprogProjector(norm_eps=1e-3, reg_eps=1e-5)},
     (3,)),
    ("excessmtl", "jd_excessmtl", lambda n: {}, "ExcessMTL", lambda n: {}, (2, 3)),
    ("excessmtl-warmup", "jd_excessmtl", lambda n: {"robust_step_size": 0.5, "n_warmup_steps": 1}, "ExcessMTL",
     lambda n: {"robust_step_size": 0.5, "n_warmup_steps": 1}, (3,)),
    ("fairgrad", "jd_fairgrad", lambda n: {"alpha": 1.0}, "FairGrad", lambda n: {"alpha": 1.0}, (2, 3)),
    ("fairgrad-alpha2", "jd_fairgrad", lambda n: {"alpha": 2.0, "max_iters": 50}, "FairGrad",
     lambda n: {"alpha": 2.0, "max_iters": 50}, (3,)),
    ("graddrop", "jd_graddrop", lambda n: {}, "GradDrop", lambda n: {}, (2, 3)),
    ("graddrop-leak", "jd_graddrop", lambda n: {"leak": [0.5, 0.0, 0.25][:n]}, "GradDrop",
     lambda n: {"leak": _t([0.5, 0.0, 0.25][:n])}, (2, 3)),
    ("gradvac", "jd_gradvac", lambda n: {}, "GradVac", lambda n: {}, (2, 3)),
    ("gradvac-beta", "jd_gradvac", lambda n: {"beta": 0.9, "eps": 1e-6}, "GradVac",
     lambda n: {"beta": 0.9, "eps": 1e-6}, (3,)),
    ("imtlg", "jd_imtlg", lambda n: {}, "IMTLG", lambda n: {}, (2, 3)),
    ("krum", "jd_krum", lambda n: {"n_byzantine": 0}, "Krum", lambda n: {"n_byzantine": 0}, (3,)),
    ("krum-multi", "jd_krum", lambda n: {"n_byzantine": 0, "n_selected": 2}, "Krum",
     lambda n: {"n_byzantine": 0, "n_selected": 2}, (3,)),
    ("mgda", "jd_mgda", lambda n: {}, "MGDA", lambda n: {}, (2, 3)),
    ("mgda-eps", "jd_mgda", lambda n: {"epsilon": 1e-6, "max_iters": 500}, "MGDA",
     lambda n: {"epsilon": 1e-6, "max_iters": 500}, (3,)),
    ("mean", "jd_mean", lambda n: {}, "Mean", lambda n: {}, (2, 3)),
    ("nashmtl", "jd_nashmtl", lambda n: {}, "NashMTL", lambda n: {"n_tasks": n}, (2, 3)),
    ("nashmtl-every2", "jd_nashmtl", lambda n: {"max_norm": 0.0, "update_weights_every": 2, "optim_niter": 5},
     "NashMTL", lambda n: {"n_tasks": n, "max_norm": 0.0, "update_weights_every": 2, "optim_niter": 5}, (3,)),
    ("pcd", "jd_pcd", lambda n: {}, "PCD", lambda n: {}, (2, 3)),
    ("pcd-taus", "jd_pcd", lambda n: {"tau": [0.3, 0.1][: n - 1], "beta": 0.5, "eps": 0.0}, "PCD",
     lambda n: {"tau": _t([0.3, 0.1][: n - 1]), "beta": 0.5, "eps": 0.0}, (2, 3)),
    ("pcgrad", "jd_pcgrad", lambda n: {}, "PCGrad", lambda n: {}, (2, 3)),
    ("random", "jd_random", lambda n: {}, "Random", lambda n: {}, (2, 3)),
    ("sum", "jd_sum", lambda n: {}, "Sum", lambda n: {}, (2, 3)),
    ("trimmedmean", "jd_trimmedmean", lambda n: {"trim_number": 0}, "TrimmedMean",
     lambda n: {"trim_number": 0}, (2, 3)),
    ("trimmedmean-1", "jd_trimmedmean", lambda n: {"trim_number": 1}, "TrimmedMean",
     lambda n: {"trim_number": 1}, (3,)),
    ("upgrad", "jd_upgrad", lambda n: {}, "UPGrad", lambda n: {}, (2, 3)),
    ("upgrad-pref-eps", "jd_upgrad", lambda n: {"pref_vector": W[:n], "norm_eps": 1e-3, "reg_eps": 1e-5}, "UPGrad",
     lambda n: {"pref_vector": _t(W[:n]), "projector": QuadprogProjector(norm_eps=1e-3, reg_eps=1e-5)}, (2, 3)),
]
# The default case of each strategy: its id is the strategy name without "jd_".
DEFAULTS = {name: params for cid, name, params, *_ in CASES if cid == name.removeprefix("jd_")}

PARAMS = [
    pytest.param(name, params(n), cls, kwargs, n, id=f"{cid}-{n}tasks", marks=needs_extra(name))
    for cid, name, params, cls, kwargs, counts in CASES
    for n in counts
]


# ----------------------------------------------------------------------------- a small fixed model


class Problem:
    """A tiny float64 trunk (conv, tanh, conv) and one 1x1-conv tail per task, with fixed batches."""

    def __init__(self, n_tasks: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).to(DT)
        self.tails = {t: nn.Conv2d(3, 1, 1).to(DT) for t in tasks(n_tasks)}
        if n_tasks > 1:  # the same tail for the first two tasks, whose targets are nearly opposite: they conflict
            self.tails["lm"].load_state_dict(self.tails["seg"].state_dict())
        self.batches = []
        for _ in range(3):
            x = torch.randn(4, 2, 5, 5, generator=g, dtype=DT)
            base = 1.5 + torch.randn(4, 1, 5, 5, generator=g, dtype=DT)
            ys = [base, -0.7 * base + torch.randn(4, 1, 5, 5, generator=g, dtype=DT),
                  torch.randn(4, 1, 5, 5, generator=g, dtype=DT)]
            self.batches.append((x, ys))

    def shared(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def losses(self, step: int, order: list[str]):
        x, ys = self.batches[step]
        features = self.trunk(x)
        index = {t: i for i, t in enumerate(TASKS3)}
        losses = {t: ((self.tails[t](features) - ys[index[t]]) ** 2).mean() for t in order}
        return losses, features

    def zero(self) -> None:
        for p in self.shared() + [p for tail in self.tails.values() for p in tail.parameters()]:
            p.grad = None

    def ctx(self, step: int, features) -> StepContext:
        return StepContext(
            step=step, epoch=0, shared_parameters=self.shared(),
            task_parameters={t: list(m.parameters()) for t, m in self.tails.items()},
            task_kinds={t: "regression" for t in self.tails}, features=features,
        )

    def run(self, strategy, step: int, seed: int):
        """strategy.backward on batch ``step``: (flat trunk grad, {task: flat tail grad}, logs)."""
        self.zero()
        losses, features = self.losses(step, strategy.model_tasks())
        torch.manual_seed(seed)
        logs = strategy.backward(losses, self.ctx(step, features))
        grad = torch.cat([p.grad.reshape(-1) for p in self.shared()])
        tails = {t: torch.cat([p.grad.reshape(-1) for p in self.tails[t].parameters()]) for t in losses}
        assert not any(hasattr(p, "jac") for p in self.shared())
        return grad, tails, logs

    def jacobian(self, step: int, order: list[str]):
        """The T x P Jacobian of the losses wrt the trunk (one autograd.grad per task) and each tail's gradient."""
        losses, _ = self.losses(step, order)
        rows, tails = [], {}
        for t in order:
            tail = list(self.tails[t].parameters())
            grads = torch.autograd.grad(losses[t], self.shared() + tail, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads[: len(self.shared())]]))
            tails[t] = torch.cat([g.reshape(-1) for g in grads[len(self.shared()):]])
        return torch.stack(rows), tails


class Linear:
    """Trunk = one vector w (the features are w itself); task i's loss is s_i * (w . a_i), s_i = 1 its tail.

    The gradient of task i on the trunk is exactly a_i: aggregators can be checked on known gradients.
    """

    def __init__(self, rows: list[list[float]], names: list[str] | None = None) -> None:
        self.a = torch.tensor(rows, dtype=DT)
        self.names = names or TASKS3[: len(rows)]
        self.w = nn.Parameter(torch.randn(self.a.shape[1], dtype=DT))
        self.s = {t: nn.Parameter(torch.ones((), dtype=DT)) for t in self.names}

    def run(self, strategy) -> tuple[torch.Tensor, dict]:
        self.w.grad = None
        for s in self.s.values():
            s.grad = None
        features = self.w * 1.0
        index = {t: i for i, t in enumerate(self.names)}
        losses = {t: self.s[t] * (features @ self.a[index[t]]) for t in strategy.model_tasks()}
        ctx = StepContext(step=0, epoch=0, shared_parameters=[self.w],
                          task_parameters={t: [s] for t, s in self.s.items()},
                          task_kinds={t: "regression" for t in self.names}, features=features)
        logs = strategy.backward(losses, ctx)
        return self.w.grad.clone(), logs


# ----------------------------------------------------------------------------- coverage of torchjd


def exported_aggregators() -> set[str]:
    return {n for n in dir(ta) if inspect.isclass(getattr(ta, n)) and issubclass(getattr(ta, n), ta.Aggregator)}


def test_table_covers_every_exported_aggregator_subclass():
    table = {spec.cls for spec in AGGREGATORS}
    assert len(table) == len(AGGREGATORS)
    assert exported_aggregators() == table | set(NOT_REGISTERED)
    assert not table & set(NOT_REGISTERED)


def test_not_registered_ones_are_the_base_classes():
    for name in NOT_REGISTERED:
        cls = getattr(ta, name)
        assert name == "Aggregator" or any(
            "Weighting" in str(p.annotation) for p in inspect.signature(cls.__init__).parameters.values()
        ), name


def _tokens(annotation) -> set[str]:
    """The type names of a signature annotation (a string such as 'int | None', or a type)."""
    if isinstance(annotation, str):
        return {part.strip() for part in annotation.split("|")}
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {f"Literal{sorted(typing.get_args(annotation))}"}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return set().union(*(_tokens(a) for a in typing.get_args(annotation)))
    if annotation is type(None):
        return {"None"}
    return {getattr(annotation, "__name__", str(annotation))}


def _table_tokens(tp) -> set[str]:
    """The same for the table's pydantic annotation (Annotated bounds dropped, lists seen as Tensor)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _table_tokens(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return {f"Literal{sorted(typing.get_args(tp))}"}
    if origin in (typing.Union, __import__("types").UnionType):
        return set().union(*(_table_tokens(a) for a in typing.get_args(tp)))
    if origin is list:
        return {"Tensor"}
    if tp is type(None):
        return {"None"}
    return {tp.__name__}


@pytest.mark.parametrize("spec", AGGREGATORS, ids=lambda s: s.name)
def test_table_matches_the_constructor_signature(spec):
    sig = inspect.signature(getattr(ta, spec.cls).__init__)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    assert [p.name for p in params] == [o.name for o in spec.options]
    for p, opt in zip(params, spec.options):
        if p.default is inspect.Parameter.empty:
            assert opt.default is REQUIRED, f"{spec.cls}.{p.name} has no default in torchjd"
        elif opt.kind != "fixed":
            assert opt.default == p.default, f"{spec.cls}.{p.name}: torchjd's default is {p.default!r}"
        if opt.kind == "n_tasks":
            assert p.name == "n_tasks"
        elif opt.kind == "projector":
            assert "DualConeProjector" in str(p.annotation)
        elif opt.kind == "fixed":
            assert p.default is not inspect.Parameter.empty
        else:
            sig_tokens = _tokens(p.annotation)
            sig_tokens = {"Tensor" if "Tensor" in t else t for t in sig_tokens}
            assert _table_tokens(opt.type) == sig_tokens, f"{spec.cls}.{p.name}: {p.annotation}"
            assert (opt.kind == "tensor") == ("Tensor" in sig_tokens)


def test_projector_options_match_quadprog_projector():
    params = [p for p in inspect.signature(QuadprogProjector.__init__).parameters.values() if p.name != "self"]
    assert [(p.name, p.default, p.kind) for p in params] == [
        (o.name, o.default, inspect.Parameter.KEYWORD_ONLY) for o in PROJECTOR_OPTIONS
    ]


def test_extras_match_torchjd_metadata_and_its_dependency_checks():
    provided = set(md.metadata("torchjd").get_all("Provides-Extra"))
    assert {TORCHJD_EXTRAS[e] for e in EXTRAS} <= provided
    from torchjd._linalg._dual_cone import QuadprogProjector as QP
    from torchjd.aggregation._cagrad import CAGradWeighting
    from torchjd.aggregation._fairgrad import FairGradWeighting
    from torchjd.aggregation._nash_mtl import _NashMTLWeighting

    checks = {"quadprog_projector": QP, "cagrad": CAGradWeighting, "nash_mtl": _NashMTLWeighting,
              "fairgrad": FairGradWeighting}
    assert set(checks) == set(EXTRAS)
    for extra, cls in checks.items():
        assert tuple(cls._REQUIRED_DEPS) == EXTRAS[extra], extra


@pytest.mark.parametrize("spec", AGGREGATORS, ids=lambda s: s.name)
def test_extra_is_what_torchjd_needs(spec, monkeypatch):
    """With no optional module importable, torchjd refuses exactly the aggregators that have an extra here."""
    import torchjd._mixins

    monkeypatch.setattr(torchjd._mixins, "find_spec", lambda name: None)
    kwargs = next(k for _, name, _, cls, k, counts in CASES if name == spec.name)(3)
    try:
        getattr(ta, spec.cls)(**kwargs)
        needed = None
    except ImportError as exc:
        needed = str(exc)
    if spec.extra is None:
        assert needed is None
    else:
        assert needed is not None and spec.extra in needed.replace("-", "_"), needed


# ----------------------------------------------------------------------------- registration


def test_names_and_descriptions():
    for cls in mtlbench_torchjd.STRATEGIES:
        assert cls.name == "jd_" + cls.spec.cls.lower()
        assert "\n" not in cls.description and cls.description.startswith(f"torchjd {cls.spec.cls}")
        if cls.spec.cite:
            assert cls.spec.cite in cls.description
    assert len({c.name for c in mtlbench_torchjd.STRATEGIES}) == len(AGGREGATORS)


def test_registered_through_the_plugin_manager():
    try:
        dist = md.distribution("mtlbench-torchjd")
    except md.PackageNotFoundError:
        pytest.skip("mtlbench-torchjd is not installed (pip install -e plugins/mtlbench-torchjd)")
    from mtlbench.plugins import new_manager

    manager = new_manager()
    registry = manager.registry("strategies")
    for cls in mtlbench_torchjd.STRATEGIES:
        item = registry.get(cls.name)
        assert item.distribution == "mtlbench-torchjd" and item.version == dist.version
        assert item.obj.name == cls.name
    assert "pcgrad" in registry and registry.get("pcgrad").distribution == "mtlbench"


def test_importing_the_plugin_imports_neither_torch_nor_torchjd():
    code = "import sys, mtlbench_torchjd; print('torch' in sys.modules, 'torchjd' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PLUGIN_DIR, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_readme_lists_every_strategy():
    text = (PLUGIN_DIR / "README.md").read_text()
    for spec in AGGREGATORS:
        assert f"`{spec.name}`" in text, spec.name
    for extra in EXTRAS:
        assert f"mtlbench-torchjd[{extra}]" in text


# ----------------------------------------------------------------------------- instantiation


@pytest.mark.parametrize("spec", AGGREGATORS, ids=lambda s: s.name)
def test_every_strategy_instantiates_with_default_params_on_two_tasks(spec):
    """Default params, plus the ones torchjd requires (c, alpha, weights, n_byzantine, trim_number)."""
    if not installed(spec.name):
        with pytest.raises(PluginError):
            make(spec.name, DEFAULTS[spec.name](2), tasks(2))
        return
    if spec.cls == "Krum":  # Krum needs n_byzantine + 3 tasks
        with pytest.raises(ConfigError, match="needs at least n_byzantine \\+ 3 = 3 tasks; this run has 2"):
            make(spec.name, DEFAULTS[spec.name](2), tasks(2))
        return
    strategy = make(spec.name, DEFAULTS[spec.name](2), tasks(2))
    assert isinstance(strategy.aggregator, getattr(ta, spec.cls))
    assert strategy.model_tasks() == tasks(2)
    assert strategy.tasks_for_step(0) == tasks(2)


def test_required_options_are_required():
    for name, key in [("jd_cagrad", "c"), ("jd_fairgrad", "alpha"), ("jd_constant", "weights"),
                      ("jd_krum", "n_byzantine"), ("jd_trimmedmean", "trim_number")]:
        with pytest.raises(ConfigError, match=f"missing key 'strategies.x.params.{key}'"):
            validate_params(mtlbench_torchjd.BY_NAME[name].Params, {}, "strategies.x.params")


def test_nashmtl_gets_the_number_of_tasks():
    if not installed("jd_nashmtl"):
        pytest.skip("nash_mtl extra not installed")
    assert "n_tasks" not in mtlbench_torchjd.BY_NAME["jd_nashmtl"].Params.model_fields
    assert make("jd_nashmtl", {}, tasks(3)).aggregator.n_tasks == 3


def test_main_task_comes_first():
    strategy = make("jd_mean", {}, ["lm", "seg", "aux"], main="seg")
    assert strategy.model_tasks() == ["seg", "lm", "aux"]


# ----------------------------------------------------------------------------- equality with torchjd


@pytest.mark.parametrize("name, params, cls, kwargs, n", PARAMS)
def test_strategy_equals_torchjd_on_the_same_jacobian(name, params, cls, kwargs, n):
    problem = Problem(n)
    strategy = make(name, params, tasks(n))
    direct = getattr(ta, cls)(**kwargs(n))
    for step in range(3):
        seed = 1000 + step
        grad, tail_grads, logs = problem.run(strategy, step, seed)
        J, own = problem.jacobian(step, strategy.model_tasks())
        torch.manual_seed(seed)
        expected = direct(J)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-6)
        for t in strategy.model_tasks():
            torch.testing.assert_close(tail_grads[t], own[t], atol=1e-10, rtol=1e-10)
        if isinstance(direct, ta.WeightedAggregator):
            assert set(logs) == {f"jd/{t}_weight" for t in strategy.model_tasks()}
        else:
            assert logs == {}


# ----------------------------------------------------------------------------- properties


def _cosines(J, g):
    return (J @ g) / (J.norm(dim=1) * g.norm())


@needs_extra("jd_upgrad")
@pytest.mark.parametrize("n", [2, 3])
def test_upgrad_is_non_conflicting_quinton_rey_2024(n):
    """Quinton & Rey 2024: UPGrad's update never conflicts with a task gradient (J g >= 0).

    Exactly so without the projector's regularisation (reg_eps = 0); with torchjd's default reg_eps = 1e-4 the
    dual-cone projection is approximate, and a conflict stays within about that relative size.
    """
    problem = Problem(n)
    J, _ = problem.jacobian(0, tasks(n))
    assert float(_cosines(J[:1], J[1])) < -0.5  # the fixture's first two tasks do conflict
    grad, _, _ = problem.run(make("jd_upgrad", {"reg_eps": 0.0}, tasks(n)), 0, 0)
    assert (_cosines(J, grad) >= -1e-9).all()
    grad, _, _ = problem.run(make("jd_upgrad", {}, tasks(n)), 0, 0)
    assert (_cosines(J, grad) >= -1e-3).all()
    lin = Linear([[1.0, 0.0], [-2.0, 1.0]])
    g, _ = lin.run(make("jd_upgrad", {"reg_eps": 0.0}, tasks(2)))
    assert (lin.a @ g >= -1e-9).all()
    assert (lin.a.sum(dim=0) @ lin.a.T < 0).any()  # whereas the plain sum does conflict


@needs_extra("jd_dualproj")
def test_dualproj_is_non_conflicting_gem_eq11():
    """Lopez-Paz & Ranzato 2017, Eq. 11: the mean gradient projected onto the dual cone of the task gradients
    (exactly with reg_eps = 0, up to about reg_eps relative with torchjd's default)."""
    lin = Linear([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.2, -1.0, 0.5]])
    assert (lin.a.mean(dim=0) @ lin.a.T < 0).any()
    g, _ = lin.run(make("jd_dualproj", {"reg_eps": 0.0}, tasks(3)))
    assert (_cosines(lin.a, g) >= -1e-9).all()
    g, _ = lin.run(make("jd_dualproj", {}, tasks(3)))
    assert (_cosines(lin.a, g) >= -1e-3).all()


def test_mgda_two_tasks_is_the_min_norm_point_sener_koltun_2018():
    """Sener & Koltun 2018, Algorithm 1: for two tasks the min-norm point of the segment has a closed form."""
    lin = Linear([[1.0, 0.0], [-1.0, 2.0]])
    g, logs = lin.run(make("jd_mgda", {"epsilon": 1e-9}, tasks(2)))
    g1, g2 = lin.a
    gamma = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
    gamma = min(max(gamma, 0.0), 1.0)
    torch.testing.assert_close(g, gamma * g1 + (1 - gamma) * g2, atol=1e-9, rtol=1e-9)
    assert logs["jd/seg_weight"] == pytest.approx(gamma)
    assert (lin.a @ g >= -1e-9).all()  # the min-norm point does not conflict (it is on the Pareto side)


def test_mean_is_the_mean_of_the_task_gradients():
    lin = Linear([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5]])
    g, logs = lin.run(make("jd_mean", {}, tasks(3)))
    torch.testing.assert_close(g, lin.a.mean(dim=0))
    assert logs == {f"jd/{t}_weight": pytest.approx(1 / 3) for t in tasks(3)}


def test_sum_is_the_sum_of_the_task_gradients():
    lin = Linear([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5]])
    g, _ = lin.run(make("jd_sum", {}, tasks(3)))
    torch.testing.assert_close(g, lin.a.sum(dim=0))


def test_constant_is_the_weighted_sum_in_main_task_first_order():
    lin = Linear([[1.0, 2.0], [3.0, -4.0]], names=["lm", "seg"])
    strategy = make("jd_constant", {"weights": [2.0, -0.5]}, ["lm", "seg"], main="seg")  # seg first
    g, logs = lin.run(strategy)
    torch.testing.assert_close(g, 2.0 * lin.a[1] - 0.5 * lin.a[0])
    assert logs == {"jd/seg_weight": 2.0, "jd/lm_weight": -0.5}


def test_trimmedmean_with_no_trimming_is_the_mean():
    lin = Linear([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5]])
    g, _ = lin.run(make("jd_trimmedmean", {"trim_number": 0}, tasks(3)))
    torch.testing.assert_close(g, lin.a.mean(dim=0))
    g, _ = lin.run(make("jd_trimmedmean", {"trim_number": 1}, tasks(3)))
    torch.testing.assert_close(g, lin.a.median(dim=0).values)  # 3 rows, trim 1: the coordinate-wise median


def test_pcgrad_projects_two_conflicting_gradients_yu_2020():
    """Yu et al. 2020, Algorithm 1: g1 = (1, 0), g2 = (-1, 1) conflict (g1.g2 = -1).

    g1' = g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2' = g2 - (g2.g1)/|g1|^2 g1 = (0, 1); update = (0.5, 1.5).
    """
    lin = Linear([[1.0, 0.0], [-1.0, 1.0]])
    g, _ = lin.run(make("jd_pcgrad", {}, tasks(2)))
    torch.testing.assert_close(g, torch.tensor([0.5, 1.5], dtype=DT))


def test_jd_pcgrad_equals_the_builtin_pcgrad_on_two_tasks():
    """With two tasks PCGrad's random order does not matter: torchjd's and mtlbench's own give the same update."""
    from mtlbench.builtin.strategies import PCGrad

    problem = Problem(2)
    ours, _, _ = problem.run(make("jd_pcgrad", {}, tasks(2)), 0, 0)
    builtin = PCGrad(PCGrad.Params(), tasks(2), "seg")
    theirs, _, _ = problem.run(builtin, 0, 0)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


def test_imtlg_has_equal_projections_on_every_unit_gradient_liu_2021():
    """Liu et al. 2021 (IMTL-G): g . u_i is the same for every task (u_i = g_i / |g_i|)."""
    lin = Linear([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [0.3, 0.3, 1.0]])
    g, _ = lin.run(make("jd_imtlg", {}, tasks(3)))
    proj = (lin.a / lin.a.norm(dim=1, keepdim=True)) @ g
    torch.testing.assert_close(proj, proj[0].expand(3), atol=1e-9, rtol=1e-9)


def test_config_has_equal_positive_cosines_liu_2024():
    """Liu et al. 2024 (ConFIG), Eq. 2: the update has the same positive cosine with every task gradient."""
    lin = Linear([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [0.3, -0.5, 1.0]])
    g, _ = lin.run(make("jd_config", {}, tasks(3)))
    cos = (lin.a @ g) / (lin.a.norm(dim=1) * g.norm())
    assert (cos > 0).all()
    torch.testing.assert_close(cos, cos[0].expand(3), atol=1e-9, rtol=1e-9)


def test_random_weights_are_positive_and_sum_to_one_lin_2022():
    lin = Linear([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    torch.manual_seed(3)
    g, logs = lin.run(make("jd_random", {}, tasks(3)))
    w = torch.tensor([logs[f"jd/{t}_weight"] for t in tasks(3)], dtype=DT)
    assert (w > 0).all() and float(w.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(g, w @ lin.a)


def test_pcd_follows_the_main_task_when_no_constraint_binds():
    """PCD: with tau = 0 and an auxiliary gradient that already agrees, the update is the main task's gradient."""
    lin = Linear([[1.0, 0.5], [1.0, 0.0]])
    g, _ = lin.run(make("jd_pcd", {"tau": 0.0}, tasks(2)))
    torch.testing.assert_close(g, lin.a[0], atol=1e-9, rtol=1e-9)


ORDER_INVARIANT = ["jd_upgrad", "jd_dualproj", "jd_mgda", "jd_mean", "jd_sum", "jd_imtlg", "jd_alignedmtl",
                   "jd_config", "jd_trimmedmean", "jd_cagrad", "jd_nashmtl", "jd_fairgrad", "jd_excessmtl"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_extra(n)) for n in ORDER_INVARIANT])
def test_order_invariance(name):
    """These aggregators are symmetric in the rows of the Jacobian (their docstrings/papers define them so):
    reordering the tasks (here: another main task and the reverse config order) leaves the update unchanged.
    Not asserted for PCGrad, GradVac (random visiting order), Random (a draw per row), Constant (weights per
    row), PCD (the first row is the primary objective), GradDrop and Krum (not checked)."""
    params = DEFAULTS[name](3)
    a = Problem(3)
    b = Problem(3)
    ga, _, _ = a.run(make(name, params, TASKS3, main="seg"), 0, 0)
    gb, _, _ = b.run(make(name, params, TASKS3[::-1], main="aux"), 0, 0)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- the trainer's side


def test_float32_trunk_with_tensor_options_rebuilds_the_aggregator_once():
    """Tensor options are made for the trunk's dtype (the float64 fixture here); the state stays after that."""
    strategy = make("jd_config", {"pref_vector": [0.6, 0.4]}, tasks(2))
    first = strategy.aggregator
    assert first.pref_vector.dtype == torch.float32
    problem = Problem(2)
    problem.run(strategy, 0, 0)
    assert strategy.aggregator.pref_vector.dtype == DT
    second = strategy.aggregator
    problem.run(strategy, 1, 0)
    assert strategy.aggregator is second


def test_a_missing_loss_is_a_plugin_error():
    problem = Problem(2)
    strategy = make("jd_mean", {}, tasks(2))
    losses, features = problem.losses(0, ["seg"])
    with pytest.raises(PluginError, match="no loss for task\\(s\\) lm"):
        strategy.backward(losses, problem.ctx(0, features))


# ----------------------------------------------------------------------------- params validation


def _one_line(exc) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_unknown_key_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as exc:
        validate_params(mtlbench_torchjd.BY_NAME["jd_upgrad"].Params, {"pref_vectr": [1, 1]}, "strategies.x.params")
    assert "unknown key 'strategies.x.params.pref_vectr'" in _one_line(exc)
    assert "pref_vector" in str(exc.value)


@pytest.mark.parametrize(
    "name, params, key",
    [
        ("jd_cagrad", {"c": -0.1}, "c"),
        ("jd_mgda", {"epsilon": 0.0}, "epsilon"),
        ("jd_mgda", {"max_iters": 0}, "max_iters"),
        ("jd_gradvac", {"beta": 1.5}, "beta"),
        ("jd_pcd", {"beta": 1.0}, "beta"),
        ("jd_nashmtl", {"max_norm": -1.0}, "max_norm"),
        ("jd_upgrad", {"pref_vector": [1.0, -1.0]}, "pref_vector"),
        ("jd_upgrad", {"reg_eps": -1.0}, "reg_eps"),
        ("jd_graddrop", {"leak": [0.5, 2.0]}, "leak"),
        ("jd_krum", {"n_byzantine": -1}, "n_byzantine"),
        ("jd_alignedmtl", {"scale_mode": "max"}, "scale_mode"),
        ("jd_excessmtl", {"robust_step_size": 0.0}, "robust_step_size"),
        ("jd_fairgrad", {"alpha": float("nan")}, "alpha"),
    ],
)
def test_out_of_range_value_is_a_one_line_config_error(name, params, key):
    with pytest.raises(ConfigError) as exc:
        validate_params(mtlbench_torchjd.BY_NAME[name].Params, params, "strategies.x.params")
    assert f"strategies.x.params.{key}" in _one_line(exc)


def test_pcd_tau_out_of_range_is_a_config_error():
    for tau in (1.5, [0.1, -0.2]):
        with pytest.raises(ConfigError) as exc:
            validate_params(mtlbench_torchjd.BY_NAME["jd_pcd"].Params, {"tau": tau}, "strategies.x.params")
        assert "strategies.x.params.tau" in _one_line(exc)


def test_constant_with_the_wrong_number_of_weights_is_a_config_error():
    with pytest.raises(ConfigError) as exc:
        make("jd_constant", {"weights": [1.0, 2.0, 3.0]}, tasks(2))
    assert _one_line(exc) == "jd_constant: weights has 3 values; it needs one per task (2: seg, lm)"


def test_per_task_lists_need_one_value_per_task():
    with pytest.raises(ConfigError, match="jd_config: pref_vector has 1 values; it needs one per task"):
        make("jd_config", {"pref_vector": [1.0]}, tasks(2))
    with pytest.raises(ConfigError, match="jd_graddrop: leak has 3 values"):
        make("jd_graddrop", {"leak": [0.1, 0.1, 0.1]}, tasks(2))
    with pytest.raises(ConfigError, match="jd_pcd: tau has 2 values; it needs one per auxiliary task \\(1: lm\\)"):
        make("jd_pcd", {"tau": [0.1, 0.1]}, tasks(2))
    with pytest.raises(ConfigError, match="trim_number = 1 needs at least 2 \\* trim_number \\+ 1 = 3 tasks"):
        make("jd_trimmedmean", {"trim_number": 1}, tasks(2))
    with pytest.raises(ConfigError, match="n_selected = 4 is more than the 3 tasks"):
        make("jd_krum", {"n_byzantine": 0, "n_selected": 4}, tasks(3))


def test_through_make_strategy_errors_name_the_strategy_entry(tmp_path):
    """The core prefixes a strategy's ConfigError with its entry; the message stays one line."""
    from mtlbench.assemble import make_strategy
    from mtlbench.config import load_config

    config = tmp_path / "b.toml"
    config.write_text(TINY_CONFIG + '\n[strategies.const]\nuse = "jd_constant"\nparams = { weights = [1.0] }\n')
    cfg = load_config(config)
    with pytest.raises(ConfigError) as exc:
        make_strategy(cfg, "const", {"weights": [1.0]}, manager=_manager())
    assert _one_line(exc).startswith("strategies.const: jd_constant: weights has 1 values")


def _manager():
    from mtlbench.plugins import new_manager

    return new_manager(extra_plugins=[(mtlbench_torchjd, "torchjd-test")], load_entry_points=False) \
        if not _is_installed() else new_manager()


def _is_installed() -> bool:
    try:
        md.distribution("mtlbench-torchjd")
        return True
    except md.PackageNotFoundError:
        return False


@pytest.mark.parametrize(
    "name, params, module, extra",
    [
        ("jd_nashmtl", {}, "cvxpy", "nash_mtl"),
        ("jd_nashmtl", {}, "ecos", "nash_mtl"),
        ("jd_cagrad", {"c": 0.5}, "clarabel", "cagrad"),
        ("jd_fairgrad", {"alpha": 1.0}, "scipy", "fairgrad"),
        ("jd_upgrad", {}, "quadprog", "quadprog_projector"),
        ("jd_dualproj", {}, "qpsolvers", "quadprog_projector"),
    ],
)
def test_missing_extra_is_a_one_line_plugin_error(name, params, module, extra, monkeypatch):
    real = jds.find_module
    monkeypatch.setattr(jds, "find_module", lambda m: False if m == module else real(m))
    with pytest.raises(PluginError) as exc:
        make(name, params, tasks(2))
    assert _one_line(exc) == f"strategy {name} needs the extra: pip install 'mtlbench-torchjd[{extra}]'"
    assert exc.value.__cause__ is None and exc.value.__suppress_context__ is False


def test_strategies_without_extra_ignore_missing_optional_modules(monkeypatch):
    monkeypatch.setattr(jds, "find_module", lambda m: False)
    make("jd_mgda", {}, tasks(2))
    make("jd_pcgrad", {}, tasks(2))


# ----------------------------------------------------------------------------- end to end


TINY_CONFIG = """
[experiment]
name = "tiny-jd"
folds = 2
[data.phantom]
patients = 4
seed = 3
[preprocess]
slice_size = [32, 32]
[model]
widths = [4, 8, 16]
[tasks.segmentation]
params = { hd95 = false }          # HD95 on the original grid is the slow part of a tiny run
head_params = { width = 4, convs = 1 }
[tasks.landmarks]
head_params = { width = 4, convs = 1 }
[train]
epochs = 1
batch_size = 8
slices_per_epoch = 32
lr = 0.003
[strategies.single]
[strategies.upgrad]
use = "jd_upgrad"
[strategies.mgda]
use = "jd_mgda"
[resources]
cpus_per_trial = 1
gpus_per_trial = 0
"""


def _config_without_strategies() -> str:
    head, rest = TINY_CONFIG.split("[strategies.single]", 1)
    return head + "[resources]" + rest.split("[resources]", 1)[1]


@needs_extra("jd_upgrad")
@needs_extra("jd_cagrad")
def test_readme_example_config_resolves(tmp_path):
    """The README's benchmark snippet is a valid config: every plugin and parameter point builds."""
    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config

    readme = (PLUGIN_DIR / "README.md").read_text()
    snippet = readme.split("## Use in a benchmark", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    config = tmp_path / "readme.toml"
    config.write_text(_config_without_strategies() + snippet)
    cfg = load_config(config)
    assert cfg.strategies["const"].use == "jd_constant"
    resolve_plugins(cfg, _manager(), str(config))


@pytest.mark.slow
@needs_extra("jd_upgrad")
def test_end_to_end_cli_run(tmp_path):
    import json
    import os

    if not _is_installed():
        pytest.skip("mtlbench-torchjd is not installed: the CLI finds plugins by entry point")
    exe = Path(sys.executable).with_name("mtlbench")
    config = tmp_path / "tiny-jd.toml"
    config.write_text(TINY_CONFIG)
    run_dir = tmp_path / "run"
    env = {**os.environ, "MTLBENCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([str(exe), "run", str(config), "--out", str(run_dir)], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    board = subprocess.run([str(exe), "leaderboard", str(run_dir), "--json"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert board.returncode == 0, board.stderr[-4000:]
    rows = {row["strategy"]: row for row in json.loads(board.stdout)["rows"]}
    for label in ("single", "upgrad", "mgda"):
        assert label in rows, f"no leaderboard row for {label}: {sorted(rows)}"
        row = rows[label]
        assert (row["completed"], row["failed"], row["diverged"]) == (2, 0, 0), row
        assert row["mean"] is not None and math.isfinite(row["mean"]), row


@pytest.mark.slow
def test_krum_trains_on_three_tasks(tmp_path):
    """Krum needs n_byzantine + 3 tasks: segmentation, landmarks and a second segmentation tail."""
    if not _is_installed():
        pytest.skip("mtlbench-torchjd is not installed: the benchmark finds plugins by entry point")
    from mtlbench.testing import run_tiny_benchmark

    run = run_tiny_benchmark(
        tmp_path,
        tasks={"landmarks": {}, "segmentation_aux": {"use": "segmentation"}},
        strategies={"single": {}, "krum": {"use": "jd_krum", "params": {"n_byzantine": 0}}},
        overrides={"train": {"epochs": 1}},
    )
    rows = {row["strategy"]: row for row in run.leaderboard["rows"]}
    assert (rows["krum"]["completed"], rows["krum"]["failed"]) == (2, 0), rows["krum"]
    assert math.isfinite(rows["krum"]["mean"])
    for trial in run.trials:
        if trial["strategy"] == "krum":
            assert {"loss/segmentation", "loss/landmarks", "loss/segmentation_aux"} <= set(trial["history"][0]["train"])
