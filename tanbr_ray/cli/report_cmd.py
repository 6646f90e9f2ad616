"""`tanbr report`: docs/benchmarks.md from benchmarks/*.json (or `--check` that it is up to date)."""

from __future__ import annotations

from pathlib import Path

import typer

from tanbr_ray.cli.app import app


@app.command("report", context_settings={"help_option_names": ["-h", "--help"]})
def report(
    benchmarks: Path = typer.Option(Path("benchmarks"), "--benchmarks", help="Folder of benchmark JSON files."),
    out: Path = typer.Option(Path("docs/benchmarks.md"), "--out", help="The markdown file to write."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if OUT differs from what "
                                                       "would be generated."),
) -> None:
    """Render one markdown section per benchmark JSON (tables, figure, provenance) into OUT."""
    from tanbr_ray.bench import report as rep

    try:
        if check:
            if not rep.is_current(benchmarks, out):
                typer.echo(f"{out} is out of date with {benchmarks}/*.json: run `tanbr report`", err=True)
                raise typer.Exit(1)
            typer.echo(f"{out} is up to date")
            return
        rep.write(benchmarks, out)
    except ValueError as exc:
        typer.echo(f"tanbr report: {exc}; nothing written", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {out}")
