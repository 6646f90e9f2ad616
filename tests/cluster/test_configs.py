"""The files users hand to the Ray CLI (`ray up`, `serve deploy`) pass Ray's own checks, offline.

No Ray is started: these run Ray's config code and the project's strict key walk only.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml

from tanbr_ray.cluster.service import args_from_deploy_file
from tanbr_ray.cluster.names import HEAD_RESOURCE, edge_resource
from tanbr_ray.cluster.validate import (check_cluster_config, check_cluster_resources, check_fleet_capacity,
                                        check_serve_config, declared_resources)
from tanbr_ray.sim.fleet import load_fleet

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILES = ["cluster.yaml", "cluster-aws.yaml", "cluster-128.yaml"]
FLEET_OF = {"cluster.yaml": "default", "cluster-aws.yaml": "default", "cluster-128.yaml": "128"}

# A serve config of the platform's shape, written here so the validator is tested on its own.
VALID_SERVE = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "0.0.0.0", "port": 8000},
    "applications": [
        {
            "name": "tanbr",
            "route_prefix": "/",
            "import_path": "tanbr_ray.cluster.app:build",
            "args": {"fleet": "default", "anything": {"nested": [1, 2]}},  # free-form: the app's own
            "runtime_env": {"env_vars": {"RAY_AUTH_MODE": "disabled"}},
            "deployments": [
                {"name": "Ingress", "num_replicas": 1,
                 "ray_actor_options": {"resources": {HEAD_RESOURCE: 0.01}}},
                {
                    "name": "EdgeBoard",
                    "num_replicas": 4,
                    "max_ongoing_requests": 8,
                    "user_config": {"version": 0, "free_form_key": True},  # free-form: reconfigure()'s
                    "ray_actor_options": {"num_cpus": 0.5, "resources": {"edge_board": 1}},
                    "autoscaling_config": None,
                },
            ],
        }
    ],
}


def _write(tmp_path: Path, obj, name: str = "serve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def _fleet_classes(fleet: str = "default") -> dict[str, int]:
    return {c.name: c.count for c in load_fleet(fleet).classes}


# --- the repository's own files --------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_pass_ray_and_carry_every_edge_class(name):
    cfg = check_cluster_config(ROOT / name)
    assert cfg["provider"]["type"] in {"local", "aws"}
    fleet = FLEET_OF[name]
    check_cluster_resources(cfg, list(_fleet_classes(fleet)))
    # Each class has at least as many edge slots as its fleet has nodes of that class, and at most
    # one machine's worth more.
    slots = check_fleet_capacity(cfg, load_fleet(fleet))
    declared = declared_resources(cfg)
    for cls, count in _fleet_classes(fleet).items():
        per_machine = max(declared[edge_resource(cls)].values())
        assert count <= slots[cls] < count + per_machine, (name, cls, slots)
    # Every start command runs with the same auth mode (a mismatch cannot connect).
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=disabled" in c for c in starts), (name, key)
    # The project is installed the way scripts/install.sh does it (torch pinned first).
    assert any("scripts/install.sh" in c for c in cfg["setup_commands"])


def test_a_cluster_too_small_for_the_fleet_is_named_by_class():
    cfg = check_cluster_config(ROOT / "cluster-aws.yaml")
    with pytest.raises(ValueError, match=r"board: 4 slots for 57 nodes; gateway: 3 slots for 43 nodes"):
        check_fleet_capacity(cfg, load_fleet("128"))


def test_aws_head_has_no_edge_resources():
    cfg = check_cluster_config(ROOT / "cluster-aws.yaml")
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    assert head[HEAD_RESOURCE] == 1 and not [r for r in head if r.startswith("edge_")]
    assert cfg["provider"]["region"] == "us-west-2"


def test_onprem_worker_ips_all_have_an_edge_class():
    """The local provider has one node type: the start command's IP table must cover every worker."""
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    table = " ".join(raw["worker_start_ray_commands"])
    for ip in raw["provider"]["worker_ips"]:
        assert f'" {ip} "' in table, ip
    head = " ".join(raw["head_start_ray_commands"])
    assert all(f'"{r}": 1' in head for r in (HEAD_RESOURCE, "tanbr_control", "tanbr_merger"))
    assert '"tanbr_control": 1' in table  # the standby's machine is a worker


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_file_mounts_exist(name):
    """`ray up` run from the repository root syncs these paths; a missing one aborts it."""
    raw = yaml.safe_load((ROOT / name).read_text())
    missing = [local for local in raw["file_mounts"].values() if not (ROOT / local).exists()]
    assert not missing, f"{name}: file_mounts point at missing paths {missing}"


