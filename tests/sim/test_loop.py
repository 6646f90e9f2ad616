"""The slot loop end to end on a tiny MoE (2 tasks, 2 experts) and a 3-node fleet."""

import json
import os

import numpy as np
import pytest
import torch

from tanbr_ray.moe import MoEConfig, load_or_build
from tanbr_ray.moe.config import TinyBase
from tanbr_ray.moe.data import load_task
from tanbr_ray.moe.infer import make_batches
from tanbr_ray.moe.precision import native_bf16
from tanbr_ray.router import registry
from tanbr_ray.sim.config import SimConfig, load_config
from tanbr_ray.sim.comparator import best_fixed_credit, fixed_candidates, selection_rows
from tanbr_ray.sim.evaluate import PoolEvaluator
from tanbr_ray.sim.spec import Spec
from tanbr_ray.sim.fleet import Fleet, load_fleet
from tanbr_ray.sim.costs import host_costs
from tanbr_ray.sim.loop import Simulation, run_simulation
from tanbr_ray.sim.report import latency_ratios, provenance_line, write_results
from tanbr_ray.stats import recovery_slots

TINY = dict(name="tiny-sim", tiny_base=TinyBase(), tasks=["SST-2", "MNLI"], train_examples=32, batch_size=16,
            max_len_single=16, max_len_pair=24, head_hidden=16, heads_only_examples=32, heads_only_epochs=2,
            router_examples=8, router_steps=10, fisher_examples=8, regmean_examples=8, adapt_steps=3)
FLEET = dict(classes=[
    dict(name="board", count=2, slowdown=4, memory_x_dense=1.001, bandwidth_mbps=50, rtt_ms=20, budget=1, rate=1.0),
    dict(name="dc", count=1, slowdown=1, memory_x_dense=8, bandwidth_mbps=1000, rtt_ms=3, budget=2, rate=2.0,
         mix={"SST-2": 0.8, "MNLI": 0.2}),
])


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    assert os.environ.get("TANBR_DATA_DIR"), "set TANBR_DATA_DIR to the GLUE copy (e.g. ../shared/data/glue)"
    return load_or_build(MoEConfig(**TINY), models_dir=tmp_path_factory.mktemp("models"), progress=False)


def _cfg(**kw):
    base = dict(slots=3, slot_seconds=4, pool_per_task=12, fixed_candidates=1, wandb="disabled", seed=0)
    base.update(kw)
    return SimConfig(**base)


@pytest.fixture(scope="module")
def result(tiny_moe):
    return run_simulation(_cfg(), tiny_moe, fleet=Fleet(**FLEET), progress=False)


def test_every_policy_runs_and_reports(result):
    s = result.summary
    assert set(s["policies"]) == set(registry.names("simulation"))
    for name, r in s["policies"].items():
        assert 0.0 <= r["score"] <= 1.0, name
        assert set(r["scores"]) <= {"SST-2", "MNLI"}
        assert r["latency_ms_p50"] > 0 and r["latency_ms_p95"] >= r["latency_ms_p50"]
        assert set(r["latency_ms_p50_by_class"]) == {"board", "dc"}
        assert r["resident_bytes"] > 0 and r["pushed_bytes"] > 0 and r["push_seconds"] > 0
    assert s["policies"]["Oracle"]["regret_vs_oracle"] == 0.0
    assert s["requests"] > 0 and s["requests_simulated"] == s["requests"] * len(registry.names("simulation"))
    # the full MoE is resident for routing policies; merged ones hold one FFN per layer
    assert s["policies"]["Switch-top2"]["resident_bytes"] > s["policies"]["Tanbr"]["resident_bytes"]
    assert s["policies"]["Soft"]["resident_bytes"] == s["policies"]["Switch-top1"]["resident_bytes"]
    # a board cannot hold the full MoE: swapping experts in makes routing slower there
    assert s["policies"]["Switch-top2"]["latency_ms_p95"] > s["policies"]["Tanbr"]["latency_ms_p50"]
    by_class = {n: s["policies"][n]["latency_ms_p50_by_class"] for n in ("Switch-top2", "Tanbr")}
    assert by_class["Switch-top2"]["board"] > by_class["Switch-top2"]["dc"]
    ratio = s["policies"]["Tanbr"]["latency_ms_p50"] / s["policies"]["Switch-top2"]["latency_ms_p50"]
    assert latency_ratios(s)[0].startswith(f"Tanbr p50 latency / Switch-top2: fleet {ratio:.2f} (board ")


