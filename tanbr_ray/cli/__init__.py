"""Command-line entry point (`tanbr`). Importing the command modules registers them."""

from tanbr_ray.cli import regret_cmd  # noqa: F401  (registers `tanbr bench regret`)
from tanbr_ray.cli import fleet_cmd  # noqa: F401  (registers `tanbr bench fleet`)
from tanbr_ray.cli import model_cmd  # noqa: F401  (registers `tanbr build-moe`, `tanbr bench model`)
from tanbr_ray.cli import simulate_cmd  # noqa: F401  (registers `tanbr simulate`)
from tanbr_ray.cli import tune_cmd  # noqa: F401  (registers `tanbr tune`)
from tanbr_ray.cli import config_cmd  # noqa: F401  (registers `tanbr config show`, `tanbr config cp`)
from tanbr_ray.cli import serve_cmd  # noqa: F401  (registers `tanbr serve`, `tanbr bench serve`)
from tanbr_ray.cli import report_cmd  # noqa: F401  (registers `tanbr report`)
from tanbr_ray.cli import fidelity_cmd  # noqa: F401  (registers `tanbr bench fidelity`)
from tanbr_ray.cli import pool_cmd  # noqa: F401  (registers `tanbr export-pool`, `tanbr bench pool`)
from tanbr_ray.cli.app import app


def main() -> None:
    app()