def test_cluster_checks_stay_offline(monkeypatch):
    """Validation must not reach any cloud or host: every socket connect and DNS lookup fails here."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in CLUSTER_FILES:
        check_cluster_config(ROOT / name)


def test_deployment_files_pass_strict_serve_check():
    files = sorted((ROOT / "deployments").glob("*.yaml"))
    assert files, "no deployments/*.yaml yet: `serve deploy deployments/<file>.yaml` needs at least one"
    for path in files:
        schema = check_serve_config(path)
        assert schema.applications, path
        args, http = args_from_deploy_file(path)  # the app's own args schema, strict
        assert http["host"] == "127.0.0.1", "loopback unless configured"
        fleet = args.load_fleet()
        names = {d.name: d for d in schema.applications[0].deployments}
        assert set(names) == {"Ingress"} | {f"edge_{c.name}" for c in fleet.classes}, path
        for c in fleet.classes:
            assert names[f"edge_{c.name}"].num_replicas == c.count, (path, c.name)


def test_deploy_file_with_bad_app_args_is_refused(tmp_path):
    raw = yaml.safe_load((ROOT / "deployments" / "tanbr_quick.yaml").read_text())
    raw["applications"][0]["args"]["slot_secnds"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"(?s)bad.yaml: app args.*slot_secnds"):
        args_from_deploy_file(bad)


# --- the serve validator ----------------------------------------------------------------------------


def test_valid_serve_config_passes_and_free_form_fields_stay_free(tmp_path):
    schema = check_serve_config(_write(tmp_path, VALID_SERVE))
    app = schema.applications[0]
    assert app.args["anything"] == {"nested": [1, 2]}
    assert [d.name for d in app.deployments] == ["Ingress", "EdgeBoard"]
    assert app.deployments[1].num_replicas == 4
    assert app.deployments[1].user_config == {"version": 0, "free_form_key": True}
    assert app.deployments[1].ray_actor_options.resources == {"edge_board": 1}


@pytest.mark.parametrize(
    "edit, key_path",
    [
        (lambda c: c.update(aplications=[]), "aplications: unknown key (did you mean applications?)"),
        (lambda c: c["applications"][0].update(import_pth="x:y"), "applications[0].import_pth: unknown key"),
        (
            lambda c: c["applications"][0]["deployments"][1].update(num_replica=3),
            "applications[0].deployments[1].num_replica: unknown key (did you mean num_replicas?)",
        ),
        (
            lambda c: c["applications"][0]["deployments"][1]["ray_actor_options"].update(num_cpu=1),
            "applications[0].deployments[1].ray_actor_options.num_cpu: unknown key "
            "(did you mean num_cpus?)",
        ),
        (
            lambda c: c["applications"][0]["deployments"][0].update(
                num_replicas="auto", autoscaling_config={"max_replica": 3}
            ),
            "applications[0].deployments[0].autoscaling_config.max_replica: unknown key",
        ),
        (lambda c: c["http_options"].update(prot=8000), "http_options.prot: unknown key (did you mean port?)"),
    ],
)
def test_unknown_serve_keys_are_named_with_file_and_path(tmp_path, edit, key_path):
    raw = copy.deepcopy(VALID_SERVE)
    edit(raw)
    path = _write(tmp_path, raw)
    # Ray alone takes the file and drops the key: the strict walk is what catches it.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(raw)
    with pytest.raises(ValueError) as err:
        check_serve_config(path)
    assert str(path) in str(err.value) and key_path in str(err.value)


def test_serve_type_error_names_the_file(tmp_path):
    raw = copy.deepcopy(VALID_SERVE)
    raw["applications"][0]["deployments"][1]["num_replicas"] = -2
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError, match="num_replicas") as err:
        check_serve_config(path)
    assert str(path) in str(err.value)


def test_malformed_serve_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("applications: [\n  - name: x\n")
    with pytest.raises(ValueError, match="cannot read") as err:
        check_serve_config(path)
    assert str(path) in str(err.value)


# --- the cluster validators ------------------------------------------------------------------------


def _cluster(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_without_provider_is_rejected(tmp_path, name):
    raw = _cluster(name)
    del raw["provider"]
    path = _write(tmp_path, raw, "cluster.yaml")
    with pytest.raises(ValueError, match="provider") as err:
        check_cluster_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "name, edit, needle",
    [
        ("cluster-aws.yaml", lambda c: c.update(max_worker=3), "max_worker"),
        ("cluster.yaml", lambda c: c.update(setup_comands=[]), "setup_comands"),
        (
            "cluster-aws.yaml",
            lambda c: c["available_node_types"]["edge_board"].update(min_workers="one"),
            "available_node_types.edge_board.min_workers: 'one' is not of type 'integer'",
        ),
        ("cluster-aws.yaml", lambda c: c.update(head_node_type="nope"), "head_node_type"),
        # Ray refuses node types on the local provider: why cluster.yaml declares resources in start commands.
        (
            "cluster.yaml",
            lambda c: c.update(available_node_types={"head": {"node_config": {}, "resources": {}}}),
            "available_node_types",
        ),
    ],
)
def test_bad_cluster_field_is_rejected(tmp_path, name, edit, needle):
    raw = _cluster(name)
    edit(raw)
    path = _write(tmp_path, raw, "cluster.yaml")
    with pytest.raises(ValueError) as err:
        check_cluster_config(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_malformed_cluster_yaml_names_the_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("provider: {type: local\n")
    with pytest.raises(ValueError, match="cannot read") as err:
        check_cluster_config(path)
    assert str(path) in str(err.value)


def test_aws_cluster_missing_an_edge_class_is_rejected(tmp_path):
    raw = _cluster("cluster-aws.yaml")
    del raw["available_node_types"]["edge_microdc"]["resources"]["edge_microdc"]
    cfg = check_cluster_config(_write(tmp_path, raw, "cluster.yaml"))  # Ray itself is content
    with pytest.raises(ValueError, match="edge_microdc"):
        check_cluster_resources(cfg, list(_fleet_classes()))


def test_onprem_cluster_missing_an_edge_class_is_rejected(tmp_path):
    raw = _cluster("cluster.yaml")
    raw["worker_start_ray_commands"] = [
        "\n".join(line for line in cmd.splitlines() if "edge_gateway" not in line)
        for cmd in raw["worker_start_ray_commands"]
    ]
    cfg = check_cluster_config(_write(tmp_path, raw, "cluster.yaml"))
    with pytest.raises(ValueError, match="edge_gateway"):
        check_cluster_resources(cfg, list(_fleet_classes()))


def test_edge_resource_name():
    assert edge_resource("board") == "edge_board"
    with pytest.raises(ValueError, match="edge_tpu"):
        check_cluster_resources(check_cluster_config(ROOT / "cluster-aws.yaml"), ["board", "tpu"])


def test_import_path_is_a_one_argument_builder():
    """`serve deploy` calls the import path with the file's args as its only parameter."""
    import importlib
    import inspect

    for path in sorted((ROOT / "deployments").glob("*.yaml")):
        for app in check_serve_config(path).applications:
            module, attr = app.import_path.split(":")
            builder = getattr(importlib.import_module(module), attr)
            assert len(inspect.signature(builder).parameters) == 1, (path, app.import_path)


