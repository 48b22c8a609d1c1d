"""The status page's HTML and `kvsleep status`'s table, both from the `/sleep/status` document.

The table is rendered here so that `curl /` and browsers without JavaScript see every model;
`static/status.js` then redraws the same rows from `/sleep/status` every 2 s. Keep the two in step:
same columns, same classes, same formats. Every value is escaped: model names and errors come
from config files and engines.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from kvsleep import __version__

# Buttons that would do nothing in these states are disabled (status.js does the same). In
# `unknown` kvsleep calls nothing until an operator says what the engine is: the row offers that
# instead (`POST /models/{model}/adopt?state=asleep|awake`).
NO_SLEEP = ("asleep", "sleeping", "unknown")
NO_WAKE = ("awake", "waking", "unknown")
ADOPT_IN = "unknown"
ADOPT = (("asleep", "Engine is asleep"), ("awake", "Engine is awake"))
RUNBOOK_UNKNOWN = "docs/runbook.md#kvsleepenginestateunknown"
COLUMNS = (
    "Model",
    "State",
    "Engine",
    "Idle for / threshold",
    "In flight",
    "Held",
    "Wake ETA",
    "Last error",
    "",
)


def duration(seconds: float | None) -> str:
    """A short human duration: 42s, 5m, 5m 3s, 2h 5m (same as status.js and `kvsleep status`)."""
    if seconds is None:
        return "-"
    if 0 < seconds < 1:
        return "<1s"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s" if s % 60 else f"{s // 60}m"
    return f"{s // 3600}h {s % 3600 // 60}m" if s % 3600 // 60 else f"{s // 3600}h"


def idle_text(m: dict[str, Any]) -> str:
    idle = duration(m["idle_seconds"]) if m.get("idle_seconds") is not None else "-"
    text = f"{idle} / {duration(m['idle_threshold_seconds'])}"
    if m.get("always_on"):
        return text + " (always on)"
    if not m.get("auto_sleep_enabled", True):
        return text + " (auto-sleep off)"
    return text


def eta_text(m: dict[str, Any]) -> str:
    eta = m.get("wake_eta_seconds")
    if eta is None:
        text = "-"
    elif m["state"] == "waking":
        text = f"{duration(max(0.0, eta - m['seconds_in_state']))} left of {duration(eta)}"
    else:
        text = duration(eta)
    if m.get("waiting_for_memory"):
        text += f" (waiting for memory: {m['waiting_for_memory']})"
    return text


def status_table(doc: dict[str, Any]) -> str:
    """`kvsleep status`: one line per model, then the GPU budgets."""
    header = (
        "MODEL",
        "STATE",
        "ENGINE",
        "IDLE/THRESHOLD",
        "IN-FLIGHT",
        "HELD",
        "WAKE-ETA",
        "LAST-ERROR",
    )
    rows = [header]
    for name, m in doc["models"].items():
        rows.append(
            (
                name,
                m["state"],
                m["engine"],
                idle_text(m),
                str(m["in_flight"]),
                str(m["held_requests"]),
                eta_text(m),
                _one_line(problem_text(m)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in rows
    ]
    lines.append(
        "auto-sleep "
        + ("on" if doc["auto_sleep_enabled"] else "off (sleep_manager.auto_sleep_enabled)")
    )
    for gpu, g in doc["gpus"].items():
        lines.append(f"GPU {gpu}: {g['committed_gb']:g} / {g['budget_gb']:g} GB committed")
    for name, m in doc["models"].items():
        if m["state"] == ADOPT_IN:
            lines.append(
                f"{name}: state unknown, its requests are refused; find out whether its engine "
                f"released its memory, then `kvsleep adopt {name} asleep` or `... awake` "
                f"({RUNBOOK_UNKNOWN})"
            )
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def problem_text(m: dict[str, Any]) -> str:
    """The last error, and why the model cannot sleep when its engine cannot."""
    parts = [f"cannot sleep: {m['cannot_sleep']}"] if m.get("cannot_sleep") else []
    if m.get("last_error"):
        parts.append(m["last_error"])
    return "; ".join(parts)


def _row(name: str, m: dict[str, Any]) -> str:
    e = escape
    state = m["state"]
    logs = (
        f' <a class="logs" href="logs/{e(quote(name, safe=""))}">logs</a>'
        if m.get("launched")
        else ""
    )
    cells = [
        f'<td class="model">{e(name)}</td>',
        f'<td><span class="state state-{e(state)}">{e(state)}</span></td>',
        f"<td>{e(m['engine'])}</td>",
        f'<td class="idle">{e(idle_text(m))}</td>',
        f'<td class="num">{int(m["in_flight"])}</td>',
        f'<td class="num">{int(m["held_requests"])}</td>',
        f'<td class="eta">{e(eta_text(m))}</td>',
        f'<td class="error">{e(problem_text(m))}</td>',
        f'<td class="actions"><button type="button" data-action="sleep"{_off(state, NO_SLEEP)}>'
        f'Sleep</button> <button type="button" data-action="wake"{_off(state, NO_WAKE)}>Wake'
        f"</button>{_adopt(state)}{logs}</td>",
    ]
    return f'<tr data-model="{e(name)}" data-state="{e(state)}">{"".join(cells)}</tr>'


def _adopt(state: str) -> str:
    """The operator's answer for a model in state unknown: what its engine is."""
    if state != ADOPT_IN:
        return ""
    buttons = "".join(
        f' <button type="button" class="adopt" data-action="adopt" data-adopt="{value}">'
        f"{label}</button>"
        for value, label in ADOPT
    )
    return f'<span class="adopt">{buttons}</span>'


