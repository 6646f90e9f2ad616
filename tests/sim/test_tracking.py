"""W&B mode precedence and offline logging (no network, no key, everything under tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tanbr_ray.sim.report import write_results
from tanbr_ray.tracking import has_api_key, log_simulation, wandb_mode

from .test_report import make_output


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No key, no netrc, no inherited mode; wandb's dirs inside tmp_path (restored afterwards)."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for var, sub in (("WANDB_DIR", "wdir"), ("WANDB_CACHE_DIR", "wcache"), ("WANDB_CONFIG_DIR", "wconfig"),
                     ("WANDB_DATA_DIR", "wdata"), ("WANDB_ARTIFACT_DIR", "wart")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_explicit_mode_wins_over_env_and_key(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("disabled") == "disabled"
    assert os.environ["WANDB_MODE"] == "disabled"  # exported for Ray's WandbLoggerCallback


def test_env_mode_wins_over_key(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # legacy alias
    assert wandb_mode(None) == "offline"


def test_key_in_env_or_netrc_means_online(tmp_path, monkeypatch):
    assert not has_api_key()
    assert wandb_mode(None) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert has_api_key()
    assert wandb_mode(None) == "online"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine example.com login u password p\n")
    assert wandb_mode(None) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(None) == "online"
    assert os.environ["WANDB_MODE"] == "online"


def test_unknown_mode_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown W&B mode 'loud'"):
        wandb_mode("loud")
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        wandb_mode(None)


def test_log_simulation_offline_one_run_per_policy(tmp_path):
    out = make_output()
    res = tmp_path / "res"
    write_results(out, res)
    dirs = log_simulation(out, res, project="tanbr-test", group="grp-sim-unit", mode="offline")
    assert os.environ["WANDB_MODE"] == "offline"
    runs = sorted((res / "wandb").glob("offline-run-*"))
    assert len(runs) == len(dirs) == 3
    assert sorted(dirs) == sorted(str(r) for r in runs)
    for run_dir, policy in zip(dirs, out.series):  # returned in policy order
        log = next(iter((res / "wandb" / run_dir).glob("run-*.wandb")))  # what `wandb sync` uploads
        data = log.read_bytes()
        for needle in (policy, "grp-sim-unit", "tanbr-test", "simulate", "regret/best_fixed_cum"):
            assert needle.encode() in data, (policy, needle)
        media = res / "wandb" / run_dir / "files" / "media"
        plots = sorted(p.name.split("_")[0] for p in (media / "images" / "plots").glob("*.png"))
        assert plots == ["choices", "latency", "regret", "score"]
        table = next(iter((media / "table").glob("policies_*.table.json"))).read_text()
        assert all(name in table for name in out.series)


def test_every_seed_of_a_multi_seed_job_gets_its_own_runs(tmp_path):
    """`tanbr simulate seeds=2` logs each seed's policies, named by seed, beside that seed's results."""
    dirs = []
    for seed in (0, 1):
        out, res = make_output(seed), tmp_path / f"seed-{seed}"
        write_results(out, res)
        dirs += log_simulation(out, res, project="tanbr-test", group="grp-seeds", mode="offline", seed=seed)
    assert len(dirs) == 6
    for seed in (0, 1):
        logs = [next(iter(Path(d).glob("run-*.wandb"))).read_bytes() for d in dirs if f"seed-{seed}" in d]
        assert len(logs) == 3 and all(f"-seed{seed}".encode() in data for data in logs)


def test_log_simulation_disabled_creates_nothing(tmp_path):
    out = make_output()
    assert log_simulation(out, tmp_path / "res", mode="disabled") == []
    assert not (tmp_path / "res").exists()


def test_log_simulation_leaves_a_callers_run_open(tmp_path):
    """The flush-on-teardown must not finish a run the caller (e.g. a Tune trial) still holds."""
    import wandb

    out = make_output()
    out.series = {"Tanbr": out.series["Tanbr"]}
    with wandb.init(project="outer", dir=str(tmp_path), mode="offline", reinit="create_new",
                    settings=wandb.Settings(silent=True, console="off")) as outer:
        dirs = log_simulation(out, tmp_path / "res", mode="offline")
        assert len(dirs) == 1
        assert not outer._is_finished
        outer.log({"still_open": 1.0})
    assert outer._is_finished


def test_runs_are_logged_live_per_slot_then_completed(tmp_path):
    """`--track` as CleanRL has it: a policy's run exists and holds its slots while the simulation runs;
    the traces, table and plots join the same run at the end."""
    from tanbr_ray.tracking import SimulationTracker

    out, res = make_output(), tmp_path / "res"
    tracker = SimulationTracker(out.config, res, project="tanbr-live", group="grp-live", mode="offline")
    for t in range(3):
        tracker.on_slot("Tanbr", t, 0.5 + t / 10, 0.55)
    assert list(tracker.runs) == ["Tanbr"]  # opened by its first slot, before the simulation ends
    write_results(out, res)
    dirs = tracker.finish(out)
    assert len(dirs) == 3 and not tracker.runs
    tanbr = next(d for d in dirs if (Path(d) / "files").exists() and b"Tanbr" in next(Path(d).glob("run-*.wandb")).read_bytes())
    data = next(Path(tanbr).glob("run-*.wandb")).read_bytes()
    for needle in (b"live/score", b"live/running_score", b"regret/best_fixed_cum", b"tanbr-live"):
        assert needle in data, needle
    assert len(sorted((res / "wandb").glob("offline-run-*"))) == 3  # one run per policy, the live one reused


def test_disabled_tracker_never_starts_wandb(tmp_path):
    from tanbr_ray.tracking import SimulationTracker

    tracker = SimulationTracker({}, tmp_path / "res", mode="disabled")
    tracker.on_slot("Tanbr", 0, 0.5, 0.5)
    assert tracker.finish(make_output()) == [] and not (tmp_path / "res").exists()
