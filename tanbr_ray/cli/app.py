"""The `tanbr` command tree; sub-modules register their commands on these apps."""

import typer

app = typer.Typer(
    name="tanbr",
    help="Task-aware expert merging for online MoE inference at the edge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: print a table, write JSON (and plots).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
config_app = typer.Typer(help="Simulation configs: print a resolved one, start a new one.", no_args_is_help=True)
app.add_typer(config_app, name="config")