def test_choices_respect_node_budgets(result):
    budgets = {"board": 1, "dc": 2}
    for name in ("Tanbr", "Nucb", "HOO", "Random", "Uniform", "psi-merge"):
        ch = result.series[name].choices
        assert ch.shape == (3, 3, 2)
        for n, node in enumerate(result.nodes):
            x = ch[:, n]
            assert np.all(x >= 0) and np.allclose(x.sum(-1), 1.0)
            assert np.all((x > 0).sum(-1) <= budgets[result.node_classes[node]])
    assert result.series["Oracle"].choices is None


def test_deterministic_under_seed(tiny_moe, result):
    again = run_simulation(_cfg(), tiny_moe, fleet=Fleet(**FLEET), progress=False)
    for name in ("Tanbr", "Random", "Fisher"):
        a, b = result.series[name], again.series[name]
        assert np.array_equal(a.score, b.score)
        assert np.array_equal(a.regret_best_fixed, b.regret_best_fixed)
        if a.choices is not None:
            assert np.array_equal(a.choices, b.choices)
        assert result.summary["policies"][name]["scores"] == again.summary["policies"][name]["scores"]
        # one measurement of the host's service times per model and precision: same arrivals, same latency
        assert again.summary["policies"][name]["latency_ms_p50"] == result.summary["policies"][name]["latency_ms_p50"]
    assert again.summary["batch_ms"] == result.summary["batch_ms"]


def test_service_times_are_measured_once_per_model_and_precision(tiny_moe):
    fp32 = host_costs(tiny_moe, bf16=False)
    assert host_costs(tiny_moe, bf16=False) is fp32
    bf16 = host_costs(tiny_moe, bf16=True)
    assert bf16 is not fp32 and host_costs(tiny_moe, bf16=True) is bf16
    assert set(fp32.batch_ms) == {"merged", "oracle", "top1", "top2", "soft"}
    assert all(len(v) == 16 and min(v) > 0 for v in fp32.batch_ms.values())  # batches of 1..16 (queue.max_batch)


@pytest.mark.parametrize("spec_of", [lambda: Spec.merged(np.array([0.3, 0.7])), lambda: Spec("top2"),
                                     lambda: Spec("static", operator="regmean")])
def test_cached_subset_path_equals_full_forward(tiny_moe, spec_of):
    pool = {t: load_task(t, "dev").head(10, seed=0) for t in tiny_moe.tasks}
    ev = PoolEvaluator(tiny_moe, pool)
    spec = spec_of()
    mode = spec.mode
    state = ev._state(spec)
    subset = [7, 2, 5]
    for task in tiny_moe.tasks:
        cached = ev.logits(spec, task, subset)
        with torch.no_grad():  # uncached: tokens through the whole model, full padded batch
            (b,) = make_batches(tiny_moe, {task: pool[task]}, batch_size=32)
            full = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode=mode, state=state)
        order = {int(i): k for k, i in enumerate(b.index)}
        assert torch.allclose(cached, full[[order[i] for i in subset]], atol=1e-5)


