"""The router's actors live and die with their Serve app.

The decision actors and mergers are detached (a `serve deploy` builds the app in a task that ends at
once), so nothing of Ray's ends them with the app. Each decision actor therefore follows its app:
once it has seen the app listed by Serve, the app's absence for `GONE_CHECKS` checks in a row (a
`serve delete`, a `serve shutdown`) ends the router — mergers, decision actors and their placement
group — while its state stays in storage. A redeploy keeps the app listed, so its actors are reused;
routers of other names are never touched.
"""

from __future__ import annotations

import logging

import ray
from ray.util.placement_group import remove_placement_group

from tanbr_ray.cluster.names import NAMESPACE, decision_name, merger_name
from tanbr_ray.cluster.placement import remove_control_group

log = logging.getLogger(__name__)
CHECK_S = 2.0
GONE_CHECKS = 3


def app_listed(app: str) -> bool:
    """Is the app listed by Serve (deploying, running or failing)? False once Serve is gone."""
    from ray import serve

    try:
        return app in serve.status().applications
    except Exception:  # noqa: BLE001 - no Serve controller (serve shutdown): no app
        return False


def end_router(router_name: str, decision_actors: int, mergers: int, spare: str | None = None, group=None) -> None:
    """Kill the router's actors for good and free their placement group (`group`, or the one named
    after the router); `spare` (the caller's own name) is left for last to the caller."""
    names = [decision_name(router_name, i) for i in range(decision_actors)]
    names += [merger_name(router_name, i) for i in range(mergers)]
    for name in names:
        if name == spare:
            continue
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # not alive
            pass
    if group is not None:
        remove_placement_group(group)
    else:
        remove_control_group(router_name)
    log.warning("router %s ended with its app", router_name)
