import json

from typer.testing import CliRunner

from tanbr_ray.cli import app


def test_bench_regret_cli_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = CliRunner().invoke(app, ["bench", "regret", "--rounds", "40", "--seeds", "2",
                                   "--policies", "Tanbr,Random,Best-x", "--timing-experts", "8",
                                   "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["rounds"] == 40 and data["seeds"] == 2 and data["env"].startswith("synthetic-stationary")
    for name in ("Tanbr", "Random", "Best-x"):
        r = data["policies"][name]
        assert set(r) >= {"regret_mean", "regret_sd", "slope", "select_ms_p50", "select_ms_p99"}
    assert data["policies"]["Best-x"]["regret_mean"] == 0.0
    assert data["policies"]["Random"]["regret_mean"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Tanbr" in res.output


def test_bench_regret_cli_rejects_unknown_policy(tmp_path):
    res = CliRunner().invoke(app, ["bench", "regret", "--rounds", "10", "--seeds", "1",
                                   "--policies", "Tanbr,Bogus", "--json", str(tmp_path / "x.json")])
    assert res.exit_code != 0
    assert "Bogus" in res.output