@pytest.mark.parametrize("spec", [Spec.merged(np.array([0.3, 0.7])), Spec("top1"), Spec("oracle"), Spec("static", operator="fisher")])
def test_mixed_task_rows_in_one_pass_equal_the_full_forward(tiny_moe, spec):
    pool = {t: load_task(t, "dev").head(10, seed=0) for t in tiny_moe.tasks}
    ev = PoolEvaluator(tiny_moe, pool)
    rows = [(tiny_moe.tasks[k % 2], i) for k, i in enumerate([7, 2, 5, 0, 9, 3])]
    if spec.kind == "oracle":
        with pytest.raises(ValueError, match="one task"):
            ev.logits_rows(spec, rows)
    mode = spec.mode
    groups = [[r for r in rows if r[0] == t] for t in tiny_moe.tasks] if spec.kind == "oracle" else [rows]
    preds = ev.predict_rows(spec, rows)
    for task in tiny_moe.tasks:
        with torch.no_grad():
            (b,) = make_batches(tiny_moe, {task: pool[task]}, batch_size=32)
            full = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode=mode, state=ev._state(spec))
        order = {int(i): k for k, i in enumerate(b.index)}
        for group in groups:
            if not any(t == task for t, _ in group):
                continue
            where, logits = ev.logits_rows(spec, group)[task]
            want = full[[order[group[k][1]] for k in where]]
            assert torch.allclose(logits, want, atol=1e-5)
            assert np.array_equal(preds[[rows.index(group[k]) for k in where]], want.argmax(-1).numpy())


def test_best_fixed_x_is_screened_on_the_shared_rows_then_picked_in_hindsight(tiny_moe):
    cfg = _cfg(slots=4, regret_sample=0, fixed_candidates=3, regret_finalists=2)
    sim = Simulation(cfg, tiny_moe, Fleet(**FLEET), progress=False)
    best, winners = best_fixed_credit(sim)
    select = selection_rows(sim)
    assert all(len(select[t]) == len(sim.ev.labels[t]) for t in sim.tasks)  # 0: the whole pool
    want = screen_only = low = high = 0.0
    most = 0
    for n, (name, cls) in enumerate(sim.nodes):
        cands = fixed_candidates(sim, n)
        assert all((x > 0).sum() <= cls.budget and abs(x.sum() - 1) < 1e-9 for x in cands)
        most = max(most, len(cands))
        rows = [r for t in range(4) for r in sim.rows(t, n)]
        counts = [sum(task == t for t, _ in rows) for task in sim.tasks]
        estimate = [sum(c * sim.row_credit(select[task], sim.ev.predict_rows(Spec.merged(x), select[task])).mean()
                        for task, c in zip(sim.tasks, counts)) for x in cands]
        served = [sum(sim.serve(Spec.merged(x), t, n)[1].sum() for t in range(4)) for x in cands]
        top = sorted(range(len(cands)), key=lambda i: -estimate[i])[:2]  # the screen's two finalists
        pick = max(top, key=lambda i: served[i])  # the one with most credit on the node's own requests
        assert np.array_equal(winners[name], cands[pick])
        want += served[pick]
        screen_only += served[top[0]]
        low, high = low + min(served), high + max(served)
    assert most > 2  # the B = 2 node: the screen leaves out candidates
    assert best.shape == (4,) and np.isclose(best.sum(), want)
    one = Simulation(cfg.model_copy(update={"regret_finalists": 1}), tiny_moe, Fleet(**FLEET), progress=False)
    assert np.isclose(best_fixed_credit(one)[0].sum(), screen_only) and screen_only <= want + 1e-9
    sampled = Simulation(_cfg(slots=4, regret_sample=3, fixed_candidates=2), tiny_moe, Fleet(**FLEET), progress=False)
    assert all(len(rows) == 3 for rows in selection_rows(sampled).values())
    assert low - 1e-9 <= best_fixed_credit(sampled)[0].sum() <= high + 1e-9  # a candidate's credit


def test_regret_finalists_must_be_positive():
    with pytest.raises(ValueError, match="regret_finalists"):
        SimConfig(regret_finalists=0)


def test_switching_run_reports_recovery_after_each_change(tiny_moe):
    out = run_simulation(_cfg(slots=12, schedule="switching", switch_every=6, policies=["Tanbr", "Random", "Oracle"]),
                         tiny_moe, fleet=Fleet(**FLEET), progress=False)
    assert out.summary["policies"]["Oracle"]["recovery_slots"] == [0]  # no gap to itself
    for name in ("Tanbr", "Random"):  # the figure is the gap series' own recovery, window max(3, T/10)
        want = recovery_slots(out.series[name].regret_oracle, 6, 3, 0.01)  # within 1 point
        assert out.summary["policies"][name]["recovery_slots"] == [want]


