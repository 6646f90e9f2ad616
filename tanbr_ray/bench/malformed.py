"""Malformed inputs for `tanbr bench reliability`: HTTP requests the service must refuse with a 4xx
(the unit tests in tests/cluster/test_api.py hold the full catalogue) and config files every loader
must refuse with a ValueError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

GOOD = {"text_a": "a fine film", "head": "SST-2"}
PAIR = {"text_a": "A man sleeps.", "text_b": "Someone rests.", "head": "MNLI"}
JSON = "application/json"


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


# (name, body bytes, content type)
REQUESTS = [
    ("empty body", b"", JSON),
    ("invalid utf-8", b'{"text_a": "caf\xe9", "head": "SST-2"}', JSON),
    ("utf-16", json.dumps(GOOD).encode("utf-16"), JSON),
    ("truncated json", b'{"text_a": "hi", "head": "SST-2"', JSON),
    ("trailing garbage", _j(GOOD) + b" x", JSON),
    ("single quotes", b"{'text_a': 'hi', 'head': 'SST-2'}", JSON),
    ("NaN", b'{"text_a": NaN, "head": "SST-2"}', JSON),
    ("duplicate key", b'{"text_a": "x", "text_a": "y", "head": "SST-2"}', JSON),
    ("array bomb", b"[" * 16000, JSON),
    ("object bomb", b'{"a":' * 3000, JSON),
    ("oversize bomb", b"[" * 100000, JSON),
    ("top-level list", _j(["a fine film", "SST-2"]), JSON),
    ("top-level number", b"42", JSON),
    ("missing text_a", _j({"head": "SST-2"}), JSON),
    ("missing head", _j({"text_a": "x"}), JSON),
    ("unknown field", _j({**GOOD, "temperature": 0.5}), JSON),
    ("text_a int", _j({**GOOD, "text_a": 5}), JSON),
    ("text_a null", _j({**GOOD, "text_a": None}), JSON),
    ("text_a list", _j({**GOOD, "text_a": ["x"]}), JSON),
    ("head int", _j({**GOOD, "head": 2}), JSON),
    ("empty text", _j({**GOOD, "text_a": ""}), JSON),
    ("whitespace text", _j({**GOOD, "text_a": " \n\t "}), JSON),
    ("text too long", _j({**GOOD, "text_a": "x" * 2001}), JSON),
    ("NUL in text", _j({**GOOD, "text_a": "a\u0000b"}), JSON),
    ("escape sequence in text", _j({**PAIR, "text_b": "x\u001b[31m"}), JSON),
    ("unknown head", _j({**GOOD, "head": "CoLA"}), JSON),
    ("unknown node", _j({**GOOD, "node": "board-99"}), JSON),
    ("pair head without text_b", _j({"text_a": "x", "head": "MNLI"}), JSON),
    ("single head with text_b", _j({**GOOD, "text_b": "extra"}), JSON),
    ("oversize body", _j({**GOOD, "text_a": "x" * 20000}), JSON),
    ("text/plain", _j(GOOD), "text/plain"),
    ("form encoded", b"text_a=x&head=SST-2", "application/x-www-form-urlencoded"),
]


def config_cases(tmp: Path) -> list[tuple[str, callable]]:
    """(name, loader call) pairs on malformed files written into tmp; each must raise ValueError."""
    from tanbr_ray.cluster.checkpoint import CheckpointStore
    from tanbr_ray.cluster.service import args_from_deploy_file
    from tanbr_ray.cluster.validate import check_cluster_config
    from tanbr_ray.moe.config import load_config as load_moe_config
    from tanbr_ray.moe.store import load_moe
    from tanbr_ray.sim.config import load_config
    from tanbr_ray.sim.fleet import load_fleet

    def w(name: str, text: str) -> Path:
        p = tmp / name
        p.write_text(text)
        return p

    (tmp / "model").mkdir(exist_ok=True)
    w("model/config.json", '{"format": "tanbr-task-moe/1", "moe_config": {"tasks": ["SST-2"]}, "files": {}}')
    store = CheckpointStore(str(tmp / "ckpt"))
    store.save(lambda d: (d / "state.json").write_text("{}"))
    store.damage(store.checkpoints()[0], "state.json", keep_fraction=0.5)
    return [
        ("sim config: slots out of range", lambda: load_config(w("sim.yaml", "slots: 0\n"))),
        ("sim config: unknown key", lambda: load_config(w("sim2.yaml", "slotz: 3\n"))),
        ("sim config: not a mapping", lambda: load_config(w("sim3.yaml", "- 1\n- 2\n"))),
        ("sim config: bad YAML", lambda: load_config(w("sim4.yaml", "slots: [1,\n"))),
        ("fleet: empty", lambda: load_fleet(w("fleet.yaml", "classes: []\n"))),
        ("fleet: mix not a distribution", lambda: load_fleet(w("fleet2.yaml", (
            "classes: [{name: b, count: 1, slowdown: 1, memory_x_dense: 1, bandwidth_mbps: 1, rtt_ms: 1,"
            " budget: 1, rate: 1, mix: {SST-2: 0.7}}]\n")))),
        ("MoE config: unknown task", lambda: load_moe_config(w("moe.yaml", "tasks: [NOPE]\n"))),
        ("serve deploy file: typo", lambda: args_from_deploy_file(w("deploy.yaml", (
            "applications: [{name: t, import_path: tanbr_ray.cluster.app:build_app, args: {slot_secnds: 3}}]\n")))),
        ("cluster.yaml: no provider", lambda: check_cluster_config(w("cluster.yaml", "cluster_name: x\n"))),
        ("model cache: no weights", lambda: load_moe(tmp / "model")),
        ("checkpoint: tampered", lambda: store.verify(store.checkpoints()[0])),
    ]
