#!/usr/bin/env python3
"""Generate grafana/dashboards/kvsleep.json, the "kvsleep / Overview" dashboard.

The JSON is built from plain dicts so that every panel follows the same conventions (datasource
variable, `$__rate_interval`, units, `{{model}}` legends) by construction. Edit this script, not
the JSON, then regenerate:

    python grafana/build_dashboard.py           # writes grafana/dashboards/kvsleep.json
    python grafana/build_dashboard.py --check   # exit 1 if the committed JSON is stale

Queries use only metrics kvsleep exports (see the Metrics table of the product contract).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "kvsleep.json"

UID = "kvsleep-overview"
TITLE = "kvsleep / Overview"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
RI = "$__rate_interval"

# kvsleep_model_state's `state` values, in lifecycle order, with the code and colour the state
# timeline shows (kvsleep.control.state_file.ModelState; a test keeps the two in step).
STATES = (
    ("awake", "green"),
    ("draining", "yellow"),
    ("sleeping", "orange"),
    ("asleep", "blue"),
    ("waking", "purple"),
    ("failed", "red"),
    ("starting", "light-purple"),
    ("down", "dark-red"),
    ("unknown", "dark-orange"),
)

Target = tuple[str, str]  # (PromQL expression, legend format)


def state_code_expr(metric: str = "kvsleep_model_state", by: str = "model") -> str:
    """One series per model (or per `by`) whose value is its state's code (1 = awake ... 9 =
    unknown)."""
    terms = [
        f'{metric}{{{M}, state="{state}"}} * {code}'
        for code, (state, _) in enumerate(STATES, start=1)
    ]
    return f"max by ({by}) (\n    " + "\n  or ".join(terms) + "\n)"


STATE_MAPPINGS = {str(code): (state, color) for code, (state, color) in enumerate(STATES, start=1)}

# kvsleep_model_scale_blocked's `reason` values (kvsleep.core.scaling.BLOCKED), with the code
# the "Scale-up blocked" timeline shows; 0 is "not blocked" (a test keeps the two in step).
BLOCKED = (
    ("max_awake", "orange"),
    ("budget", "red"),
    ("unavailable", "dark-red"),
)


def blocked_code_expr() -> str:
    """One series per model: 0 when its scaler gets what it wants, else the blocking reason's
    code. The scaler reports one reason at a time; max() keeps one if two kvsleeps differ."""
    terms = [
        f'kvsleep_model_scale_blocked{{{M}, reason="{reason}"}} * {code}'
        for code, (reason, _) in enumerate(BLOCKED, start=1)
    ]
    return "max by (model) (\n    " + "\n  or ".join(terms) + "\n)"


def histogram_quantile(q: float, metric: str, by: str = "model", selector: str = M) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RI}])))"


def value_mappings(mapping: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    options = {
        value: {"text": text, "color": color, "index": index}
        for index, (value, (text, color)) in enumerate(mapping.items())
    }
    return [{"type": "value", "options": options}]


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to a new line."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.line_height = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.line_height = max(self.line_height, h)
        return pos

    def newline(self) -> None:
        self.y += self.line_height
        self.x = 0
        self.line_height = 0

    def take_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def row(layout: Layout, title: str) -> dict[str, Any]:
    if layout.x:
        layout.newline()
    panel = {
        "type": "row",
        "title": title,
        "id": layout.take_id(),
        "collapsed": False,
        "gridPos": layout.place(24, 1),
        "panels": [],
    }
    layout.newline()
    return panel


def panel(
    layout: Layout,
    kind: str,
    title: str,
    description: str,
    targets: list[Target],
    unit: str,
    *,
    w: int = 12,
    h: int = 8,
    mappings: list[dict[str, Any]] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    min_value: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "mappings": mappings or []}
    if min_value is not None:
        defaults["min"] = min_value
    if custom:
        defaults["custom"] = custom
    if kind in ("timeseries", "state-timeline"):
        base_options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        base_options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        }
    return {
        "type": kind,
        "title": title,
        "description": description,
        "id": layout.take_id(),
        "gridPos": layout.place(w, h),
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {**base_options, **(options or {})},
        "targets": [
            {
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "refId": chr(ord("A") + index),
            }
            for index, (expr, legend) in enumerate(targets)
        ],
    }


def text_panel(layout: Layout, title: str, content: str, *, w: int, h: int) -> dict[str, Any]:
    return {
        "type": "text",
        "title": title,
        "id": layout.take_id(),
        "gridPos": layout.place(w, h),
        "options": {"mode": "markdown", "content": content},
    }


def dashed(regex: str) -> dict[str, Any]:
    """An override drawing the series whose display name matches `regex` dashed."""
    return {
        "matcher": {"id": "byRegexp", "options": regex},
        "properties": [
            {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
        ],
    }


GPU_NOTE = """\
GPU memory freed by sleeping is engine-specific, and kvsleep exports no per-model memory metric
yet: the panels above count the models that are **asleep** (their KV cache, and for vLLM
`sleep_level: 2` or SGLang also their weights, are released). For bytes, graph the engines' own
metrics (job `engines`) or `nvidia-smi`/DCGM's `DCGM_FI_DEV_FB_USED`.
"""


def panels() -> list[dict[str, Any]]:
    lay = Layout()
    out: list[dict[str, Any]] = []
    add = out.append

    add(row(lay, "Traffic"))
    add(
        panel(
            lay,
            "timeseries",
            "Request rate",
            "Requests routed to each model (all status codes).",
            [(f"sum by (model) (rate(kvsleep_requests_total{{{M}}}[{RI}]))", "{{model}}")],
            "reqps",
            min_value=0,
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Request latency (p50 / p99)",
            "From arrival to the last byte relayed, hold time included.",
            [
                (histogram_quantile(0.5, "kvsleep_request_duration_seconds"), "{{model}} p50"),
                (histogram_quantile(0.99, "kvsleep_request_duration_seconds"), "{{model}} p99"),
            ],
            "s",
            min_value=0,
            overrides=[dashed("p50$")],
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Non-2xx responses",
            "Responses kvsleep answered with a status other than 2xx, by code "
            "(499: client gone; 502/504: engine; 503: model could not be woken).",
            [
                (
                    f"sum by (model, code) "
                    f'(rate(kvsleep_requests_total{{{M}, code!~"2.."}}[{RI}]))',
                    "{{model}} {{code}}",
                )
            ],
            "reqps",
            min_value=0,
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "In-flight and held requests",
            "In flight: received and not yet fully answered (held included). "
            "Held: waiting for the model to wake.",
            [
                (f"sum by (model) (kvsleep_requests_in_flight{{{M}}})", "{{model}} in flight"),
                (f"sum by (model) (kvsleep_held_requests{{{M}}})", "{{model}} held"),
            ],
            "short",
            min_value=0,
            overrides=[dashed("held$")],
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Rejected requests",
            "Requests refused because their model could not be made awake in time, by reason; "
            "and requests naming a model that is not configured.",
            [
                (
                    f"sum by (model, reason) (rate(kvsleep_rejected_requests_total{{{M}}}[{RI}]))",
                    "{{model}} {{reason}}",
                ),
                (
                    f"sum by (endpoint) (rate(kvsleep_unknown_model_requests_total[{RI}]))",
                    "unknown model {{endpoint}}",
                ),
            ],
            "reqps",
            min_value=0,
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Request hold time (p50 / p99)",
            "Time requests waited for their model to become awake (only requests that waited).",
            [
                (histogram_quantile(0.5, "kvsleep_request_hold_seconds"), "{{model}} p50"),
                (histogram_quantile(0.99, "kvsleep_request_hold_seconds"), "{{model}} p99"),
            ],
            "s",
            min_value=0,
            overrides=[dashed("p50$")],
        )
    )

    add(row(lay, "Sleep and wake"))
    add(
        panel(
            lay,
            "state-timeline",
            "Model state",
            "Each model's sleep state over time (kvsleep_model_state).",
            [(state_code_expr(), "{{model}}")],
            "none",
            w=24,
            mappings=value_mappings(STATE_MAPPINGS),
            options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
            custom={"fillOpacity": 80, "lineWidth": 0},
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Time since last request vs idle threshold",
            "Seconds since each model's last request (start or end), against the idle threshold "
            "in force (dashed). Awake models past the threshold are sleep candidates.",
            [
                (
                    f"time() - max by (model) "
                    f"(kvsleep_model_last_request_timestamp_seconds{{{M}}} > 0)",
                    "{{model}} idle",
                ),
                (
                    f"max by (model) (kvsleep_model_idle_threshold_seconds{{{M}}})",
                    "{{model}} threshold",
                ),
            ],
            "s",
            min_value=0,
            overrides=[dashed("threshold$")],
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Sleeps and wakes",
            "Sleep and wake operations per minute, by result.",
            [
                (
                    f"60 * sum by (model, result) (rate(kvsleep_sleeps_total{{{M}}}[{RI}]))",
                    "{{model}} sleeps {{result}}",
                ),
                (
                    f"60 * sum by (model, result) (rate(kvsleep_wakes_total{{{M}}}[{RI}]))",
                    "{{model}} wakes {{result}}",
                ),
            ],
            "opm",
            min_value=0,
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Wake and sleep latency (engine)",
            "Time the engine took to wake (p50 / p90 / p99, weight reloads included) and to go "
            "to sleep (p90, drain excluded).",
            [
                (histogram_quantile(0.5, "kvsleep_wake_duration_seconds"), "{{model}} wake p50"),
                (histogram_quantile(0.9, "kvsleep_wake_duration_seconds"), "{{model}} wake p90"),
                (histogram_quantile(0.99, "kvsleep_wake_duration_seconds"), "{{model}} wake p99"),
                (histogram_quantile(0.9, "kvsleep_sleep_duration_seconds"), "{{model}} sleep p90"),
            ],
            "s",
            w=8,
            min_value=0,
            overrides=[dashed("sleep p90$")],
        )
    )
    add(
        panel(
            lay,
            "stat",
            "Models asleep",
            "Models whose engine has released its GPU memory.",
            [(f'sum(max by (model) (kvsleep_model_state{{{M}, state="asleep"}}))', "asleep")],
            "short",
            w=4,
            options={"colorMode": "value", "graphMode": "area"},
        )
    )
    add(
        panel(
            lay,
            "stat",
            "Models that cannot sleep",
            "Models whose engine answered the sleep call with 404/405 (no sleep route, e.g. vLLM "
            "without VLLM_SERVER_DEV_MODE=1): they stay awake until a reload or engine restart. "
            "/sleep/status names them and why.",
            [(f"sum(max by (model) (kvsleep_model_cannot_sleep{{{M}}}))", "cannot sleep")],
            "short",
            w=4,
            options={"colorMode": "value", "graphMode": "none"},
        )
    )
    add(
        panel(
            lay,
            "bargauge",
            "Models by state",
            "How many models are in each state now.",
            [
                (
                    f"sum by (state) (max by (model, state) (kvsleep_model_state{{{M}}}))",
                    "{{state}}",
                )
            ],
            "short",
            w=8,
            min_value=0,
            options={"orientation": "horizontal", "displayMode": "basic", "showUnfilled": True},
        )
    )
    add(text_panel(lay, "GPU memory", GPU_NOTE, w=24, h=3))

    add(row(lay, "GPU memory and wake ETA"))
    add(
        panel(
            lay,
            "timeseries",
            "GPU memory budget vs committed",
            "Per budgeted GPU: what the configuration lets models hold, and what models that "
            "are not asleep hold (their memory_gb). A wake that would exceed the budget first "
            "sleeps least-recently-used idle models.",
            [
                ("max by (gpu) (kvsleep_gpu_memory_budget_bytes)", "GPU {{gpu}} budget"),
                ("max by (gpu) (kvsleep_gpu_memory_committed_bytes)", "GPU {{gpu}} committed"),
            ],
            "bytes",
            w=8,
            min_value=0,
            overrides=[dashed("budget$")],
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Wakes waiting for GPU memory",
            "1 while a wake of the model waits for room in its GPUs' budget (every model on "
            "them busy or pinned); its requests stay held meanwhile.",
            [(f"max by (model) (kvsleep_model_waiting_for_memory{{{M}}})", "{{model}}")],
            "none",
            w=8,
            min_value=0,
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Wake ETA vs measured",
            "The ETA kvsleep gives clients (median of recent wakes) against the mean measured "
            "wake time; a gap means Retry-After and deadline checks mislead.",
            [
                (f"max by (model) (kvsleep_model_wake_eta_seconds{{{M}}})", "{{model}} ETA"),
                (
                    f"sum by (model) (rate(kvsleep_wake_duration_seconds_sum{{{M}}}[{RI}]))"
                    f" / sum by (model) (rate(kvsleep_wake_duration_seconds_count{{{M}}}[{RI}]))",
                    "{{model}} measured",
                ),
            ],
            "s",
            w=8,
            min_value=0,
            overrides=[dashed("ETA$")],
        )
    )
    add(row(lay, "Engines and kvsleep"))
    add(
        panel(
            lay,
            "state-timeline",
            "Engine up",
            "Whether each model's engine answered kvsleep's last probe.",
            [(f"max by (model) (kvsleep_engine_up{{{M}}})", "{{model}}")],
            "none",
            mappings=value_mappings({"0": ("down", "red"), "1": ("up", "green")}),
            options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
            custom={"fillOpacity": 80, "lineWidth": 0},
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Engine restarts (engines kvsleep launches)",
            "Restarts of launched engines after unexpected exits, and the crash-loop flag "
            "(1 while an engine keeps dying soon after start).",
            [
                (
                    f"sum by (model) (increase(kvsleep_engine_restarts_total{{{M}}}[{RI}]))",
                    "{{model}} restarts",
                ),
                (
                    f"max by (model) (kvsleep_engine_crash_looping{{{M}}})",
                    "{{model}} crash looping",
                ),
            ],
            "short",
            min_value=0,
            overrides=[dashed("crash looping$")],
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Reconcile pass duration",
            "Time one reconcile pass took, engine probes included.",
            [
                (
                    histogram_quantile(
                        0.5, "kvsleep_reconcile_duration_seconds", by="instance", selector=""
                    ),
                    "{{instance}} p50",
                ),
                (
                    histogram_quantile(
                        0.99, "kvsleep_reconcile_duration_seconds", by="instance", selector=""
                    ),
                    "{{instance}} p99",
                ),
            ],
            "s",
            w=10,
            min_value=0,
            overrides=[dashed("p50$")],
        )
    )
    add(
        panel(
            lay,
            "timeseries",
            "Reconcile and state file errors",
            "Reconcile passes or actions that raised an error, and failed writes of the state "
            "file (dashed: while they fail, SGLang engines are neither released nor resumed). "
            "See kvsleep's log and the runbook.",
            [
                (
                    f"sum by (instance) (rate(kvsleep_reconcile_errors_total[{RI}]))",
                    "{{instance}} reconcile",
                ),
                (
                    f"sum by (instance) (rate(kvsleep_state_write_errors_total[{RI}]))",
                    "{{instance}} state file writes",
                ),
            ],
            "ops",
            w=6,
            min_value=0,
            overrides=[dashed("state file writes$")],
        )
    )
    add(
        panel(
            lay,
            "stat",
            "Last config reload",
            "Whether the last configuration load or reload succeeded.",
            [("min by (instance) (kvsleep_config_last_reload_successful)", "{{instance}}")],
            "none",
            w=4,
            mappings=value_mappings({"0": ("failed", "red"), "1": ("ok", "green")}),
            options={"colorMode": "background", "graphMode": "none"},
        )
    )
    add(
        panel(
            lay,
            "stat",
            "Since last successful reload",
            "Time since the configuration was last loaded or reloaded successfully.",
            [
                (
                    "time() - max by (instance) "
                    "(kvsleep_config_last_reload_success_timestamp_seconds)",
                    "{{instance}}",
                )
            ],
            "s",
            w=4,
            options={"colorMode": "none", "graphMode": "none"},
        )
    )
    out += replica_panels(lay)
    return out


def replica_panels(lay: Layout) -> list[dict[str, Any]]:
    """Warm autoscaling: a model's engine replicas, woken and slept as its demand moves.

    Counts of replicas are views of the engines, which every kvsleep in front of them shares,
    so they are combined with max(); request counts are each kvsleep's own and are summed.
    The row comes last so that the ids of the panels above it stay as they were.
    """
    out = [row(lay, "Replicas: awake vs demand")]
    out.append(
        panel(
            lay,
            "timeseries",
            "Awake replicas vs demand",
            "Replicas awake now, against what the scaler wants awake (desired: the demand "
            "rounded up and kept within min_awake..max_awake) and the demand itself in "
            "replicas (what is in use over what one replica should carry, trend included). "
            "Demand above max_awake (dashed) is more than the model may have: see the "
            "KvsleepModelSaturated alert.",
            [
                (
                    f'max by (model) (kvsleep_model_replicas{{{M}, state="awake"}})',
                    "{{model}} awake",
                ),
                (f"max by (model) (kvsleep_model_replicas_desired{{{M}}})", "{{model}} desired"),
                (f"max by (model) (kvsleep_model_replica_demand{{{M}}})", "{{model}} demand"),
                (
                    f"max by (model) (kvsleep_model_replicas_max_awake{{{M}}})",
                    "{{model}} max_awake",
                ),
                (
                    f"max by (model) (kvsleep_model_replicas_min_awake{{{M}}})",
                    "{{model}} min_awake",
                ),
            ],
            "short",
            min_value=0,
            overrides=[dashed("(max|min)_awake$")],
        )
    )
    out.append(
        panel(
            lay,
            "timeseries",
            "In-flight requests per replica",
            "Requests inside each replica's engine. Without affinity, requests go to the awake "
            "replica with the fewest, so awake replicas should track each other; one at 0 while "
            "another is busy is not taking traffic.",
            [
                (
                    f"sum by (model, replica) (kvsleep_replica_in_flight_requests{{{M}}})",
                    "{{model}} #{{replica}}",
                )
            ],
            "short",
            min_value=0,
        )
    )
    out.append(
        panel(
            lay,
            "state-timeline",
            "Replica state",
            "Each replica's state over time (kvsleep_replica_state); replicas are numbered in "
            "config order. A step up is a replica going asleep -> waking -> awake, a step down "
            "awake -> draining -> sleeping -> asleep.",
            [
                (
                    state_code_expr("kvsleep_replica_state", by="model, replica"),
                    "{{model}} #{{replica}}",
                )
            ],
            "none",
            w=24,
            mappings=value_mappings(STATE_MAPPINGS),
            options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
            custom={"fillOpacity": 80, "lineWidth": 0},
        )
    )
    out.append(
        panel(
            lay,
            "timeseries",
            "Scale events",
            "Replicas woken (up) and drained and slept (down) per minute, by reason: up for "
            "min_awake, target (demand above the awake replicas) or trend (it will be by the "
            "time a wake is done); down for max_awake or below_target.",
            [
                (
                    f"60 * sum by (model, direction, reason) "
                    f"(rate(kvsleep_scale_events_total{{{M}}}[{RI}]))",
                    "{{model}} {{direction}} {{reason}}",
                )
            ],
            "opm",
            w=8,
            min_value=0,
        )
    )
    out.append(
        panel(
            lay,
            "state-timeline",
            "Scale-up blocked",
            "Whether the demand wants more awake replicas than the model can have, and why: "
            "max_awake (at its ceiling), budget (no asleep replica fits its GPUs' memory "
            "budget) or unavailable (no replica asleep to wake: failed, down, draining). "
            "Alerts: KvsleepModelSaturated, KvsleepCannotScaleUp.",
            [(blocked_code_expr(), "{{model}}")],
            "none",
            w=8,
            mappings=value_mappings(
                {"0": ("ok", "green")}
                | {str(code): (reason, color) for code, (reason, color) in enumerate(BLOCKED, 1)}
            ),
            options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
            custom={"fillOpacity": 80, "lineWidth": 0},
        )
    )
    out.append(
        panel(
            lay,
            "bargauge",
            "Replicas by state",
            "How many replicas of the selected models are in each state now.",
            [
                (
                    f"sum by (state) (max by (model, state) (kvsleep_model_replicas{{{M}}}))",
                    "{{state}}",
                )
            ],
            "short",
            w=8,
            min_value=0,
            options={"orientation": "horizontal", "displayMode": "basic", "showUnfilled": True},
        )
    )
    return out


def build() -> dict[str, Any]:
    model_query = "label_values(kvsleep_model_state, model)"
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "kvsleep: per-model traffic, sleep state, wakes and engines.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "title": "Runbook",
                "type": "link",
                "url": "https://github.com/kvsleep/kvsleep/blob/main/docs/runbook.md",
                "targetBlank": True,
                "icon": "doc",
            }
        ],
        "liveNow": False,
        "panels": panels(),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["kvsleep", "vllm", "sglang", "llm"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                },
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": model_query,
                    "query": {
                        "qryType": 1,
                        "query": model_query,
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "current": {},
                    "hide": 0,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "options": [],
                    "refresh": 2,
                    "regex": "",
                    "skipUrlSync": False,
                    "sort": 1,
                },
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