def test_predictions_are_memoised(tiny_moe):
    pool = {t: load_task(t, "dev").head(10, seed=0) for t in tiny_moe.tasks}
    ev = PoolEvaluator(tiny_moe, pool)
    x = np.array([0.3, 0.7])
    ev.predict(Spec.merged(x), tiny_moe.tasks[0], np.array([7, 2, 5]))
    before = ev.forwards
    ev.predict(Spec.merged(x), tiny_moe.tasks[0], np.array([7, 2]))
    assert ev.forwards == before  # memoised


def test_merged_states_are_bounded_in_bytes_and_change_no_prediction(tiny_moe, monkeypatch):
    from tanbr_ray.sim import evaluate

    pool = {t: load_task(t, "dev").head(10, seed=0) for t in tiny_moe.tasks}
    xs = [np.array([w, 1 - w]) for w in (0.1, 0.3, 0.5, 0.7, 0.9)]
    free = PoolEvaluator(tiny_moe, pool)
    want = [free.predict(Spec.merged(x), tiny_moe.tasks[0], np.arange(10)) for x in xs]
    one = evaluate._nbytes(free._states[Spec.merged(xs[0])])
    assert free.state_bytes == 5 * one
    monkeypatch.setattr(evaluate, "STATE_CACHE_BYTES", 2 * one)
    ev = PoolEvaluator(tiny_moe, pool)
    got = [ev.predict(Spec.merged(x), tiny_moe.tasks[0], np.arange(10)) for x in xs]
    assert len(ev._states) == 2 and ev.state_bytes == 2 * one  # the two most recent
    assert list(ev._states) == [Spec.merged(xs[3]), Spec.merged(xs[4])]
    assert all(np.array_equal(a, b) for a, b in zip(want, got))


def test_results_files_written_and_readable(result, tmp_path):
    paths = write_results(result, tmp_path)
    assert load_config(tmp_path / "config.yaml").model_dump() == result.config  # the run, resolved, reruns as is
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["policies"]) == set(registry.names("simulation"))
    assert {"requests", "wall_seconds"} <= set(data)
    assert all(p.exists() for p in paths.values())


def test_bad_inputs_give_clear_errors(tiny_moe, tmp_path):
    with pytest.raises(ValueError, match="policy"):
        _cfg(policies=["Tanbr", "Bogus"])
    with pytest.raises(ValueError, match="slot_seconds"):
        _cfg(slot_seconds=0)
    with pytest.raises(ValueError, match="schedule"):
        _cfg(schedule="weekly")
    with pytest.raises(ValueError, match="classes"):
        Fleet(classes=[])
    bad = tmp_path / "fleet.yaml"
    bad.write_text("classes: []\n")
    with pytest.raises(ValueError, match="fleet.yaml"):
        load_fleet(bad)
    big_b = {"classes": [dict(FLEET["classes"][0], budget=5)]}
    with pytest.raises(ValueError, match="budget 5"):
        run_simulation(_cfg(), tiny_moe, fleet=Fleet(**big_b), progress=False)
    with pytest.raises(ValueError, match="mix"):
        Fleet(classes=[dict(FLEET["classes"][1], mix={"SST-2": 0.8, "MNLI": 0.4})])
    with pytest.raises(ValueError, match="tanbr.tree.rho|rho"):
        load_config(None, ["tanbr.tree.rho=1.5"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["slots"])


def test_dotted_overrides_and_shipped_configs():
    cfg = load_config(None, ["slots=7", "tanbr.tree.rho=0.8", "schedule=switching"])
    assert cfg.slots == 7 and cfg.tanbr.tree.rho == 0.8 and cfg.schedule == "switching"
    from tanbr_ray.sim.config import QUICK_CONFIG
    assert load_config(QUICK_CONFIG).model == "quick"
    # the embedded scenarios serve in bf16 exactly where the hardware has bf16 units; `auto` is resolved
    # on load, so results.json records what ran; a config that says nothing serves fp32
    for c in (cfg, load_config(QUICK_CONFIG), load_config(None, ["bf16=auto"])):
        assert c.bf16 is native_bf16("cpu")
    assert load_config(None, ["bf16=false"]).bf16 is False and SimConfig().bf16 is False
    with pytest.raises(ValueError, match="bf16"):
        load_config(None, ["bf16=sometimes"])
    assert len(load_fleet().nodes()) >= 8
    assert len({c.name for c in load_fleet().classes}) >= 3


def test_on_slot_reports_every_slot(tiny_moe):
    seen = []
    run_simulation(_cfg(policies=["Tanbr", "Uniform"]), tiny_moe, fleet=Fleet(**FLEET), progress=False,
                   on_slot=lambda name, t, score, running: seen.append((name, t, score, running)))
    assert [(n, t) for n, t, _, _ in seen] == [(p, t) for p in ("Tanbr", "Uniform") for t in range(3)]
    assert all(0.0 <= s <= 1.0 and 0.0 <= r <= 1.0 for _, _, s, r in seen)


def test_bf16_scoring_stays_close(tiny_moe):
    pool = {t: load_task(t, "dev").head(10, seed=0) for t in tiny_moe.tasks}
    exact, fast = PoolEvaluator(tiny_moe, pool), PoolEvaluator(tiny_moe, pool, bf16=True)
    spec = Spec.merged(np.array([0.5, 0.5]))
    for task in tiny_moe.tasks:
        a, b = exact.logits(spec, task, list(range(10))), fast.logits(spec, task, list(range(10)))
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, atol=0.1) and not torch.equal(a, b)
    # bf16 keeps merged weights cast once: bit-identical to autocast casting fp32 weights at every pass
    assert fast._state(spec)["w1"].dtype == torch.bfloat16 and fast._state(spec)["ln_w"].dtype == torch.float32
    per_pass = PoolEvaluator(tiny_moe, pool, bf16=True)
    per_pass._states[spec] = exact._state(spec)
    for task in tiny_moe.tasks:
        assert torch.equal(per_pass.logits(spec, task, list(range(10))), fast.logits(spec, task, list(range(10))))