@pytest.mark.parametrize("name", ["default", "quick"])
def test_the_served_router_is_the_one_the_scenario_measures(name):
    """`serve deploy deployments/tanbr_<name>.yaml` resolves to the router `tanbr simulate` measures."""
    from tanbr_ray.moe.resolve import preset_config
    from tanbr_ray.sim.config import load_config, scenario_path

    args, _ = args_from_deploy_file(ROOT / "deployments" / f"tanbr_{name}.yaml")
    sim = load_config(scenario_path(name))
    assert args.scenario == name and args.model == sim.model and args.bf16 == sim.bf16
    assert args.merge_operator == sim.merge_operator and args.model_names() == preset_config(name).cache_names()
    assert args.router.policy == "Tanbr" and args.router.seed == sim.seed
    assert args.router.random_points == sim.random_points
    want, got = sim.tanbr.model_dump(), args.router.tanbr.model_dump()
    assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}


def test_app_args_override_the_scenario_key_by_key():
    from tanbr_ray.cluster.app import AppArgs
    from tanbr_ray.sim.config import load_config, scenario_path

    sim = load_config(scenario_path("default"))
    a = AppArgs(router={"tanbr": {"tree": {"rho": 0.5}}}, merge_operator="linear")
    assert a.router.tanbr.tree.rho == 0.5 and a.merge_operator == "linear"
    assert a.router.tanbr.bandit == sim.tanbr.bandit and a.router.tanbr.tree.nu == sim.tanbr.tree.nu
    assert AppArgs(**a.model_dump()) == a  # a resolved dump resolves to itself
    with pytest.raises(ValueError, match="scenario"):
        AppArgs(scenario="/nonexistent/scenario.yaml")


def test_a_cluster_with_nowhere_for_the_standby_is_refused(tmp_path):
    raw = yaml.safe_load((ROOT / "cluster-aws.yaml").read_text())
    del raw["available_node_types"]["edge_microdc"]["resources"]["tanbr_control"]
    cfg = check_cluster_config(_write(tmp_path, raw, "cluster.yaml"))
    with pytest.raises(ValueError, match="tanbr_control on a second node type"):
        check_cluster_resources(cfg, list(_fleet_classes()))
