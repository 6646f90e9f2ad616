"""Composable simulation configs: a file is merged onto the scenario its `base:` names, the CLI shows
and copies them, `--quick` with `--config` is refused, and a run writes its resolved config."""

import pytest
import yaml
from typer.testing import CliRunner

import tanbr_ray.cli  # noqa: F401  (registers every command)
from tanbr_ray.cli.app import app
from tanbr_ray.sim.config import load_config


def _diff(a, b) -> dict:
    da, db = a.model_dump(), b.model_dump()
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


def test_a_one_key_file_changes_that_key_only(tmp_path):
    (tmp_path / "mine.yaml").write_text("slots: 60\n")
    assert _diff(load_config(tmp_path / "mine.yaml"), load_config("default")) == {"slots": (60, 40)}
    (tmp_path / "nested.yaml").write_text("tanbr:\n  tree:\n    rho: 0.5\n")
    mine, default = load_config(tmp_path / "nested.yaml"), load_config("default")
    assert mine.tanbr.tree.rho == 0.5 and mine.tanbr.bandit == default.tanbr.bandit  # merged key by key
    assert mine.merge_operator == "regmean" and mine.slot_seconds == 300


def test_bases_compose_and_a_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: quick\nslots: 5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 3\n")
    b, quick = load_config(tmp_path / "b.yaml"), load_config("quick")
    assert _diff(b, quick) == {"slots": (5, quick.slots), "seed": (3, 0)}
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        load_config(tmp_path / "c.yaml")


def test_unknown_keys_are_refused_with_the_field_named(tmp_path):
    (tmp_path / "typo.yaml").write_text("slotz: 3\n")
    with pytest.raises(ValueError, match="slotz"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="rhoo"):
        load_config("default", ["tanbr.tree.rhoo=0.5"])


def test_cli_show_cp_and_quick_with_config(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["config", "show", "quick", "slots=4"])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output)
    assert shown["slots"] == 4 and shown["model"] == "quick"
    r = runner.invoke(app, ["config", "cp", "quick", str(tmp_path / "q.yaml")])
    assert r.exit_code == 0, r.output
    assert _diff(load_config(tmp_path / "q.yaml"), load_config("quick")) == {}
    (tmp_path / "q.yaml").write_text((tmp_path / "q.yaml").read_text().replace("slots: 12", "slots: 2"))
    assert _diff(load_config(tmp_path / "q.yaml"), load_config("quick")) == {"slots": (2, 12)}
    r = runner.invoke(app, ["config", "cp", "quick", str(tmp_path / "q.yaml")])
    assert r.exit_code != 0 and "exists" in r.output
    r = runner.invoke(app, ["simulate", "--quick", "--config", str(tmp_path / "q.yaml")])
    assert r.exit_code != 0 and "base: quick" in r.output
