"""Terminal output shared by commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import typer
from rich.console import Console
from rich.table import Table

from tanbr_ray.fileio import atomic_write_bytes


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=160).print(table)


def write_json(path: str | Path, obj) -> None:
    """A command's results, written atomically (numpy scalars as floats) with their provenance (code,
    packages, hardware, date) unless they carry their own, and where they went."""
    from tanbr_ray.provenance import provenance

    if isinstance(obj, dict) and "provenance" not in obj:
        obj = {**obj, "provenance": provenance()}
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=float).encode())
    typer.echo(f"wrote {path}")
