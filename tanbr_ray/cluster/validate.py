"""Offline checks for the files users hand to the Ray CLI: `serve deploy` configs and `ray up` configs.

Why: Ray accepts a misspelt Serve key without a word (`ServeDeploySchema` ignores unknown keys, so
`num_replica: 4` silently deploys one replica), and `ray up` only finds a bad cluster file after it
has started talking to machines. These checks fail fast, name the file and the dotted key path, and
never touch the network or start Ray.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema

from tanbr_ray.cluster.names import CONTROL_RESOURCE, HEAD_RESOURCE, MERGER_RESOURCE, edge_resource
from tanbr_ray.fileio import read_yaml_mapping


# --- Serve configs --------------------------------------------------------------------------------


def check_serve_config(path: str | os.PathLike) -> ServeDeploySchema:
    """Validate a `serve deploy` file: Ray's own schema plus a strict walk for unknown keys."""
    raw = read_yaml_mapping(path, "serve config")
    errors: list[str] = []
    _walk(raw, ServeDeploySchema, "", errors)
    if errors:
        raise ValueError("\n".join(f"serve config {path}: {e}" for e in errors))
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"serve config {path}: {exc}") from exc


def _walk(value: Any, ann: Any, where: str, errors: list[str]) -> None:
    """Check `value` against type `ann`: recurse where Ray has a pydantic model, else accept anything.

    Plain dict fields (`args`, `user_config`, `runtime_env`, `resources`, ...) are free-form on purpose:
    they belong to the application or to Ray core, not to the Serve schema. Type mismatches are left
    for pydantic to report.
    """
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _walk(value, args[0], where, errors)
    if origin in (typing.Union, types.UnionType):
        # Dict | SomeModel (e.g. autoscaling_config): Ray builds the model from the dict later, so hold
        # the dict to the model's keys; a list goes to the first list-shaped member.
        for arm in args:
            if isinstance(value, dict) and _is_model(arm):
                return _walk(value, arm, where, errors)
            if isinstance(value, list) and typing.get_origin(arm) in (list, typing.List):
                return _walk(value, arm, where, errors)
        return None
    if _is_model(ann) and isinstance(value, dict):
        return _walk_model(value, ann, where, errors)
    if origin in (list, typing.List) and isinstance(value, list) and args:
        for i, item in enumerate(value):
            _walk(item, args[0], f"{where}[{i}]", errors)
    elif origin in (dict, typing.Dict) and isinstance(value, dict) and len(args) == 2:
        for k, item in value.items():
            _walk(item, args[1], _join(where, str(k)), errors)
    return None


def _walk_model(raw: dict, model: type[BaseModel], where: str, errors: list[str]) -> None:
    if model.model_config.get("extra") == "allow":  # the model itself takes any key
        return
    by_key: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        for key in (name, field.alias, field.validation_alias):
            if isinstance(key, str):
                by_key[key] = field.annotation
    for key, value in raw.items():
        path = _join(where, str(key))
        if key not in by_key:
            close = difflib.get_close_matches(str(key), list(by_key), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            errors.append(f"{path}: unknown key{hint}")
        else:
            _walk(value, by_key[key], path, errors)


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --- Cluster configs ------------------------------------------------------------------------------


def check_cluster_config(path: str | os.PathLike) -> dict:
    """Validate a `ray up` file the way `ray up` does before it launches anything; return it prepared.

    Uses Ray's own `prepare_config` (fills provider defaults from YAML files shipped with Ray; for the
    `local` provider it folds the head/worker IPs into its single internal node type) and
    `validate_config` (Ray's JSON schema, which rejects unknown top-level keys). Neither calls the
    cloud: AWS resource auto-detection happens later, in `ray up`'s bootstrap, which is not called.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = read_yaml_mapping(path, "cluster config")
    provider = raw.get("provider")
    if not isinstance(provider, dict) or "type" not in provider:
        raise ValueError(f"cluster config {path}: provider: required mapping with a `type` (local, aws, ...)")
    try:
        prepared = prepare_config(raw)
        validate_config(prepared)
    except Exception as exc:  # jsonschema, click (local provider aborts), KeyError, ... all mean "bad file"
        msg = getattr(exc, "message", None) or str(exc) or repr(exc)
        where = ".".join(map(str, getattr(exc, "absolute_path", ())))  # jsonschema: where in the file
        raise ValueError(f"cluster config {path}: {where + ': ' if where else ''}{msg}") from exc
    return prepared


# A JSON object in single quotes inside a start command, as `ray start --resources='{"edge_board": 4}'`
# (or `R='{...}'` then `--resources="$R"`) declares it: the local provider takes resources only that way.
_QUOTED_JSON = re.compile(r"'(\{[^']*\})'")


def declared_resources(cfg: dict) -> dict[str, dict[str, float]]:
    """Custom resource -> {where it is declared (node type, or start command list): amount per node}."""
    found: dict[str, dict[str, float]] = {}
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        for res, amount in ((node_type or {}).get("resources") or {}).items():
            found.setdefault(res, {})[name] = amount
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg.get(key) or []:
            for literal in _QUOTED_JSON.findall(str(cmd)):
                try:
                    obj = json.loads(literal)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    for res, amount in obj.items():
                        found.setdefault(res, {})[key] = amount
    return found


def check_cluster_resources(cfg: dict, classes: list[str]) -> None:
    """Every edge class needs a node that carries `edge_<class>`; some node `tanbr_head` (ingress) and
    `tanbr_merger` (mergers); two places `tanbr_control` (leader and standby on different machines).

    Why: Ray places each role by its custom resource; without a node declaring it the actors stay
    pending forever instead of failing.
    """
    declared = declared_resources(cfg)
    missing = [r for r in [edge_resource(c) for c in classes] + [HEAD_RESOURCE, MERGER_RESOURCE, CONTROL_RESOURCE]
               if r not in declared]
    if CONTROL_RESOURCE in declared and len(declared[CONTROL_RESOURCE]) < 2:
        missing.append(f"{CONTROL_RESOURCE} on a second node type (the standby lives off the leader's machine)")
    if missing:
        raise ValueError(
            f"cluster config {cfg.get('cluster_name', '?')}: no node type declares {missing} in `resources` "
            f"(nor a `ray start --resources` JSON); declared: {sorted(declared)}"
        )


def check_fleet_capacity(cfg: dict, fleet) -> dict[str, int]:
    """Every edge class needs as many `edge_<class>` slots as the fleet has nodes of that class (one
    replica per node): per node type, its amount x its max_workers (1 for the head, and for start
    commands: the local provider's machines declare theirs one by one). Returns the slots per class.

    Why: Serve would leave the replicas beyond the slots pending, and those nodes unserved."""
    declared = declared_resources(cfg)
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    slots, short = {}, []
    for c in fleet.classes:
        total = 0
        for where, amount in declared.get(edge_resource(c.name), {}).items():
            machines = 1 if where == head or where not in types else int(types[where].get("max_workers", 0))
            total += int(amount) * machines
        slots[c.name] = total
        if total < c.count:
            short.append(f"{c.name}: {total} slots for {c.count} nodes")
    if short:
        raise ValueError(f"cluster config {cfg.get('cluster_name', '?')}: too few edge slots for the fleet "
                         f"({'; '.join(short)})")
    return slots
