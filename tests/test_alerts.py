"""Alert/recording rules, Prometheus and Alertmanager examples, and the Grafana dashboard.

Static checks: promtool/amtool validate the files and run the rule unit tests; the rest checks the
project's conventions (docs/runbook.md anchors, rule and alert naming, a firing and a non-firing
unit test per alert, only exported metrics used, dashboard JSON model rules, and that the
committed dashboard is exactly what grafana/build_dashboard.py generates).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kvsleep.control.launcher import Launcher
from kvsleep.core.scaling import BLOCKED
from kvsleep.core.states import ModelState
from kvsleep.web.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "kvsleep-rules.yml"
RULE_TESTS = sorted((REPO / "alerts" / "tests").glob("*.yml"))
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/kvsleep/kvsleep/blob/main/docs/runbook.md#"
DASHBOARD = REPO / "grafana" / "dashboards" / "kvsleep.json"
GENERATOR = REPO / "grafana" / "build_dashboard.py"

EXPECTED_ALERTS = {
    "KvsleepDown",
    "KvsleepWakeFailing",
    "KvsleepWakeLatencyHigh",
    "KvsleepRequestsRejected",
    "KvsleepRequestsHeldTooLong",
    "KvsleepEngineDown",
    "KvsleepEngineCrashLooping",
    "KvsleepModelFlapping",
    "KvsleepReconcileErrors",
    "KvsleepConfigReloadFailed",
    "KvsleepModelIdle",
    "KvsleepPolicySourceDown",
    "KvsleepWakeBlockedOnMemory",
    "KvsleepWakeEtaDrift",
    "KvsleepModelCannotSleep",
    "KvsleepEngineStateUnknown",
    "KvsleepStateFileNotWritable",
    "KvsleepModelSaturated",
    "KvsleepCannotScaleUp",
}
# docs/runbook.md sections that explain rather than answer an alert.
RUNBOOK_GUIDES = {"replicas-and-warm-autoscaling"}
# kvsleep metrics without a `model` label (every other one must honour the $model variable).
NO_MODEL_LABEL = {
    "kvsleep_unknown_model_requests_total",
    "kvsleep_reconcile_duration_seconds_bucket",
    "kvsleep_reconcile_errors_total",
    "kvsleep_state_write_errors_total",
    "kvsleep_config_last_reload_successful",
    "kvsleep_config_last_reload_success_timestamp_seconds",
    "kvsleep_build_info",
    "kvsleep_policy_source_up",
    "kvsleep_gpu_memory_budget_bytes",
    "kvsleep_gpu_memory_committed_bytes",
}
# Alerts about the kvsleep process itself carry no model label; they name the instance instead.
PROCESS_ALERTS = {
    "KvsleepDown",
    "KvsleepReconcileErrors",
    "KvsleepConfigReloadFailed",
    "KvsleepPolicySourceDown",
    "KvsleepStateFileNotWritable",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (scripts/test installs it: apt-get install "
            "prometheus prometheus-alertmanager)"
        )
    return path


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))


def alerts() -> list[dict[str, Any]]:
    return [r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r]


def records() -> list[dict[str, Any]]:
    return [r for g in load_rules()["groups"] for r in g["rules"] if "record" in r]


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that runs queries (rows and text panels do not)."""
    found = []
    for panel in dash["panels"]:
        found.extend(panel.get("panels", []))  # panels inside collapsed rows
        if panel["type"] not in ("row", "text"):
            found.append(panel)
    return found


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in query_panels(dash) for t in p["targets"]]