def _off(state: str, states: tuple[str, ...]) -> str:
    return " disabled" if state in states else ""


def _gpu(gpu: str, g: dict[str, Any]) -> str:
    budget, committed = float(g["budget_gb"]), float(g["committed_gb"])
    return (
        f'<div class="gpu" data-gpu="{escape(gpu)}"><span class="gpu-name">GPU '
        f"{escape(gpu)}</span>"
        f'<meter min="0" max="{budget:g}" value="{committed:g}" high="{0.9 * budget:g}">'
        f'</meter><span class="gpu-text">{committed:g} / {budget:g} GB committed</span>'
        "</div>"
    )


def render(doc: dict[str, Any]) -> str:
    """The whole page for one `/sleep/status` document."""
    rows = "".join(_row(name, m) for name, m in doc["models"].items())
    gpus = "".join(_gpu(gpu, g) for gpu, g in doc["gpus"].items()) or (
        '<p class="muted">No GPU budgets configured (<code>gpus:</code> in the config).</p>'
    )
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    auto = (
        "auto-sleep on"
        if doc["auto_sleep_enabled"]
        else "auto-sleep off (sleep_manager.auto_sleep_enabled)"
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kvsleep</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="static/status.css">
</head>
<body>
<header>
<h1>kvsleep</h1>
<span class="muted">kvsleep {escape(__version__)} · {auto} ·
updated <span id="updated">at load</span></span>
<nav><a href="metrics">/metrics</a> <a href="sleep/status">/sleep/status</a>
<a href="openapi.json">/openapi.json</a></nav>
</header>
<p id="notice" role="status" hidden></p>
<main>
<section>
<h2>Models</h2>
<table id="models">
<thead><tr>{head}</tr></thead>
<tbody>{rows}</tbody>
</table>
</section>
<section>
<h2>GPU budgets</h2>
<div id="gpus">{gpus}</div>
</section>
</main>
<dialog id="log-dialog">
<header><strong id="log-title"></strong>
<label><input type="checkbox" id="log-follow"> follow</label>
<button type="button" id="log-close">Close</button></header>
<pre id="log-text"></pre>
</dialog>
<script src="static/status.js" defer></script>
</body>
</html>
"""
