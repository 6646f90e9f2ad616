"""`tanbr build-moe` and `tanbr bench model` end to end on a tiny config (real entry points)."""

import json

import yaml
from typer.testing import CliRunner

import tanbr_ray.cli  # noqa: F401  (registers every command)
from tanbr_ray.cli.app import app
from tests.moe.conftest import TINY


def test_build_then_bench_model(tmp_path, data_dir):
    cfg = dict(TINY, tiny_base=dict(TINY["tiny_base"].model_dump()))
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    common = ["--config", str(tmp_path / "moe.yaml"), "--models-dir", str(tmp_path / "models"), "--data-dir", data_dir, "--no-progress"]
    r = runner.invoke(app, ["build-moe", *common])
    assert r.exit_code == 0, r.output
    assert "cache:" in r.output and "SST-2" in r.output
    out = tmp_path / "bench.json"
    r = runner.invoke(
        app,
        ["bench", "model", *common, "--json", str(out), "--eval-examples", "8", "--mixes", "2", "--random-candidates", "3",
         "--landscape-examples", "8", "--screen-examples", "2", "--finalists", "1", "--budget", "2", "--runs", "2", "--bf16",
         "--layer-split"],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"dense", "merged", "top1", "top2", "soft", "oracle"}
    assert res["landscape_meta"]["budget"] == 2 and "oracle" in r.output and "experts (task-oracle routing" in r.output
    split = res["landscape_by_operator"]["linear"]["mean"]
    assert 0 <= split["best_layer_split"] <= split["best_layer_split_in_hindsight"] <= 1
    assert split["best_psi_family_in_hindsight"] <= split["best_layer_split_in_hindsight"]  # the pairs hold the family
    assert "one ψ power per layer half" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [SST-2, SQuAD]\n")
    r = runner.invoke(app, ["build-moe", "--config", str(bad), "--models-dir", str(tmp_path / "models")])
    assert r.exit_code != 0 and "SQuAD" in str(r.exception)
