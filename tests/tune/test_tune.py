"""`tanbr tune` end to end on a tiny MoE: 4 trials x 3 slots on a local 2-CPU Ray, W&B offline in tmp."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tanbr_ray.cli import app
from tanbr_ray.moe import MoEConfig, load_or_build
from tanbr_ray.moe.config import TinyBase
from tanbr_ray.sim.config import load_config
from tanbr_ray.tune.config import load_tune_config

TINY = dict(name="tiny-tune", tiny_base=TinyBase(), tasks=["SST-2", "MNLI"], train_examples=32, batch_size=16,
            max_len_single=16, max_len_pair=24, head_hidden=16, heads_only_examples=32, heads_only_epochs=2,
            router_examples=8, router_steps=10, fisher_examples=8, regmean_examples=8, adapt_steps=3)
FLEET = {"classes": [
    {"name": "board", "count": 2, "slowdown": 4, "memory_x_dense": 1.001, "bandwidth_mbps": 50, "rtt_ms": 20,
     "budget": 1, "rate": 1.0},
    {"name": "dc", "count": 1, "slowdown": 1, "memory_x_dense": 8, "bandwidth_mbps": 1000, "rtt_ms": 3,
     "budget": 2, "rate": 2.0, "mix": {"SST-2": 0.8, "MNLI": 0.2}},
]}
RHOS = [0.3, 0.5, 0.7, 0.9]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """Tiny MoE cached in tmp, base simulation + fleet + MoE YAMLs, and the sweep YAML pointing at them."""
    data_dir = os.environ.get("TANBR_DATA_DIR")
    assert data_dir, "set TANBR_DATA_DIR to the GLUE copy (e.g. ../shared/data/glue)"
    data_dir = str(Path(data_dir).resolve())  # the sim YAML below resolves relative paths against itself
    d = tmp_path_factory.mktemp("tune")
    moe_cfg = MoEConfig(**TINY)
    load_or_build(moe_cfg, models_dir=d / "models", progress=False, data_dir=data_dir)  # trials only load it
    (d / "moe.yaml").write_text(yaml.safe_dump(moe_cfg.model_dump(mode="json")))
    (d / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
    (d / "sim.yaml").write_text(yaml.safe_dump(dict(
        name="tiny", slots=3, slot_seconds=4, pool_per_task=12, fixed_candidates=1, seed=0,
        models_dir=str(d / "models"), data_dir=data_dir, fleet="fleet.yaml")))
    (d / "sweep.yaml").write_text(yaml.safe_dump(dict(
        name="tiny-sweep", base="sim.yaml", moe_config="moe.yaml",
        search_space={"tanbr.tree.rho": {"grid": RHOS}}, metric="running_score", mode="max",
        scheduler="asha", asha={"grace_period": 2, "reduction_factor": 2}, resources={"cpu": 1},
        wandb={"project": "tanbr-test"})))
    return d


@pytest.fixture(scope="module")
def ray_local(sweep_dir):
    """A private 2-CPU Ray with W&B offline and all its files in tmp; shut down after the module."""
    import ray

    env = {"RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.update({f"WANDB_{k}_DIR": str(sweep_dir / "wandb-home" / k.lower()) for k in ("CACHE", "CONFIG", "DATA")})
    env["WANDB_DIR"] = str(sweep_dir / "wandb-home")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: workers inherit the environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def swept(sweep_dir, ray_local):
    out = sweep_dir / "results"
    res = CliRunner().invoke(app, ["tune", str(sweep_dir / "sweep.yaml"), "--out", str(out), "--wandb", "offline"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res.output


def test_sweep_writes_trial_table(swept):
    out, output = swept
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert sorted(float(r["tanbr.tree.rho"]) for r in rows) == RHOS
    assert all(r["error"] == "" for r in rows)
    done = [r for r in rows if r["completed"] == "True"]
    assert done, "ASHA must let at least one trial finish"
    for r in done:
        assert int(r["slots_run"]) == 3
        assert 0.0 <= float(r["running_score"]) <= 1.0
        assert 0.0 <= float(r["final/score"]) <= 1.0
    assert "tiny-sweep: 4 trials" in output and "best: tanbr.tree.rho=" in output
    summary = json.loads((out / "sweep.json").read_text())  # the same trials, with what they ran on
    assert len(summary["trials"]) == 4 and summary["provenance"]["git_commit"]
    shas = {r["model_sha256"] for r in done}
    assert len(shas) == 1 and None not in shas, "every finished trial names the one model it ran on"
    assert [m["weights_sha256"] for m in summary["models"]] == sorted(shas)
    assert (out / "metric_vs_rho.png").stat().st_size > 0
    assert (out / "learning_curves.png").stat().st_size > 0


def test_best_config_loads_back_for_simulate(swept, sweep_dir):
    out, _ = swept
    rows = list(csv.DictReader((out / "trials.csv").open()))
    best_row = max((r for r in rows if r["completed"] == "True"), key=lambda r: float(r["running_score"]))
    cfg = load_config(out / "best_config.yaml")  # what `tanbr simulate --config` does
    assert cfg.tanbr.tree.rho == pytest.approx(float(best_row["tanbr.tree.rho"]))
    assert cfg.slots == 3 and cfg.seed == 0 and cfg.name == "tiny-sweep-best"
    assert cfg.fleet == str(sweep_dir / "fleet.yaml") and cfg.models_dir == str(sweep_dir / "models")
    assert "Tanbr" in cfg.policies and len(cfg.policies) > 1  # the tuned Tanbr against every baseline


def test_wandb_offline_runs_written(swept):
    out, output = swept
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 5, runs  # one per trial + the summary run
    assert all(list(r.glob("*.wandb")) for r in runs)
    assert "W&B: 5 runs" in output
    wandb_cli = Path(sys.executable).parent / "wandb"
    listed = subprocess.run([str(wandb_cli), "sync", "--dry-run", str(out / "wandb")], capture_output=True,
                            text=True, timeout=60)
    assert "Would sync 5 run(s)" in listed.stdout + listed.stderr


def _write(tmp_path, **changes):
    spec = dict(name="bad", base="quick", search_space={"tanbr.tree.rho": {"grid": [0.5, 0.9]}})
    spec.update(changes)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.parametrize("changes, message", [
    (dict(search_space={"tanbr.tree.rhoo": {"grid": [0.5]}}), r"search_space.tanbr.tree.rhoo: unknown parameter"),
    (dict(search_space={"slots.extra": {"choice": [1]}}), r"search_space.slots.extra"),
    (dict(search_space={"tanbr.tree.rho": {"uniform": [0.7, 0.7]}}), r"empty range \[0.7, 0.7\]"),
    (dict(search_space={"tanbr.tree.rho": {"choice": []}}), r"choice: empty list"),
    (dict(search_space={"tanbr.tree.rho": {"normal": [0.5, 0.1]}}), r"normal"),
    (dict(search_space={"tanbr.tree.rho": {"grid": [0.5], "choice": [0.5]}}), r"exactly one distribution"),
    (dict(search_space={"tanbr.bandit.lr": {"loguniform": [0.0, 0.1]}}), r"loguniform: low must be > 0"),
    (dict(search_space={"tanbr.tree.rho": {"grid": [0.5, 1.5]}}), r"search_space.tanbr.tree.rho: value 1.5 invalid"),
    (dict(search_space={}), r"search_space"),
    (dict(search_space={"policies": {"choice": [["Tanbr"]]}}), r"cannot sweep"),
    (dict(mode="maximise"), r"mode"),
    (dict(metric="accuracy"), r"unknown metric 'accuracy'"),
    (dict(scheduler="pbt"), r"scheduler"),
    (dict(overrides=["slots=0"]), r"slots"),
    (dict(base="missing.yaml"), r"base: simulation config \S*missing.yaml: cannot read"),
])
def test_bad_sweep_configs_fail_with_clear_errors(tmp_path, changes, message):
    path = _write(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as err:
        load_tune_config(path)
    assert str(path) in str(err.value)


def test_shipped_sweeps_validate():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "tune_configs")
    names = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    assert {"rho.yaml", "slot_threshold.yaml", "joint.yaml"} <= set(names)
    for name in names:
        spec, raw = load_tune_config(os.path.join(root, name))
        assert raw["model"] == "quick"  # the quick MoE, whose experts are well above chance
    rho, _ = load_tune_config(os.path.join(root, "rho.yaml"))
    assert len(rho.search_space["tanbr.tree.rho"].values) >= 5 and 0.9 in rho.search_space["tanbr.tree.rho"].values
    assert len(rho.seeds) >= 3 and rho.scheduler == "fifo"  # every setting over whole seeds: an interval each


def test_tune_takes_simulation_overrides_as_simulate_does():
    """`tanbr tune rho.yaml slots=10 num_samples=2`: the sweep's keys set the sweep, the rest the
    simulation every trial runs; a key neither knows is refused, named."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tune_configs", "rho.yaml")
    spec, raw = load_tune_config(path, ["slots=10", "num_samples=2", "tanbr.tree.nu=0.02", "sim.name=mine"])
    assert raw["slots"] == 10 and raw["tanbr"]["tree"]["nu"] == 0.02 and raw["name"] == "mine"
    assert spec.num_samples == 2 and spec.name != "mine"
    with pytest.raises(ValueError, match="slotz"):
        load_tune_config(path, ["slotz=10"])


