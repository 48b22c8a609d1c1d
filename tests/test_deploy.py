"""deploy/: the generated Kubernetes files match their sources, and what the manifests promise.

`scripts/check-deploy` lints and validates the same files with external tools (hadolint,
kubectl kustomize, Kubernetes schemas, promtool, systemd-analyze); these tests check the
properties an operator relies on: the PrometheusRule is the alerts file, the configs are valid
kvsleep configs, the pods are locked down, probes and scraping point where they should.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kvsleep.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
NODE_LOCAL = DEPLOY / "kubernetes" / "overlays" / "node-local"
FLEET = DEPLOY / "kubernetes" / "overlays" / "fleet"
KUSTOMIZATIONS = [BASE, NODE_LOCAL, FLEET]
CONFIGS = [
    BASE / "kvsleep.yaml",
    NODE_LOCAL / "kvsleep.yaml",
    *sorted(FLEET.glob("kvsleep-*.yaml")),
]
RULES = REPO / "alerts" / "kvsleep-rules.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "kvsleep.json"
STATE_MOUNT = "/var/lib/kvsleep"


def load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load_module("build_manifests")


def kubectl() -> str:
    """The kubectl scripts/check-deploy uses: the machine's, else the one it put in .venv."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(REPO / ".venv" / "bin"))
    if found is None:
        pytest.skip("kubectl not installed (scripts/check-deploy installs it)")
    return found


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(request.param)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        # kustomize appends a content hash to generated ConfigMaps' names
        and (
            name is None
            or re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
        )
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]
    assert len(found) == 1, [d["kind"] for d in found]
    return found[0]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def kvsleep_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["containers"] if c["name"] == "kvsleep"]
    return container


# --- generated files ------------------------------------------------------------------------


def test_committed_files_are_the_generator_output(gen: ModuleType) -> None:
    assert gen.main(["--check"]) == 0, "deploy/ is stale: run python deploy/build_manifests.py"


def test_check_mode_fails_when_the_alerts_change(
    gen: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES.read_text())
    monkeypatch.setattr(gen, "RULES", rules)
    monkeypatch.setattr(gen, "BASE", tmp_path / "base")
    assert gen.main(["--check"]) == 1  # nothing generated yet
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    changed = yaml.safe_load(RULES.read_text())
    changed["groups"][0]["rules"].append({"record": "job:up:sum", "expr": "sum by (job) (up)"})
    rules.write_text(yaml.safe_dump(changed))
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert "record: job:up:sum" in (tmp_path / "base" / "prometheusrule.yaml").read_text()


