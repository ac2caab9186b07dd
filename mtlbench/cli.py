"""The ``mtlbench`` command line: parses arguments, calls one function per command, prints.

Heavy libraries (torch, ray, SimpleITK, h5py) are imported inside the commands
that need them, so ``mtlbench --help`` and ``mtlbench plugins`` stay fast.
Bad input (a :class:`mtlbench.errors.MtlbenchError`) becomes one line on stderr
and exit code 2 (usage, config, plugins) or 1 (data); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from mtlbench import __version__
from mtlbench.errors import MtlbenchError

_STATE = {"debug": False}

app = typer.Typer(
    name="mtlbench",
    help="Benchmark multi-task learning strategies for medical image segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect benchmark configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MtlbenchError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MtlbenchError as exc:
            if _STATE["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mtlbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    _STATE["debug"] = debug


# Options shared by every command that reads a config.
ProfileOpt = typer.Option(None, "--profile", "-p", help="Apply [profiles.NAME] over the base config.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key: --set train.epochs=5 (repeatable).")


def load(config: Path, profile: Optional[str], sets: Optional[List[str]], auto_profile: bool = False) -> Any:
    """Load, validate and resolve plugins of a config; announce an automatic profile."""
    from mtlbench.config import load_config, resolve_plugins

    cfg = load_config(config, profile, sets)
    if auto_profile and profile is None and cfg.experiment.cpu_profile:
        from mtlbench.devices import gpu_available

        if not gpu_available():
            name = cfg.experiment.cpu_profile
            typer.echo(
                f"No GPU found: using the '{name}' profile (smaller, faster). "
                f"Force the full protocol with --profile full.",
                err=True,
            )
            cfg = load_config(config, name, sets)
    resolve_plugins(cfg, source=str(config))
    return cfg


@app.command("plugins")
@handle_errors
def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """List the installed tasks, heads, strategies and dataset sources, and who provides them."""
    from mtlbench.plugins import get_manager

    data = get_manager().as_json()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mtlbench plugins")
    for col in ("kind", "name", "plugin", "distribution", "description"):
        table.add_column(col)
    for kind, items in data.items():
        for item in items:
            table.add_row(kind, item["name"], item["plugin"], f"{item['distribution']} {item['version']}", item["description"])
    Console().print(table)


@config_app.command("show")
@handle_errors
def config_show(
    config: Path = typer.Argument(..., help="Benchmark TOML file."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Print the resolved configuration (profile and overrides applied) as TOML."""
    from mtlbench.config import to_toml

    cfg = load(config, profile, set_)
    typer.echo(to_toml(cfg), nl=False)


def _register_plugin_commands() -> None:
    from mtlbench.plugins import get_manager

    try:
        get_manager().register_commands(app)
    except MtlbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None


def main() -> None:
    _register_plugin_commands()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
