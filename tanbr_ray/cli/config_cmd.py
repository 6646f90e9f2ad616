"""`tanbr config show` and `tanbr config cp`: see what a scenario resolves to, start a new one from it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
import yaml

from tanbr_ray.cli.app import config_app


@config_app.command("show", context_settings={"help_option_names": ["-h", "--help"]})
def show(
    name: str = typer.Argument("default", help="default | quick | a simulation YAML (merged onto its `base:`)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, as `tanbr simulate` takes them."),
) -> None:
    """Print the resolved simulation config (what `tanbr simulate` would run) as YAML."""
    from tanbr_ray.sim.config import load_config

    try:
        cfg = load_config(name, list(overrides or []))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), nl=False)


@config_app.command("cp", context_settings={"help_option_names": ["-h", "--help"]})
def cp(
    name: str = typer.Argument(..., help="default | quick: the embedded scenario to start from."),
    dest: Path = typer.Argument(..., help="The new file (not overwritten if it exists)."),
) -> None:
    """Copy an embedded scenario, comments included, to start a config of your own."""
    from tanbr_ray.sim.config import EMBEDDED

    if name not in EMBEDDED:
        raise typer.BadParameter(f"{name!r}: choose from {', '.join(EMBEDDED)} (a file can name one as `base:`)")
    if dest.exists():
        raise typer.BadParameter(f"{dest} exists; remove it or choose another name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = EMBEDDED[name].read_text()
    dest.write_text(f"base: {name}               # keys this file leaves out take {name}'s values\n" + text)
    typer.echo(f"wrote {dest}: edit it, then `tanbr simulate --config {dest}`; `tanbr config show {dest}` prints "
               "what it resolves to")