def test_prometheusrule_holds_exactly_the_alert_rules() -> None:
    rule = yaml.safe_load((BASE / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == {"groups": yaml.safe_load(RULES.read_text())["groups"]}


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_configs_are_valid_and_fit_the_container(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSLEEP_ADMIN_TOKEN", "t0ken")
    config = load_config(str(path))
    assert config.router.host == "0.0.0.0"
    assert config.router.admin_token == "t0ken"  # non-loopback: control routes need the token
    assert Path(config.state_dir).is_relative_to(STATE_MOUNT)
    assert Path(config.log_dir).is_relative_to(STATE_MOUNT)
    assert not any(model.command for model in config.models)  # the image has no engine


def test_base_config_is_the_example_config_adapted() -> None:
    example = yaml.safe_load((REPO / "example-config.yaml").read_text())
    base = yaml.safe_load((BASE / "kvsleep.yaml").read_text())
    assert [m["name"] for m in base["models"]] == [m["name"] for m in example["models"]]
    assert base["sleep_manager"] == example["sleep_manager"]


def test_node_local_config_points_at_the_engines_of_its_pod() -> None:
    config = yaml.safe_load((NODE_LOCAL / "kvsleep.yaml").read_text())
    assert config["sleep_manager"]["auto_sleep_enabled"] is True
    pod = yaml.safe_load((NODE_LOCAL / "daemonset.yaml").read_text())["spec"]["template"]["spec"]
    engine_ports = {
        int(m.group(1))
        for c in pod["initContainers"]
        for arg in c["args"]
        if (m := re.fullmatch(r"--port=(\d+)", arg))
    }
    model_urls = {m["url"] for m in config["models"]}
    assert model_urls == {f"http://127.0.0.1:{port}" for port in engine_ports}
    for engine in pod["initContainers"]:
        assert "--host=127.0.0.1" in engine["args"]  # only kvsleep reaches the engines
    # The engine flags sleep needs (engine-contracts.md).
    (vllm,) = [c for c in pod["initContainers"] if c["name"] == "vllm"]
    assert "--enable-sleep-mode" in vllm["args"]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in vllm["env"]
    (sglang,) = [c for c in pod["initContainers"] if c["name"] == "sglang"]
    assert "--enable-memory-saver" in sglang["args"]
    assert "livenessProbe" not in sglang  # /health runs a generation on released memory


# --- rendered manifests ---------------------------------------------------------------------


def test_rendered_objects_are_valid(rendered: list[dict[str, Any]]) -> None:
    assert load_module("validate_manifests").validate(rendered) == []
    kinds = {d["kind"] for d in rendered}
    assert {"Service", "ConfigMap", "ServiceMonitor", "PrometheusRule"} <= kinds


def test_pods_are_locked_down(rendered: list[dict[str, Any]]) -> None:
    pod = workload(rendered)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in containers(pod):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert re.search(r":[\w.-]+$", container["image"]), f"untagged {container['image']}"
    kvsleep = kvsleep_container(pod)
    assert kvsleep["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in kvsleep["volumeMounts"]}
    assert not mounts[STATE_MOUNT].get("readOnly", False)  # the writable state volume
    assert mounts["/etc/kvsleep"]["readOnly"] is True


def test_probes_use_the_health_routes(rendered: list[dict[str, Any]]) -> None:
    kvsleep = kvsleep_container(workload(rendered)["spec"]["template"]["spec"])
    assert kvsleep["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert kvsleep["startupProbe"]["httpGet"]["path"] == "/-/healthy"
    assert kvsleep["readinessProbe"]["httpGet"]["path"] == "/-/ready"


def test_config_and_token_reach_kvsleep(rendered: list[dict[str, Any]]) -> None:
    """Each pod's --config names a file of the mounted ConfigMap (per replica in a StatefulSet,
    through $(POD_NAME)), whose token variable and port the container provides."""
    controller = workload(rendered)
    pod = controller["spec"]["template"]["spec"]
    kvsleep = kvsleep_container(pod)
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    (mount,) = [m for m in kvsleep["volumeMounts"] if m["name"] == "config"]
    config_map = one(rendered, "ConfigMap", config_volume["configMap"]["name"])
    assert kvsleep["args"][:2] == ["serve", "--config"]
    path = kvsleep["args"][2]
    if "$(POD_NAME)" in path:
        assert controller["kind"] == "StatefulSet"
        assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in (
            kvsleep["env"]
        )
        name = controller["metadata"]["name"]
        replicas = [f"{name}-{i}" for i in range(controller["spec"]["replicas"])]
        paths = [path.replace("$(POD_NAME)", replica) for replica in replicas]
    else:
        paths = [path]
    assert sorted(paths) == sorted(f"{mount['mountPath']}/{key}" for key in config_map["data"])
    for key in config_map["data"]:
        config = yaml.safe_load(config_map["data"][key])
        token_env = config["router"]["admin_token_env"]
        assert any(
            e["name"] == token_env and "secretKeyRef" in e["valueFrom"] for e in kvsleep["env"]
        )
        assert kvsleep["ports"] == [{"name": "http", "containerPort": config["router"]["port"]}]


def test_fleet_replicas_agree_on_models_and_replicas() -> None:
    rendered = yaml.safe_load((FLEET / "statefulset.yaml").read_text())
    replicas = rendered["spec"]["replicas"]
    service = rendered["spec"]["serviceName"]
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in FLEET.glob("kvsleep-*.yaml")}
    assert sorted(configs) == [f"kvsleep-{i}" for i in range(replicas)]
    everyone = {f"http://{name}.{service}:8080" for name in configs}
    for name, config in configs.items():
        assert config["fleet"]["self_url"] == f"http://{name}.{service}:8080"
        assert {config["fleet"]["self_url"], *config["fleet"]["peers"]} == everyone
        assert config["policy_source"]["type"] == "prometheus"
        assert config["models"] == configs["kvsleep-0"]["models"]


def test_dashboard_config_map_for_the_grafana_sidecar(rendered: list[dict[str, Any]]) -> None:
    dashboard = one(rendered, "ConfigMap", "kvsleep-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["kvsleep.json"] == DASHBOARD.read_text()


def test_service_monitor_scrapes_kvsleep_as_the_alerts_expect(
    rendered: list[dict[str, Any]],
) -> None:
    service = one(rendered, "Service", "kvsleep")
    monitor = one(rendered, "ServiceMonitor")
    labels = service["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = [
        d
        for d in rendered
        if d["kind"] == "Service" and selector <= d["metadata"]["labels"].items()
    ]
    assert scraped == [service]  # each pod scraped once, not also through a peers' Service
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The rules select job="kvsleep"; the job label comes from the Service's labels.
    assert 'job="kvsleep"' in RULES.read_text()
    assert labels[monitor["spec"]["jobLabel"]] == "kvsleep"
    pod_labels = workload(rendered)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- Dockerfile and systemd unit ------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert "'.[gpu]'" in text
    (user,) = re.findall(r"^USER (\S+)", text, re.M)
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    assert re.search(r"^HEALTHCHECK .*\n?.*/-/healthy", text, re.M)


def test_systemd_unit_is_hardened_and_takes_its_engines_down_with_it() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "kvsleep.service")
    service = unit["Service"]
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "kvsleep"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "control-group"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "serve --config /etc/kvsleep/kvsleep.yaml" in service["ExecStart"]


def test_deploy_guide_names_only_files_that_exist() -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"`((?:deploy|examples|grafana|alerts|docs)/[\w./-]+)`", text))
    assert "deploy/kvsleep.service" in paths
    assert [p for p in sorted(paths) if not (REPO / p.rstrip("/")).exists()] == []
    assert "docs/deploy.md" in (REPO / "README.md").read_text()
