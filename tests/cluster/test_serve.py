"""The Serve app on a local multi-node cluster: every node and the HTTP proxy on 127.0.0.1 only,
replicas pinned per class, live slots (clocked by the decision leader) pushing merged weights that
every replica acknowledges, the leader replaced by its standby under traffic, bad input refused."""

import socket
import time

import httpx
import pytest
import ray

from tanbr_ray.cluster import faults as fi
from tanbr_ray.cluster.app import AppArgs
from tanbr_ray.cluster.decision_client import DecisionClient
from tanbr_ray.cluster.names import NAMESPACE, decision_name, merger_name
from tanbr_ray.cluster.service import local_service

ROUTER = "tanbr-router-test"
STORAGE: dict[str, str] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny, published, fleet, tmp_path_factory):
    cfg, _, _ = tiny
    args = AppArgs(model=cfg.cache_dirname(), model_source=published, slot_seconds=1.0, router_name=ROUTER,
                   router={"policy": "Tanbr", "sample_per_slot": 8,
                           "storage": STORAGE.setdefault("path", str(tmp_path_factory.mktemp("ckpt")))})
    with local_service(args, "127.0.0.1", _free_port(), fleet=fleet, ready_timeout_s=240) as u:
        yield u


def _external_ip() -> str | None:
    """This machine's address on its default route (what Ray would advertise unpinned)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_every_address_is_loopback(url):
    from ray import serve

    assert url.startswith("http://127.0.0.1:")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 4 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}  # head, control, 2 classes
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert serve.status().proxies and all(serve.status().proxies)  # the proxy is up ...
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    assert ray.get(controller.get_http_config.remote()).host == "127.0.0.1"  # ... bound to loopback
    ip, port = _external_ip(), int(url.rsplit(":", 1)[1])
    if ip is not None:  # the same port on the machine's own address: nothing listens there
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((ip, port)) != 0


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


def test_concurrent_requests_to_a_node_are_served_in_batches(url):
    """The node's batcher gathers what arrives together (the scenario's queue: up to 16, 20 ms)."""
    import asyncio

    def held(state):
        return next(r["batches"].get("dc-0", {"batches": 0, "requests": 0}) for r in state["replicas"]
                    if "dc-0" in r["nodes"])

    before = held(httpx.get(f"{url}/v1/state", timeout=30).json())

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/infer", json={
                "text_a": f"review number {i} was fine", "head": "SST-2", "node": "dc-0"}) for i in range(24)))

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    after = held(httpx.get(f"{url}/v1/state", timeout=30).json())
    batches, requests = after["batches"] - before["batches"], after["requests"] - before["requests"]
    assert requests == 24 and batches < 24, after  # some requests shared a forward
    assert 1 < after["largest"] <= 16


def test_replicas_are_pinned_to_their_class_nodes(url):
    replicas = httpx.get(f"{url}/v1/state", timeout=30).json()["replicas"]
    assert sorted(r["class"] for r in replicas) == ["board", "board", "dc"]
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    for r in replicas:  # each on a Ray node carrying its class's resource, none on the head
        assert resources[r["ray_node"]].get(f"edge_{r['class']}", 0) > 0, r
        assert "tanbr_head" not in resources[r["ray_node"]]


def test_every_actor_runs_on_a_machine_carrying_its_role(url):
    """Read back from Ray: decision actors on `tanbr_control` machines, leader and standby apart;
    mergers on `tanbr_merger`; the ingress on `tanbr_head`."""
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    decision = [fi.node_of(ray.get_actor(decision_name(ROUTER, i), namespace=NAMESPACE)) for i in range(2)]
    assert len(set(decision)) == 2 and all(resources[n].get("tanbr_control", 0) > 0 for n in decision)
    for i in range(2):
        assert resources[fi.node_of(ray.get_actor(merger_name(ROUTER, i), namespace=NAMESPACE))].get("tanbr_merger", 0) > 0
    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Ingress" in a["name"]]
    assert ingress
    for a in ingress:
        node = fi.node_of(ray.get_actor(a["name"], namespace=a["namespace"]))
        assert resources[node].get("tanbr_head", 0) > 0


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


def test_decision_actors_and_mergers_are_named_in_their_namespace(url):
    roles = sorted(ray.get(ray.get_actor(decision_name(ROUTER, i), namespace=NAMESPACE).role.remote())["role"]
                   for i in range(2))
    assert roles == ["leader", "standby"]
    started = [ray.get(ray.get_actor(merger_name(ROUTER, i), namespace=NAMESPACE).ready.remote()) for i in range(2)]
    # the published model was fetched into the head's own cache (no shared disk); the second merger on
    # that machine may find the first one's copy there
    froms = sorted(s["model_from"] for s in started)
    assert froms in (["fetched", "fetched"], ["cache", "fetched"]) and all(s["load_model_s"] >= 0 for s in started)


def test_leader_killed_under_traffic_standby_takes_over(url):
    client = DecisionClient(ROUTER, 2)
    rep = fi.kill_leader(client)
    assert rep["new_leader"] != rep["killed"] and rep["recovery_seconds"] < 15
    assert rep["updated_slot_after"] >= rep["updated_slot_before"]  # no slot lost
    closed = httpx.get(f"{url}/healthz", timeout=10).json()["slots_closed"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/healthz", timeout=10).json()["slots_closed"] < closed + 2:  # the new leader clocks
        assert time.monotonic() < deadline, "slots stopped closing after the takeover"
        assert _infer(url, {"text_a": "a fine film", "head": "SST-2"}).status_code == 200
    st = httpx.get(f"{url}/v1/state", timeout=30).json()
    assert st["name"] == rep["new_leader"] and st["role"] == "leader" and st["term"] == rep["term_after"]
    held = [v for r in st["replicas"] for v in r["nodes"].values()]
    assert held and min(held) > rep["version_before"]  # every replica serves a version issued after the kill


def test_deleting_the_app_ends_its_router_and_keeps_its_state(url):
    """Last in this module: `serve delete` takes the decision actors, the mergers and their placement
    group with it; the decision state stays in storage for the next deployment."""
    from ray import serve

    from tanbr_ray.cluster.checkpoint import CheckpointStore
    from tanbr_ray.cluster.names import APP_NAME

    assert any(a["name"].startswith(ROUTER) for a in ray.util.list_named_actors(all_namespaces=True))
    serve.delete(APP_NAME)
    deadline = time.monotonic() + 60
    while alive := [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ROUTER)]:
        assert time.monotonic() < deadline, f"still alive 60 s after the app was deleted: {alive}"
        time.sleep(1)
    assert CheckpointStore(STORAGE["path"]).checkpoints()
    with pytest.raises(ValueError):
        ray.util.get_placement_group(f"{ROUTER}-control")
