"""Names every process of the cluster agrees on (kept import-free: edge replicas start faster)."""

ROUTER_NAME = "tanbr-router"  # the base name: the decision actors and the mergers are named after it
NAMESPACE = "tanbr"
APP_NAME = "tanbr"
HEAD_RESOURCE = "tanbr_head"  # the HTTP ingress
CONTROL_RESOURCE = "tanbr_control"  # decision actors (leader and standby on two such machines)
MERGER_RESOURCE = "tanbr_merger"  # mergers: they hold the full MoE
LOOPBACK = "127.0.0.1"  # the local cluster's nodes, the tests and the benches use this address only


def decision_name(router_name: str, index: int) -> str:
    """The decision actors: index 0 leads first, index 1 is the standby."""
    return f"{router_name}-decision-{index}"


def merger_name(router_name: str, index: int) -> str:
    return f"{router_name}-merger-{index}"


def edge_resource(class_name: str) -> str:
    """The custom resource a Ray node of an edge class carries (cluster.yaml declares the same)."""
    return f"edge_{class_name}"


def edge_deployment(class_name: str) -> str:
    return f"edge_{class_name}"