def test_best_point_with_seeds_is_the_mean_over_seeds():
    from tanbr_ray.tune.config import TuneSpec
    from tanbr_ray.tune.sweep import _best

    spec = TuneSpec(search_space={"tanbr.tree.rho": {"grid": [0.5, 0.9]}}, seeds=[0, 1])
    rows = [dict(trial_id=str(i), completed=True, seed=s, running_score=v, **{"tanbr.tree.rho": rho})
            for i, (rho, s, v) in enumerate([(0.5, 0, 0.70), (0.5, 1, 0.40), (0.9, 0, 0.60), (0.9, 1, 0.58)])]
    best = _best(rows, spec)  # 0.5 has the single best trial, 0.9 the better mean
    assert best["tanbr.tree.rho"] == 0.9 and best["running_score"] == pytest.approx(0.59)
    assert best["seed"] is None and best["replicates"] == 2


def test_settings_carry_their_interval_over_seeds_and_whether_it_overlaps_the_best():
    from tanbr_ray.tune.config import TuneSpec
    from tanbr_ray.tune.sweep import settings_summary

    spec = TuneSpec(search_space={"tanbr.tree.rho": {"grid": [0.3, 0.5, 0.9]}}, seeds=[0, 1, 2])
    scores = {0.3: (0.60, 0.61, 0.62), 0.5: (0.59, 0.62, 0.60), 0.9: (0.50, 0.51, 0.52)}
    rows = [dict(trial_id=f"{rho}-{s}", completed=True, seed=s, running_score=v, **{"tanbr.tree.rho": rho})
            for rho, vs in scores.items() for s, v in enumerate(vs)]
    st = settings_summary(rows, spec)
    assert [x["tanbr.tree.rho"] for x in st] == [0.3, 0.5, 0.9] and st[0]["seeds"] == 3
    assert st[0]["mean"] == pytest.approx(0.61) and st[0]["ci95"] == pytest.approx([0.61 - 0.02484, 0.61 + 0.02484], abs=1e-4)
    assert [x["overlaps_best"] for x in st] == [True, True, False]  # 0.5 is within noise of 0.3; 0.9 is not
    one_seed = settings_summary(rows[:1], spec)
    assert one_seed[0]["ci95"] is None and one_seed[0]["overlaps_best"] is None and one_seed[0]["vs_best_paired"] is None


