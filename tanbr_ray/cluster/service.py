"""The edge service on a local multi-node cluster: what `tanbr serve` and `tanbr bench serve` run."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from tanbr_ray.cluster.app import AppArgs, make_app, parse_args
from tanbr_ray.cluster.local import local_cluster, publish_model
from tanbr_ray.cluster.names import APP_NAME
from tanbr_ray.sim.fleet import Fleet


def args_from_deploy_file(path: str | Path) -> tuple[AppArgs, dict]:
    """(app args, http_options) of the tanbr app in a `serve deploy` file, both validated."""
    from tanbr_ray.cluster.validate import check_serve_config

    schema = check_serve_config(path)
    apps = [a for a in schema.applications if a.import_path == "tanbr_ray.cluster.app:build_app"]
    if not apps:
        raise ValueError(f"{path}: no application with import_path tanbr_ray.cluster.app:build_app")
    try:
        args = parse_args(apps[0].args)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    http = schema.http_options.model_dump(exclude_unset=True) if schema.http_options else {}
    return args, http


@contextmanager
def local_service(args: AppArgs | dict, host: str = "127.0.0.1", port: int = 8000, fleet: Fleet | None = None,
                  ready_timeout_s: float = 300.0, model_dir: Path | None = None):
    """Cluster up, Serve's HTTP proxy on host:port, the app deployed and its first slot pushed;
    yields the base URL; everything is torn down on exit. Without `model_source`, the model this
    process has cached (`model_dir`, else opened here: built on first use) is published to the
    cluster's storage and the nodes fetch it from there."""
    import httpx
    from ray import serve

    a = parse_args(args)
    fleet = fleet or a.load_fleet()
    names = None
    if a.model_source is None:  # the model this process holds, published where the nodes read
        home = Path(model_dir) if model_dir is not None else a.open_model().cache_dir
        names = [home.name]
    with local_cluster(fleet) as cluster:
        if names is not None:
            a = a.model_copy(update={"model_source": publish_model(cluster, home), "models_dir": None})
        serve.start(http_options={"host": host, "port": port})
        serve.run(make_app(a, fleet, names), name=APP_NAME, route_prefix="/")
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + ready_timeout_s
        while True:  # ready = the first slot closed: every node has a merged model
            try:
                h = httpx.get(f"{url}/healthz", timeout=5).json()
                if h.get("slots_closed", 0) >= 1 or a.slot_seconds == 0:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service at {url} not ready after {ready_timeout_s:.0f} s")
            time.sleep(0.5)
        try:
            yield url
        finally:
            serve.delete(APP_NAME)
