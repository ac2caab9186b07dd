"""Plugin loading and the registries of tasks, heads, strategies and dataset sources.

Plugins are modules named by entry points in the ``mtlbench`` group. Loading is
robust: an entry point that fails to import is reported as one warning line
naming its distribution, and the rest keep working. ``MTLBENCH_LOAD_PLUGINS``
(comma-separated distribution names) restricts which third-party distributions
load; mtlbench's own built-ins always load. Every registered class is stamped
with the plugin and distribution (with version) that registered it.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from mtlbench import hookspecs
from mtlbench.api import BASES, PLUGIN_KINDS
from mtlbench.errors import PluginError

ENTRY_POINT_GROUP = "mtlbench"
ALLOWLIST_ENV = "MTLBENCH_LOAD_PLUGINS"
SELF_DISTRIBUTION = "mtlbench"


@dataclass(frozen=True)
class Registered:
    """One registered class and where it came from."""

    name: str
    obj: type
    plugin: str
    distribution: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "description": getattr(self.obj, "description", "") or "",
        }


@dataclass
class Registry:
    """Unique names -> registered classes of one kind."""

    kind: str
    items: dict[str, Registered] = field(default_factory=dict)

    def add(self, item: Registered) -> None:
        old = self.items.get(item.name)
        if old is not None:
            raise PluginError(
                f"duplicate {_singular(self.kind)} {item.name!r}: registered by {_source(old)} and by {_source(item)}"
            )
        self.items[item.name] = item

    def get(self, name: str) -> Registered:
        try:
            return self.items[name]
        except KeyError:
            avail = ", ".join(sorted(self.items)) or "none"
            hint = difflib.get_close_matches(name, list(self.items), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PluginError(
                f"unknown {_singular(self.kind)} {name!r}{extra}; available: {avail}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def names(self) -> list[str]:
        return sorted(self.items)


def _singular(kind: str) -> str:
    return {"tasks": "task", "heads": "head", "strategies": "strategy", "datasets": "dataset source"}[kind]


def _source(item: Registered) -> str:
    return f"plugin {item.plugin!r} ({item.distribution} {item.version})"


@dataclass
class PluginManager:
    """The loaded plugins and their registries."""

    pm: pluggy.PluginManager
    registries: dict[str, Registry]
    distributions: dict[str, tuple[str, str]]  # plugin name -> (distribution, version)
    warnings: list[str]

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    def get(self, kind: str, name: str) -> Registered:
        return self.registries[kind].get(name)

    def register_commands(self, app: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(app=app)
            except Exception as exc:  # a broken plugin must not take the CLI down
                self._warn(f"plugin {impl.plugin_name!r} failed to add commands: {exc}")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)

    def as_json(self) -> dict[str, list[dict[str, str]]]:
        return {
            kind: [self.registries[kind].items[n].to_dict() for n in self.registries[kind].names()]
            for kind in PLUGIN_KINDS
        }


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None:
        return None
    return {_norm(x) for x in raw.split(",") if x.strip()}


def _norm(dist: str) -> str:
    return dist.strip().lower().replace("_", "-").replace(".", "-")


def _entry_points() -> Iterable[md.EntryPoint]:
    return md.entry_points(group=ENTRY_POINT_GROUP)


def new_manager(
    extra_plugins: Iterable[tuple[object, str]] = (), load_entry_points: bool = True
) -> PluginManager:
    """Load every allowed entry point (and ``extra_plugins``: (module, name)) and build registries."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm, {k: Registry(k) for k in PLUGIN_KINDS}, {}, [])
    allow = _allowlist()
    if load_entry_points:
        for ep in _entry_points():
            dist_name = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else "unknown"
            if allow is not None and _norm(dist_name) != SELF_DISTRIBUTION and _norm(dist_name) not in allow:
                continue
            plugin_name = ep.name
            if pm.has_plugin(plugin_name) or plugin_name in manager.distributions:
                prev = manager.distributions.get(plugin_name, ("?", "?"))[0]
                manager._warn(
                    f"plugin {plugin_name!r} from {dist_name} skipped: the name is already used by {prev}"
                )
                continue
            try:
                module = ep.load()
                pm.register(module, name=plugin_name)
            except Exception as exc:
                manager._warn(
                    f"plugin {plugin_name!r} from distribution {dist_name} {version} failed to load: "
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            manager.distributions[plugin_name] = (dist_name, version)
    for module, name in extra_plugins:
        pm.register(module, name=name)
        manager.distributions[name] = (name, "unregistered")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}") from None
    _collect(manager)
    return manager


def _collect(manager: PluginManager) -> None:
    hooks = {
        "tasks": manager.pm.hook.register_tasks,
        "heads": manager.pm.hook.register_heads,
        "strategies": manager.pm.hook.register_strategies,
        "datasets": manager.pm.hook.register_datasets,
    }
    for kind, hook in hooks.items():
        for impl in hook.get_hookimpls():  # in load order
            dist, version = manager.distributions.get(impl.plugin_name, ("unknown", "unknown"))
            register = _make_register(manager.registries[kind], kind, impl.plugin_name, dist, version)
            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                manager._warn(
                    f"plugin {impl.plugin_name!r} from {dist} {version} failed in {hook.name}: "
                    f"{type(exc).__name__}: {exc}"
                )


def _make_register(registry: Registry, kind: str, plugin: str, dist: str, version: str) -> Callable[[type], None]:
    base = BASES[kind]

    def register(obj: type) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(obj, type) or not issubclass(obj, base):
            raise PluginError(
                f"plugin {plugin!r} ({dist}) registered {obj!r} as a {_singular(kind)}, "
                f"but it is not a subclass of mtlbench.api.{base.__name__}"
            )
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} ({dist}) registered {obj.__name__} without a name")
        registry.add(Registered(name, obj, plugin, dist, version))

    return register


_MANAGER: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager, loaded once on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = new_manager()
    return _MANAGER


def reset_manager() -> None:
    """Forget the loaded plugins (tests, or after installing a distribution)."""
    global _MANAGER
    _MANAGER = None
