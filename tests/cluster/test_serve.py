"""The Serve app on a local multi-node cluster: replicas pinned per class, HTTP on its own loopback
port, live slots pushing merged weights that every replica acknowledges, bad input refused."""

import socket
import time

import httpx
import pytest
import ray

from tanbr_ray.cluster.app import AppArgs
from tanbr_ray.cluster.names import NAMESPACE
from tanbr_ray.cluster.service import local_service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny, fleet):
    cfg, models, _ = tiny
    args = AppArgs(models_dir=str(models), slot_seconds=1.0, router={"policy": "Tanbr", "sample_per_slot": 8},
                   router_name="tanbr-router-test")
    with local_service(args, "127.0.0.1", _free_port(), fleet=fleet, moe_cfg=cfg, ready_timeout_s=240) as u:
        yield u


def _infer(url, body, **kw):
    return httpx.post(f"{url}/v1/infer", json=body, timeout=30, **kw)


def test_health_and_inference(url):
    h = httpx.get(f"{url}/healthz", timeout=10).json()
    assert h["ok"] and h["nodes"] == 3 and h["heads"] == ["SST-2", "MNLI"] and h["slots_closed"] >= 1
    r = _infer(url, {"text_a": "a gripping, well acted film", "head": "SST-2"})
    assert r.status_code == 200, r.text
    assert r.json()["label"] in (0, 1) and r.json()["model_version"] >= 1 and r.json()["node"] in ("board-0", "board-1", "dc-0")
    r = _infer(url, {"text_a": "A man eats.", "text_b": "Someone eats.", "head": "MNLI", "node": "dc-0"})
    assert r.status_code == 200 and r.json()["node"] == "dc-0" and r.json()["label"] in (0, 1, 2)


def test_replicas_are_pinned_to_their_class_nodes(url):
    replicas = httpx.get(f"{url}/v1/state", timeout=30).json()["replicas"]
    assert sorted(r["class"] for r in replicas) == ["board", "board", "dc"]
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    for r in replicas:  # each on a Ray node carrying its class's resource, none on the head
        assert resources[r["ray_node"]].get(f"edge_{r['class']}", 0) > 0, r
        assert "tanbr_head" not in resources[r["ray_node"]]


def test_live_slots_push_to_every_replica_and_learn(url):
    for _ in range(6):  # traffic for board-0 only: its monitor should see SST-2
        assert _infer(url, {"text_a": "dull and far too long", "head": "SST-2", "node": "board-0"}).status_code == 200
    start = httpx.get(f"{url}/healthz", timeout=10).json()["slots_closed"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/healthz", timeout=10).json()["slots_closed"] < start + 2:
        assert time.monotonic() < deadline, "slots stopped closing"
        time.sleep(0.3)
    st = httpx.get(f"{url}/v1/state", timeout=30).json()
    assert st["slot"] >= 1  # the router learned from the label-free rewards of what was served
    assert st["nodes"]["board-0"]["psi"][0] > 0.5
    assert not st["last_push"]["stale"] and not st["last_push"]["errors"]
    versions = {n: s["version"] for n, s in st["nodes"].items()}
    held = [(node, v) for rep in st["replicas"] for node, v in rep["nodes"].items()]
    assert held and all(v == versions[node] for node, v in held)
    for n, s in st["nodes"].items():
        assert abs(sum(s["x"]) - 1) < 1e-9 and sum(x > 0 for x in s["x"]) <= s["budget"]


@pytest.mark.parametrize("content,body,status", [
    ("application/json", b'{"text_a": "x", "head": "SST-2"', 400),
    ("application/json", b'{"text_a": 5, "head": "SST-2"}', 422),
    ("application/json", b'{"text_a": "", "head": "SST-2"}', 422),
    ("application/json", b'{"text_a": "fine", "head": "QQP"}', 422),
    ("application/json", b'{"text_a": "fine", "head": "MNLI"}', 422),
    ("application/json", b'{"text_a": "fine", "head": "SST-2", "node": "nowhere"}', 422),
    ("application/json", b'{"text_a": "' + b"a" * 20000 + b'", "head": "SST-2"}', 413),
    ("text/plain", b'{"text_a": "fine", "head": "SST-2"}', 415),
    ("application/json", b"\xff\xfe{}", 400),
    ("application/json", b"[" * 5000, 400),
])
def test_bad_input_is_refused_and_service_keeps_serving(url, content, body, status):
    r = httpx.post(f"{url}/v1/infer", content=body, headers={"Content-Type": content}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert _infer(url, {"text_a": "great", "head": "SST-2"}).status_code == 200


def test_router_actor_is_named_in_its_namespace(url):
    actor = ray.get_actor("tanbr-router-test", namespace=NAMESPACE)
    assert ray.get(actor.state.remote())["policy"] == "Tanbr"