def test_balanced_credit_weights_classes_by_their_training_share(tiny_moe):
    from tanbr_ray.moe.data import load_task
    from tanbr_ray.sim.credit import class_weights

    w = class_weights(["SST-2", "MNLI", "STS-B"], None)
    assert "STS-B" not in w  # regression keeps 1 - |error|/5
    for task, C in (("SST-2", 2), ("MNLI", 3)):
        y = load_task(task, "train").labels
        share = np.bincount(y, minlength=C) / len(y)
        assert w[task].shape == (C,)
        assert np.isclose((share * w[task]).sum(), 1.0, atol=0.01)  # a perfect policy earns ~1 a request
        assert np.isclose(share.max() * w[task][share.argmax()], 1.0 / C, atol=0.01)  # majority-only: ~1/C
    acc = Simulation(_cfg(), tiny_moe, Fleet(**FLEET), progress=False)  # the default: accuracy
    bal = Simulation(_cfg(credit="balanced"), tiny_moe, Fleet(**FLEET), progress=False)
    rows = [r for t in range(3) for n in range(len(bal.nodes)) for r in bal.rows(t, n)]
    preds = bal.ev.predict_rows(Spec("top1"), rows)
    a, b = acc.row_credit(rows, preds), bal.row_credit(rows, preds)
    for k, (task, i) in enumerate(rows):
        assert np.isclose(b[k], a[k] * bal.credit_of.class_weight[task][int(bal.ev.labels[task][i])])
    with pytest.raises(ValueError, match="credit"):
        _cfg(credit="f1")


def _memo_file(folder):
    from tanbr_ray.sim.memo import DiskMemo

    f = next(folder.glob("*.safetensors"))
    op, precision = f.stem.split("-")
    return f, lambda: DiskMemo(folder, op, precision)


def _credits(out):
    return {name: p["credit"] for name, p in out.summary["policies"].items()}