def exported_metric_names() -> set[str]:
    """Every sample name kvsleep's registry can expose (launcher metrics included)."""

    class NoModels:
        def model_snapshots(self) -> list[Any]:
            return []

        def gpu_snapshots(self) -> list[Any]:
            return []

    metrics = Metrics()
    metrics.watch(NoModels())
    Launcher(None, metrics, "unused")  # type: ignore[arg-type]  # registers its two metrics
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names = set()
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def output_labels(expr: str) -> set[str]:
    """The labels the outermost aggregation of `expr` keeps (empty when it keeps none)."""
    first = re.search(r"\b(sum|max|min|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\(", expr)
    if first is None:
        return set()
    return {label.strip() for label in (first.group(2) or "").split(",") if label.strip()}


def referenced_metrics(expr: str) -> set[str]:
    """kvsleep_* metric names in a PromQL expression (not recording-rule names, which have ':')."""
    return set(re.findall(r"(?<![\w:])(kvsleep_[a-z0-9_]+)(?![\w:])", expr))


# ---- promtool / amtool ---------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = run_tool(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no rule unit tests in alerts/tests/"
    result = run_tool(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_example_prometheus_config() -> None:
    """Also checks that the rule file path in the example resolves."""
    result = run_tool(tool("promtool"), "check", "config", "examples/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_amtool_check_example_alertmanager_config() -> None:
    result = run_tool(tool("amtool"), "check-config", "examples/alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_alertmanager_routes_action_alerts_to_the_webhook() -> None:
    doc = yaml.safe_load((REPO / "examples" / "alertmanager.yml").read_text(encoding="utf-8"))
    (route,) = [r for r in doc["route"]["routes"] if r["receiver"] == "kvsleep-actions"]
    assert any(m.startswith("action") for m in route["matchers"])
    (receiver,) = [r for r in doc["receivers"] if r["name"] == "kvsleep-actions"]
    (hook,) = receiver["webhook_configs"]
    assert hook["url"] == "http://127.0.0.1:8080/alertmanager/webhook"
    assert hook["send_resolved"] is True
    text = (REPO / "examples" / "alertmanager.yml").read_text(encoding="utf-8")
    assert "#   authorization:" in text and "type: Bearer" in text


def test_example_prometheus_config_scrapes_kvsleep_and_alerts() -> None:
    doc = yaml.safe_load((REPO / "examples" / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "kvsleep"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    assert doc["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    assert (REPO / "examples" / doc["rule_files"][0]).resolve() == RULES


# ---- rule conventions ----------------------------------------------------------------------


def test_alert_set_is_complete() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_follows_conventions(alert: dict[str, Any]) -> None:
    name = alert["alert"]
    assert re.fullmatch(r"Kvsleep[A-Z][A-Za-z]+", name)
    assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), f"{name} needs a for: duration"
    assert alert["labels"]["severity"] in ("critical", "warning", "info")
    notes = alert["annotations"]
    assert set(notes) >= {"summary", "description", "runbook_url"}
    assert "\n" not in notes["summary"].strip()
    assert "$value" in notes["description"]
    label = "$labels.instance" if name in PROCESS_ALERTS else "$labels.model"
    assert label in notes["description"], f"{name}: description without {label}"
    assert notes["runbook_url"] == RUNBOOK_URL + name.lower()


def test_every_runbook_url_has_a_runbook_section() -> None:
    anchors = {
        github_anchor(line[3:])
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    for alert in alerts():
        anchor = alert["annotations"]["runbook_url"].removeprefix(RUNBOOK_URL)
        assert anchor in anchors, f"docs/runbook.md has no section for {alert['alert']}"
    alert_anchors = {a["alert"].lower() for a in alerts()}
    assert anchors - RUNBOOK_GUIDES == alert_anchors, "runbook sections without alerts"
    assert anchors >= RUNBOOK_GUIDES, "guide sections missing from docs/runbook.md"


def test_model_idle_alert_is_an_informational_sleep_action() -> None:
    (idle,) = [a for a in alerts() if a["alert"] == "KvsleepModelIdle"]
    assert idle["labels"] == {"severity": "info", "action": "sleep"}
    assert "model:kvsleep_idle_seconds" in idle["expr"]


def test_recording_rules_are_named_level_metric_operations() -> None:
    names = [r["record"] for r in records()]
    assert len(names) == len(set(names))
    assert "model:kvsleep_requests:rate5m" in names
    assert "model:kvsleep_idle_seconds" in names
    for name in names:
        assert re.fullmatch(r"[a-z_]+:kvsleep_[a-z0-9_]+(:[a-z0-9_]+)?", name), name


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    used: dict[str, str] = {}
    for rule in records() + alerts():
        for metric in referenced_metrics(rule["expr"]):
            used[metric] = rule.get("record") or rule["alert"]
    for expr in dashboard_exprs(dashboard()):
        for metric in referenced_metrics(expr):
            used[metric] = "dashboard"
    unknown = {m: where for m, where in used.items() if m not in exported}
    assert not unknown, f"metrics kvsleep does not export: {unknown}"
    # And the dashboard/rules cover the important ones.
    for metric in (
        "kvsleep_model_state",
        "kvsleep_wakes_total",
        "kvsleep_engine_up",
        "kvsleep_engine_restarts_total",
        "kvsleep_engine_crash_looping",
        "kvsleep_state_write_errors_total",
        "kvsleep_model_replicas",
        "kvsleep_model_replicas_desired",
        "kvsleep_model_replica_demand",
        "kvsleep_model_scale_blocked",
        "kvsleep_scale_events_total",
        "kvsleep_replica_state",
        "kvsleep_replica_in_flight_requests",
    ):
        assert metric in used, metric


def test_every_alert_and_recording_rule_has_unit_tests() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    tested_exprs: list[str] = []
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
            tested_exprs += [c["expr"] for c in case.get("promql_expr_test", [])]
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - silent == set(), "alerts without a non-firing test"
    untested = [
        r["record"] for r in records() if not any(r["record"] in expr for expr in tested_exprs)
    ]
    assert not untested, f"recording rules without a promql_expr_test: {untested}"


# ---- Grafana -------------------------------------------------------------------------------


def test_committed_dashboard_is_the_generator_output() -> None:
    assert DASHBOARD.read_text(encoding="utf-8") == generator().render(), (
        "grafana/dashboards/kvsleep.json is stale: run python grafana/build_dashboard.py"
    )


def test_generator_check_mode(tmp_path: Path) -> None:
    gen = generator()
    stale = tmp_path / "kvsleep.json"
    stale.write_text("{}\n")
    assert gen.main(["--check", "--output", str(stale)]) == 1
    assert gen.main(["--output", str(stale)]) == 0
    assert gen.main(["--check", "--output", str(stale)]) == 0


def test_dashboard_state_codes_cover_every_model_state() -> None:
    assert [state for state, _ in generator().STATES] == [s.value for s in ModelState]


def test_dashboard_blocked_codes_cover_every_blocking_reason() -> None:
    assert [reason for reason, _ in generator().BLOCKED] == list(BLOCKED)


def test_dashboard_top_level_conventions() -> None:
    dash = dashboard()
    assert dash["uid"] == "kvsleep-overview"
    assert dash["title"] == "kvsleep / Overview"
    assert 39 <= dash["schemaVersion"] <= 41
    assert "kvsleep" in dash["tags"]
    assert dash["refresh"]
    assert dash["time"]["from"].startswith("now-") and dash["time"]["to"] == "now"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"]["uid"] == "${datasource}"
    assert model["definition"] == "label_values(kvsleep_model_state, model)"
    assert model["query"]["query"] == "label_values(kvsleep_model_state, model)"
    assert model["multi"] is True and model["includeAll"] is True


def test_every_dashboard_panel_follows_conventions() -> None:
    dash = dashboard()
    panels = query_panels(dash)
    types = {p["type"] for p in panels}
    assert {"timeseries", "state-timeline", "stat"} <= types
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["targets"], title
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"]["uid"] == "${datasource}", title
            ranges = re.findall(r"\[([^\]]*)\]", expr)
            assert all(r == "$__rate_interval" for r in ranges), f"{title}: {expr}"
            if re.search(r"\b(i?rate|increase)\(", expr):
                assert ranges, f"{title}: {expr}"
            if "model" in output_labels(expr):
                assert "{{model}}" in target["legendFormat"], f"{title}: {target}"
            for metric, selector in re.findall(r"(kvsleep_[a-z0-9_]+)(\{[^}]*\})?", expr):
                if metric not in NO_MODEL_LABEL:
                    assert 'model=~"$model"' in selector, f"{title}: {metric} ignores $model"


def test_dashboard_has_the_required_panels() -> None:
    dash = dashboard()
    by_title = {p["title"]: p for p in query_panels(dash)}
    exprs = "\n".join(dashboard_exprs(dash))
    state = [
        p
        for p in by_title.values()
        if p["type"] == "state-timeline" and "kvsleep_model_state" in p["targets"][0]["expr"]
    ]
    assert state, "a state timeline of kvsleep_model_state"
    for metric in (
        "kvsleep_requests_total",
        "kvsleep_request_duration_seconds_bucket",
        "kvsleep_requests_in_flight",
        "kvsleep_held_requests",
        "kvsleep_model_last_request_timestamp_seconds",
        "kvsleep_model_idle_threshold_seconds",
        "kvsleep_sleeps_total",
        "kvsleep_wakes_total",
        "kvsleep_wake_duration_seconds_bucket",
        "kvsleep_rejected_requests_total",
        "kvsleep_engine_up",
        "kvsleep_reconcile_duration_seconds_bucket",
        "kvsleep_config_last_reload_successful",
        "kvsleep_state_write_errors_total",
    ):
        assert metric in exprs, metric
    assert any(p["type"] == "text" and "GPU memory" in p["title"] for p in dash["panels"])


def test_dashboard_has_the_replica_row() -> None:
    """Warm autoscaling: awake replicas against demand, per replica load and state, scale events
    and what blocks a scale-up, in one row."""
    dash = dashboard()
    titles = [p["title"] for p in dash["panels"]]
    start = titles.index("Replicas: awake vs demand")
    assert dash["panels"][start]["type"] == "row"
    in_row = {p["title"]: p for p in dash["panels"][start + 1 :]}
    assert all(p["type"] != "row" for p in in_row.values()), "the replica row is the last"

    def exprs(title: str) -> str:
        return "\n".join(t["expr"] for t in in_row[title]["targets"])

    vs = exprs("Awake replicas vs demand")
    assert 'kvsleep_model_replicas{model=~"$model", state="awake"}' in vs
    for metric in (
        "kvsleep_model_replicas_desired",
        "kvsleep_model_replica_demand",
        "kvsleep_model_replicas_max_awake",
    ):
        assert metric in vs, metric
    assert "by (model, replica)" in exprs("In-flight requests per replica")
    state = in_row["Replica state"]
    assert state["type"] == "state-timeline"
    assert "by (model, replica)" in exprs("Replica state")
    assert "{{replica}}" in state["targets"][0]["legendFormat"]
    options = state["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert [o["text"] for o in options.values()] == [s.value for s in ModelState]
    assert "by (model, direction, reason)" in exprs("Scale events")
    blocked = in_row["Scale-up blocked"]
    options = blocked["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert [o["text"] for o in options.values()] == ["ok", *BLOCKED]


def test_dashboard_grid_has_no_overlaps() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_grafana_provisioning_files() -> None:
    prov = REPO / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text(encoding="utf-8"))
    assert ds["apiVersion"] == 1
    assert ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((prov / "dashboards" / "kvsleep.yaml").read_text(encoding="utf-8"))
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    readme = (REPO / "grafana" / "README.md").read_text(encoding="utf-8")
    assert "docker run" in readme and "/var/lib/grafana/dashboards" in readme