def test_paired_difference_separates_settings_that_seed_spread_hides():
    """Seeds move every setting together (workload difficulty): the unpaired intervals overlap, the
    per-seed difference to the best does not."""
    from tanbr_ray.tune.config import TuneSpec
    from tanbr_ray.tune.sweep import settings_summary

    spec = TuneSpec(search_space={"tanbr.tree.rho": {"grid": [0.3, 0.9]}}, seeds=[0, 1, 2])
    scores = {0.3: (0.60, 0.70, 0.80), 0.9: (0.58, 0.68, 0.775)}
    rows = [dict(trial_id=f"{rho}-{s}", completed=True, seed=s, running_score=v, **{"tanbr.tree.rho": rho})
            for rho, vs in scores.items() for s, v in enumerate(vs)]
    best, other = settings_summary(rows, spec)
    assert other["overlaps_best"] is True
    assert best["vs_best_paired"] is None and other["vs_best_paired"]["seeds"] == 3
    assert other["vs_best_paired"]["mean"] == pytest.approx(-0.065 / 3)
    assert other["vs_best_paired"]["ci95"][1] < 0  # 0.9 is reliably below 0.3 on the same workloads


def test_interrupted_sweep_rows_for_trials_never_started():
    from types import SimpleNamespace

    from tanbr_ray.tune.config import TuneSpec
    from tanbr_ray.tune.sweep import _best, _collect

    spec = TuneSpec(search_space={"tanbr.tree.rho": {"grid": [0.5]}})
    never = SimpleNamespace(metrics=None, config=None, error=None, metrics_dataframe=None)
    rows, curves = _collect([never], spec)
    assert rows[0]["tanbr.tree.rho"] is None and rows[0]["slots_run"] == 0 and not rows[0]["completed"]
    assert curves == {} and _best(rows, spec) is None


def test_sweep_over_a_pool_of_fine_tunes(sweep_dir, ray_local, tmp_path_factory):
    """A base scenario naming a pool YAML: the driver builds it once, every trial reads it from the cache."""
    from tests.moe.tiny_pools import make_pool

    root = tmp_path_factory.mktemp("pool-sweep")
    pool = make_pool(root, "gpt2", tasks=("SST-2", "MNLI"))
    (root / "sim.yaml").write_text(yaml.safe_dump(dict(
        name="tiny-pool", model=str(pool), slots=2, slot_seconds=4, pool_per_task=8, fixed_candidates=1, seed=0,
        models_dir=str(root / "models"), data_dir=str(Path(os.environ["TANBR_DATA_DIR"]).resolve()),
        fleet=str(sweep_dir / "fleet.yaml"), bf16=False, calibration="measure")))
    (root / "sweep.yaml").write_text(yaml.safe_dump(dict(
        name="pool-sweep", base="sim.yaml", search_space={"tanbr.tree.rho": {"grid": [0.3, 0.7]}},
        metric="running_score", mode="max", scheduler="fifo", resources={"cpu": 1})))
    out = root / "results"
    res = CliRunner().invoke(app, ["tune", str(root / "sweep.yaml"), "--out", str(out), "--wandb", "disabled"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["trials"]) == 2
    assert json.dumps(sweep).count("pool-tiny-gpt2") >= 1