def test_disk_memo_reuses_predictions_and_refuses_a_corrupt_file(tiny_moe, tmp_path):
    cfg = _cfg(policies=["Tanbr", "RegMean", "Oracle"])
    first = run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    again = run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    assert first.summary["memo_hits"] == 0 and again.summary["memo_hits"] > 0
    # same data, same config: every prediction comes from the memo; only the verification sample runs
    assert again.summary["model_forwards"] == again.summary["memo"]["verified"] > 0
    assert again.summary["memo"]["refused"] is None
    assert _credits(again) == _credits(first)
    assert again.summary["fingerprint"] == first.summary["fingerprint"]
    f, memo = _memo_file(tmp_path)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    assert memo().refused and not memo().table
    third = run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    assert third.summary["memo_hits"] == 0  # nothing trusted from the corrupt file
    assert _credits(third) == _credits(first)
    assert not memo().refused  # and the next save replaced it


def _rotated_glue(tmp_path, tasks):
    """A GLUE copy whose dev files hold the same examples rotated by half: a pool drawn from it takes
    the same positions as one drawn from the original, but (nearly all) other examples."""
    src = os.environ["TANBR_DATA_DIR"]
    for task in tasks:
        lines = open(os.path.join(src, task, "dev.jsonl")).read().splitlines()
        (tmp_path / task).mkdir(parents=True)
        (tmp_path / task / "dev.jsonl").write_text("\n".join(lines[len(lines) // 2:] + lines[:len(lines) // 2]) + "\n")
    return tmp_path


def test_a_pool_sharing_positions_but_not_examples_computes_its_own_predictions(tiny_moe, tmp_path):
    cfg = _cfg(policies=["RegMean", "Oracle"])
    run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path / "memo")
    other = cfg.model_copy(update={"data_dir": str(_rotated_glue(tmp_path / "glue", tiny_moe.tasks))})
    warm = run_simulation(other, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path / "memo")
    cold = run_simulation(other, tiny_moe, fleet=Fleet(**FLEET), progress=False)
    assert _credits(warm) == _credits(cold)
    assert warm.summary["data"]["pool_sha256"] != run_simulation(
        cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False).summary["data"]["pool_sha256"]
    assert warm.summary["memo_hits"] < cold.summary["model_forwards"] // 4  # (almost) nothing to reuse


def test_changing_pool_per_task_changes_what_is_reused_not_what_it_means(tiny_moe, tmp_path):
    cfg = _cfg(policies=["Tanbr", "RegMean", "Oracle"])
    run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    smaller = cfg.model_copy(update={"pool_per_task": 7})
    warm = run_simulation(smaller, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    cold = run_simulation(smaller, tiny_moe, fleet=Fleet(**FLEET), progress=False)
    assert warm.summary["memo_hits"] > 0 and warm.summary["memo"]["refused"] is None
    assert _credits(warm) == _credits(cold)
    assert warm.summary["fingerprint"] == cold.summary["fingerprint"] != run_simulation(
        cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False).summary["fingerprint"]


def test_an_altered_memo_entry_is_caught_and_the_file_refused(tiny_moe, tmp_path):
    from safetensors.torch import load_file, save_file

    from tanbr_ray.fileio import atomic_write_json, sha256_file
    from tanbr_ray.sim.evaluate import MemoCheck, MemoMismatch
    from tanbr_ray.sim.memo import FORMAT

    cfg = _cfg(policies=["RegMean", "Oracle"])
    first = run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    f, memo = _memo_file(tmp_path)

    def alter(which):  # flip stored classes (SST-2 and MNLI are both classification), checksum kept valid
        t = load_file(str(f))
        preds = t["preds"].clone()
        preds[which] = (preds[which] + 1) % 2
        save_file({"keys": t["keys"], "preds": preds}, str(f))
        atomic_write_json(f.with_suffix(".json"), {"format": FORMAT, "sha256": sha256_file(f), "entries": len(preds)})

    # one entry: a sample that checks every hit finds it
    alter([0])
    ev = PoolEvaluator(tiny_moe, {t: load_task(t, "dev").head(12, seed=0) for t in tiny_moe.tasks},
                       memo=memo(), check=MemoCheck(first=0, fraction=1.0))
    altered = next(iter(load_file(str(f))["keys"][:1].tolist()))
    specs = [Spec("static", operator="regmean"), Spec("oracle")]
    with pytest.raises(MemoMismatch, match="disagree with the memo"):
        for spec in specs:
            for task in tiny_moe.tasks:
                ev.predict(spec, task, np.arange(12))
    assert altered in memo().table  # nothing written yet: the caller refuses the file
    # every entry: the run's own sample catches it, refuses the file, recomputes and says so
    alter(slice(None))
    again = run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    assert "disagree with the memo" in again.summary["memo"]["refused"]
    assert again.summary["memo_hits"] == 0 and _credits(again) == _credits(first)
    assert not memo().refused  # the recomputed predictions replaced the file
    assert run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False,
                          memo_dir=tmp_path).summary["memo"]["refused"] is None


def test_a_memo_of_the_old_position_keyed_format_is_not_read(tiny_moe, tmp_path):
    cfg = _cfg(policies=["RegMean"])
    first = run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    f, memo = _memo_file(tmp_path)
    meta = json.loads(f.with_suffix(".json").read_text())
    f.with_suffix(".json").write_text(json.dumps({**meta, "format": "tanbr-prediction-memo/1"}))
    assert "tanbr-prediction-memo/1" in memo().refused and not memo().table
    again = run_simulation(cfg, tiny_moe, fleet=Fleet(**FLEET), progress=False, memo_dir=tmp_path)
    assert again.summary["memo_hits"] == 0 and "memo/1" in again.summary["memo"]["refused"]
    assert _credits(again) == _credits(first)
    assert memo().refused is None and memo().table  # rewritten in the current format


def test_results_state_their_model_and_data(result, tiny_moe):
    s = result.summary
    assert s["model"] == tiny_moe.identity and len(s["model"]["weights_sha256"]) == 64
    pool = {t: load_task(t, "dev").head(12, seed=0) for t in tiny_moe.tasks}
    assert s["data"]["examples"] == {t: 12 for t in tiny_moe.tasks}
    assert s["data"]["pool_sha256"] == PoolEvaluator(tiny_moe, pool).data_identity()["pool_sha256"]
    assert set(s["data"]["labels_sha256"]) == set(tiny_moe.tasks) and len(s["fingerprint"]) == 16
    p = s["provenance"]
    assert p["versions"]["torch"] == torch.__version__ and p["bf16"] is False and p["wall_seconds"] > 0
    assert p["git_commit"] == "unknown" or len(p["git_commit"].split("+")[0]) == 40
    assert p["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)) and p["date"]
    import resource

    assert 50 * 2**20 < p["peak_rss_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process's peak
    line = provenance_line(s)
    assert s["fingerprint"] in line and s["model"]["weights_sha256"][:12] in line and "12 dev examples" in line


def test_scored_sample_is_a_subset_and_equals_the_full_forward(tiny_moe):
    sim = Simulation(_cfg(slot_seconds=20, scored_per_slot=5), tiny_moe, Fleet(**FLEET), progress=False)
    req = sim.wl.requests[1][2]
    assert len(req.tasks) > 5 and len(req.scored) == 5 and len(np.unique(req.scored)) == 5
    assert np.all(np.diff(req.arrivals) >= 0) and 0 <= req.arrivals[0] and req.arrivals[-1] < 20
    rows = sim.rows(1, 2)
    assert rows == [(sim.tasks[v], int(i)) for v, i in zip(req.tasks[req.scored], req.examples[req.scored])]
    preds = sim.ev.predict_rows(Spec.merged(np.array([0.3, 0.7])), rows)
    for (task, i), p in zip(rows, preds):  # the cached, batched path equals the full forward of that row
        b = make_batches(tiny_moe, {task: sim.ev.pool[task].subset([i])})[0]
        with torch.no_grad():
            logits = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="merged", x=[0.3, 0.7])
        want = logits[0, 0].item() if task == "STS-B" else int(logits.argmax(-1)[0])
        assert p == pytest.approx(want, abs=1e-4)
    # the monitor sees every request, not only the scored ones
    assert sum(len(r.heads) for r in sim.wl.requests[0]) > sum(len(r.scored) for r in sim.wl.requests[0])


def test_scenario_inputs_are_checked_by_field():
    from tanbr_ray.sim.workload import generate

    with pytest.raises(ValueError, match="scored_per_slot"):
        _cfg(scored_per_slot=0)
    with pytest.raises(ValueError, match="seeds"):
        _cfg(seeds=[])
    with pytest.raises(ValueError, match="random_points"):
        _cfg(random_points=-1)
    with pytest.raises(ValueError, match="psi_grid"):
        _cfg(tanbr={"psi_grid": -1})
    with pytest.raises(ValueError, match="seeds"):
        _cfg(seeds=0)
    with pytest.raises(ValueError, match="rate"):
        Fleet(classes=[dict(FLEET["classes"][0], rate=0)])
    with pytest.raises(ValueError, match="rate"):
        generate(["SST-2"], {"SST-2": 4}, [1.0, -1.0], 10, 2, "stationary", 0)
    assert _cfg(seeds=3, seed=5).seed_list() == [5, 6, 7] and _cfg(seeds=[2, 9]).seed_list() == [2, 9]


def test_seeds_and_paired_intervals_on_a_tiny_run(tiny_moe):
    from tanbr_ray.sim.seeds import paired_section, run_seeds, seeds_section

    cfg = _cfg(policies=["Tanbr", "Uniform", "RegMean"], seeds=2)
    outs = run_seeds(cfg, lambda c: run_simulation(c, tiny_moe, fleet=Fleet(**FLEET), progress=False))
    assert [o.config["seed"] for o in outs] == [0, 1]
    seeds = seeds_section(outs, cfg.seed_list())
    per = seeds.policies["Uniform"].credit_second_half
    assert len(per) == 2 and seeds.policies["Uniform"].credit_second_half_mean == pytest.approx(np.mean(per))
    paired = paired_section(outs)
    assert set(paired) == {"Uniform", "RegMean"}
    assert outs[0].seeds == seeds and outs[0].paired == paired  # typed, and the same in results.json:
    assert outs[0].summary["seeds"]["policies"]["Uniform"]["credit_second_half"] == per
    assert outs[0].summary["paired"]["RegMean"]["diff_mean"] == paired["RegMean"].diff_mean
    assert outs[0].phases.setup > 0 and outs[0].summary["wall_seconds_phases"]["policies"] == outs[0].phases.policies
    for name, p in paired.items():
        d = {"ci95": p.ci95, "diff_mean": p.diff_mean}
        lo, hi = p.ci95
        assert lo <= p.diff_mean <= hi and len(p.per_seed) == 2 and p.ci95_t_over_seeds is not None
        # the pooled difference is the credit difference over the same requests
        tan = sum(o.series["Tanbr"].node_credit[1:].sum() for o in outs)
        base = sum(o.series[name].node_credit[1:].sum() for o in outs)
        n = sum(o.series["Tanbr"].node_counts[1:].sum() for o in outs)
        assert d["diff_mean"] == pytest.approx((tan - base) / n)


def test_pinned_tiny_run(tiny_moe):
    """A deterministic tiny run (experts pushed apart so merges differ): a change of these numbers
    is a change of behaviour — the workload, the scored sample, the policies or the scoring."""
    import copy

    from tanbr_ray.moe.merge import FFN_KEYS

    moe = copy.deepcopy(tiny_moe)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in FFN_KEYS:
            moe.experts[k].add_(torch.randn(moe.experts[k].shape, generator=g) * 0.5)
    moe.set_stats(moe.stats)
    out = run_simulation(_cfg(slots=4, policies=["Tanbr", "RegMean", "Uniform"]), moe, fleet=Fleet(**FLEET), progress=False)
    got = {n: (p["credit"], p["credit_second_half"]) for n, p in out.summary["policies"].items()}
    assert got["Tanbr"] == pytest.approx((30 / 76, 14 / 38))
    assert got["RegMean"] == pytest.approx((29 / 76, 13 / 38))
    assert got["Uniform"] == pytest.approx((27 / 76, 14 / 38))
    # the comparator too: the best in hindsight of the screen's 4 finalists per node (picked on the
    # screen alone, it was beaten by all three: -0.154, -0.095, 0.0)
    regret = {n: p["regret_vs_best_fixed"] for n, p in out.summary["policies"].items()}
    assert regret == pytest.approx({"Tanbr": 0.058823529412, "RegMean": 0.117647058824, "Uniform": 0.212885154062})
