"""A multi-node Ray cluster on one machine for the demo, the tests and the benches: a head (a decision
actor, mergers, ingress: `tanbr_head`, `tanbr_control`, `tanbr_merger`), a second control machine (the
other decision actor: `tanbr_control`) and one Ray node per edge class carrying that class's custom
resource — the same resources that cluster.yaml declares on real machines, so everything is placed
the same way.
Every node advertises 127.0.0.1, so no cluster traffic leaves the loopback interface."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager

from tanbr_ray.cluster.names import CONTROL_RESOURCE, HEAD_RESOURCE, LOOPBACK, MERGER_RESOURCE, NAMESPACE, edge_resource
from tanbr_ray.sim.fleet import Fleet

log = logging.getLogger(__name__)
RUNNING: list = []  # the local cluster this process started (fault injection removes its machines)
OBJECT_STORE_MB = 512  # per node; the head holds every published version, replicas map theirs zero-copy


def pin_loopback() -> None:
    """Keep this process's Ray on 127.0.0.1. Ray 2.60 rewrites a loopback address given to a driver
    (`ray.init(address="127.0.0.1:port")`) into the host's interface address, which a cluster bound to
    loopback does not listen on; its only switch for that is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read
    when ray_constants is imported, so it is set in the environment (child processes) and, if Ray is
    already imported, on the constant itself."""
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def machine_env(root: str, node: str) -> dict[str, str]:
    """A Ray node's own home and models cache (its raylet's environment, which its workers inherit)."""
    home = os.path.join(root, node)
    os.makedirs(os.path.join(home, "models"), exist_ok=True)
    return {"HOME": home, "TANBR_MODELS_DIR": os.path.join(home, "models")}


STARTS = 3  # attempts at starting the cluster (see `_start`)


def _start(fleet: Fleet, head_cpus: int, store: int, root: str):
    """Head, a second control machine and one machine per edge class, each with its own directories.

    Ray waits a fixed 30 s for each new node to answer this process's GCS client. On this loaded
    2-core host that wait ran out twice in six full test runs ("RPC error: Deadline Exceeded", the
    previous module's cluster still shutting down), so a start that misses it is torn down and the
    whole cluster started again (a raylet left from the failed try cannot join the new GCS)."""
    from ray.cluster_utils import Cluster

    for attempt in range(1, STARTS + 1):
        cluster = Cluster()
        try:
            cluster.node_dirs, cluster.machines = {}, {}
            cluster.storage = os.path.join(root, "storage")  # what every node reads: the stand-in for NFS or s3://
            machines = [("head", {"num_cpus": head_cpus, "include_dashboard": False,  # the first added is the head
                                  "resources": {HEAD_RESOURCE: 1, CONTROL_RESOURCE: 1, MERGER_RESOURCE: 1},
                                  "object_store_memory": 2 * store})]
            # a second control machine: the standby lives off the leader's, and losing either loses no edge node
            machines += [("control", {"num_cpus": 1, "resources": {CONTROL_RESOURCE: 1}, "object_store_memory": store})]
            machines += [(c.name, {"num_cpus": max(1, math.ceil(c.count * c.replica_cpus)),
                                   "resources": {edge_resource(c.name): c.count}, "object_store_memory": store})
                         for c in fleet.classes]
            for name, opts in machines:
                cluster.node_dirs[name] = os.path.join(root, name)
                node = cluster.add_node(**opts, env_vars=machine_env(root, name), node_ip_address=LOOPBACK)
                cluster.machines[node.node_id] = name
            cluster.wait_for_nodes()
            return cluster
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            cluster.shutdown()
            if "timed out during startup" not in str(exc) or attempt == STARTS:
                raise
            log.warning("a Ray node missed Ray's start-up wait (attempt %d of %d): starting the cluster again",
                        attempt, STARTS)


@contextmanager
def local_cluster(fleet: Fleet, head_cpus: int = 2, object_store_mb: int = OBJECT_STORE_MB):
    """Start the machines (`_start`), connect this process, yield the Cluster; tear it all down.
    Each node gets its own home and models cache (`Cluster.node_dirs`), so nothing is shared between
    them but Ray and the storage locations the app is given: a model cached here is not on them."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    pin_loopback()
    root = tempfile.mkdtemp(prefix="tanbr-nodes-")
    cluster = _start(fleet, head_cpus, object_store_mb * 2**20, root)
    try:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        RUNNING.append(cluster)
        yield cluster
    finally:
        from ray import serve

        if cluster in RUNNING:
            RUNNING.remove(cluster)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(root, ignore_errors=True)


def publish_model(cluster, cache_dir) -> str:
    """Publish a model this process has cached (its cache folder) into the local cluster's storage;
    returns the model_source its machines fetch it from (they never read this process's cache)."""
    from tanbr_ray.moe.publish import publish

    publish(cache_dir, cluster.storage)
    return cluster.storage


def lose_machine(node_id: str) -> str:
    """What losing a machine does, on the local cluster: its raylet and every process on it are
    killed and its local directory (home, models cache) is removed. Returns the machine's name."""
    cluster = RUNNING[-1]
    if node_id == cluster.head_node.node_id:
        raise ValueError("the head machine holds the GCS: losing it ends the cluster (see docs on GCS fault tolerance)")
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    name = cluster.machines[node_id]
    cluster.remove_node(node, allow_graceful=False)
    shutil.rmtree(cluster.node_dirs[name], ignore_errors=True)
    return name
