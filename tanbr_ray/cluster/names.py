"""Names every process of the cluster agrees on (kept import-free: edge replicas start faster)."""

ROUTER_NAME = "tanbr-router"
NAMESPACE = "tanbr"
APP_NAME = "tanbr"
HEAD_RESOURCE = "tanbr_head"


def edge_resource(class_name: str) -> str:
    """The custom resource a Ray node of an edge class carries (cluster.yaml declares the same)."""
    return f"edge_{class_name}"


def edge_deployment(class_name: str) -> str:
    return f"edge_{class_name}"
