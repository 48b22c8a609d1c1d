"""Alertmanager webhook payloads (version 4) turned into sleep/wake requests.

Alertmanager retries 5xx and connection errors but not 4xx, so a payload that can never be
acted on (malformed, an unknown model, an unknown action) is refused whole with a 400 before
anything changes, and an accepted one is answered 200 at once: the operation runs in the
background through the same state machine as every other sleep or wake.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

ACTIONS = ("sleep", "wake")


class PayloadError(ValueError):
    """Why a webhook payload is refused (the message goes back to the sender)."""


@dataclass(frozen=True)
class AlertAction:
    model: str
    action: str
    alertname: str


def parse_webhook(payload: Any, models: Container[str]) -> list[AlertAction]:
    """The actions a payload asks for: firing alerts labelled with `model` and `action`.

    Resolved alerts and alerts without both labels ask for nothing.
    """
    if not isinstance(payload, dict):
        raise PayloadError("payload must be a JSON object")
    if payload.get("version") != "4":
        raise PayloadError(
            f'unsupported webhook payload version {payload.get("version")!r} (expected "4")'
        )
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("`alerts` must be a list")
    actions: list[AlertAction] = []
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        status, labels = alert.get("status"), alert.get("labels")
        if status not in ("firing", "resolved"):
            raise PayloadError(f'alerts[{i}].status must be "firing" or "resolved"')
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise PayloadError(f"alerts[{i}].labels must map strings to strings")
        if status != "firing" or "action" not in labels or "model" not in labels:
            continue
        model, action = labels["model"], labels["action"]
        if action not in ACTIONS:
            raise PayloadError(
                f"alerts[{i}]: unknown action {action!r} (expected one of {', '.join(ACTIONS)})"
            )
        if model not in models:
            raise PayloadError(f"alerts[{i}]: unknown model {model!r}")
        actions.append(AlertAction(model, action, labels.get("alertname", "")))
    return actions
