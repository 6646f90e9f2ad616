"""Terminal output shared by commands."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=160).print(table)
