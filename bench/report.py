"""latest.md: the results as markdown tables, and the issue's acceptance targets checked."""

from __future__ import annotations

from typing import Any

from bench.scenarios import BARE_PROXY
from bench.stats import median, ratio, rnd

# kvsleep's CPU per proxied request may be at most this many times the bare aiohttp proxy's.
CPU_RATIO_LIMIT = 1.15
# A run cut at its end leaves up to `concurrency` answers unfinished, whose CPU is charged to
# the finished ones; a point is judged only when a run finishes this many times as many.
MIN_ANSWERS_PER_SLOT = 5


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def data_path_cost(results: dict[str, Any]) -> dict[str, Any]:
    """kvsleep's CPU µs per 2xx over the bare aiohttp proxy's, at every wrk point of the run.

    Both ran the same load against the same sim, interleaved, so the ratio is what kvsleep's
    routing, holding, metrics and guards cost on top of aiohttp itself. It holds when every
    judged point is within the limit; a point whose runs finish fewer than
    MIN_ANSWERS_PER_SLOT x concurrency answers (streams at c=512 in 1 s runs) is shown, not
    judged: the unfinished answers' CPU would dominate."""
    points = []
    for scenario in ("nonstream", "stream"):
        for key, point in results["scenarios"].get(scenario, {}).get("points", {}).items():
            targets = point["targets"]
            kv = targets.get("kvsleep", {})
            bare = targets.get(BARE_PROXY, {})
            r = ratio(kv.get("proxy_cpu_us_per_2xx"), bare.get("proxy_cpu_us_per_2xx"))
            answers = min(
                median([run.get("ok2xx") for run in t.get("rounds", [])]) or 0 for t in (kv, bare)
            )
            judged = answers >= MIN_ANSWERS_PER_SLOT * point["concurrency"]
            points.append(
                {
                    "scenario": scenario,
                    "point": key,
                    "kvsleep_cpu_us_per_2xx": kv.get("proxy_cpu_us_per_2xx"),
                    "bare_proxy_cpu_us_per_2xx": bare.get("proxy_cpu_us_per_2xx"),
                    "ratio": rnd(r),
                    "answers_per_run": answers,
                    "judged": judged,
                    "pass": None if r is None or not judged else r <= CPU_RATIO_LIMIT,
                }
            )
    measured = [p for p in points if p["pass"] is not None]
    return {
        "limit": CPU_RATIO_LIMIT,
        "baseline": BARE_PROXY,
        "points": points,
        "worst": max(measured, key=lambda p: p["ratio"]) if measured else None,
        "pass": all(p["pass"] for p in measured) if measured else None,
    }


def acceptance(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it holds (None: not run)."""
    sc = results["scenarios"]
    rows: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, ok: bool | None) -> None:
        rows.append({"check": name, "target": target, "value": value, "pass": ok})

    def kv_point(scenario: str, point: str) -> dict[str, Any]:
        return (
            sc.get(scenario, {})
            .get("points", {})
            .get(point, {})
            .get("targets", {})
            .get("kvsleep", {})
        )

    c16 = kv_point("nonstream", "c16").get("ratio_to_direct")
    add(
        "non-streaming throughput at c=16, kvsleep / direct",
        ">= 0.6",
        c16,
        None if c16 is None else c16 >= 0.6,
    )
    c1 = kv_point("nonstream", "c1").get("added_p50_ms")
    add("added p50 latency at c=1 (ms)", "< 0.5", c1, None if c1 is None else c1 < 0.5)
    for point in ("c64", "c512"):
        r = kv_point("stream", point).get("ratio_to_direct")
        add(
            f"streaming chunks/s at {point}, kvsleep / direct",
            ">= 0.9",
            r,
            None if r is None else r >= 0.9,
        )
    wake = sc.get("wake", {})
    if wake and "skipped" not in wake:
        calls = wake["wake_calls"]
        add("wake calls per 1,000-request burst", "exactly 1", calls, all(c == 1 for c in calls))
        add("errors in wake bursts", "0", wake["errors"], wake["errors"] == 0)
        hold = wake["hold_added_p99_ms"]
        add(
            "wake path: p99 added by the hold (ms; ttfb - wake latency - awake burst p99)",
            "< 5",
            hold,
            None if hold is None else hold < 5,
        )
        single = wake.get("single_hold_added_max_ms")
        add(
            f"wake path: lone request's hold, worst of {wake.get('single_hold_count')} (ms; "
            "ttfb - wake latency - awake ttfb)",
            "< 5",
            single,
            None if single is None else single < 5,
        )
    else:
        for name in ("wake calls per burst", "errors in wake bursts", "wake path p99 added"):
            add(name, "-", None, None)
    cost = results.get("data_path_cost") or data_path_cost(results)
    worst = cost["worst"]
    add(
        "CPU µs per 2xx, kvsleep / bare aiohttp proxy, worst of "
        f"{sum(1 for p in cost['points'] if p['pass'] is not None)} judged points"
        + (f" ({worst['scenario']} {worst['point']})" if worst else ""),
        f"<= {CPU_RATIO_LIMIT:g}",
        worst["ratio"] if worst else None,
        cost["pass"],
    )
    up = sc.get("scale", {}).get("engines_up") or {}
    scrape = up.get("scrape_ms_p50")
    add(
        "/metrics scrape with 1,000 models (ms, p50, engines up)",
        "< 100",
        scrape,
        None if scrape is None else scrape < 100,
    )
    return rows


def _wrk_table(scenario: dict[str, Any], stream: bool) -> list[str]:
    if stream:
        head = (
            "| streams | target | chunks/s | ratio | streams/s | TTFB p50 ms | "
            "TTFB added ms | stream p50 ms | CPU µs/2xx proxy / engine | errors | "
            "SYN drops |"
        )
        sep = "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    else:
        head = (
            "| conc. | target | 2xx/s | ratio | p50 ms | p99 ms | added p50 ms | "
            "added p99 ms | CPU µs/2xx proxy / engine | errors | SYN drops |"
        )
        sep = "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for point in scenario["points"].values():
        for name, t in point["targets"].items():
            if "skipped" in t:
                lines.append(
                    f"| {point['concurrency']} | {name} | skipped: {t['skipped']} | | | | | | | | |"
                )
                continue
            ratio = "1 (baseline)" if name == "direct" else _fmt(t.get("ratio_to_direct"))
            bad = t["non2xx"] + t["socket_errors"] + len(t.get("errors", []))
            cpu = (
                _fmt(t.get("proxy_cpu_us_per_2xx"), 0)
                + " / "
                + _fmt(t.get("engine_cpu_us_per_2xx"), 0)
            )
            if stream:
                cells = [
                    _fmt(t["chunks_per_s"], 0),
                    ratio,
                    _fmt(t["ok_per_s"], 0),
                    _fmt(t["ttfb_p50_ms"]),
                    _fmt(t.get("ttfb_added_ms")),
                    _fmt(t["p50_ms"]),
                    cpu,
                    _fmt(bad),
                    _fmt(t.get("listen_overflows")),
                ]
            else:
                cells = [
                    _fmt(t["ok_per_s"], 0),
                    ratio,
                    _fmt(t["p50_ms"], 3),
                    _fmt(t["p99_ms"], 3),
                    _fmt(t.get("added_p50_ms"), 3),
                    _fmt(t.get("added_p99_ms"), 3),
                    cpu,
                    _fmt(bad),
                    _fmt(t.get("listen_overflows")),
                ]
            lines.append(f"| {point['concurrency']} | {name} | " + " | ".join(cells) + " |")
    return lines


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    sc = results["scenarios"]
    out = [
        "# kvsleep benchmark",
        "",
        f"{meta['started']}, mode `{meta['mode']}`, {meta['cpus']} CPUs, load average "
        f"{meta['loadavg_start']} at start and {meta['loadavg_end']} at end, "
        f"{meta['elapsed_s']:.0f} s. Medians of {meta['rounds']} interleaved rounds of "
        f"{meta['seconds_per_run']:g} s ({meta['stream_seconds_per_run']:g} s streaming) per "
        "target. Only 2xx answers count.",
        "",
        "Targets: "
        + "; ".join(
            f"**{name}** {'(' + t['note'] + ')' if t.get('note') else ''}".strip()
            for name, t in meta["targets"].items()
        ),
        "",
    ]
    if "nonstream" in sc:
        s = sc["nonstream"]
        out += [f"## (a) Non-streaming `{s['endpoint']}`, max_tokens {s['max_tokens']}", ""]
        out += [*_wrk_table(s, stream=False), ""]
    if "stream" in sc:
        s = sc["stream"]
        out += [
            f"## (b) Streaming `{s['endpoint']}`, {s['max_tokens']} tokens per stream, "
            "sim as fast as it can",
            "",
            "chunks/s counts SSE `data:` events received by wrk (`[DONE]` included); TTFB "
            "is sampled by one extra sequential stream while wrk runs.",
            "",
        ]
        out += [*_wrk_table(s, stream=True), ""]
    if "nonstream" in sc or "stream" in sc:
        out += [
            "CPU µs/2xx: CPU time (user + system, /proc) the proxy process and the sim "
            "engine spent per 2xx answer during the run; steadier than throughput on a "
            "shared machine. SYN drops: the kernel's ListenOverflows during the run "
            "(machine-wide); each costs a client a 1 s SYN retransmit.",
            "",
        ]
    cost = results.get("data_path_cost")
    if cost and cost["points"]:
        out += [
            f"## Data path cost: kvsleep against a bare aiohttp proxy (`{cost['baseline']}`)",
            "",
            "`bench/bareproxy.py`: one aiohttp server and one `ClientSession`, same event loop "
            "as kvsleep, forwarding method, path, headers and body and streaming the answer "
            "back; no routing, metrics or guards. The floor any aiohttp-based router could "
            "reach, measured in the same rounds as kvsleep.",
            "",
            "| scenario | point | kvsleep CPU µs/2xx | bare proxy CPU µs/2xx | ratio | "
            f"answers per run | <= {cost['limit']:g} |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for p in cost["points"]:
            if not p.get("judged", True):
                verdict = "not judged (runs too short)"
            else:
                verdict = "-" if p["pass"] is None else ("PASS" if p["pass"] else "FAIL")
            out.append(
                f"| {p['scenario']} | {p['point']} | {_fmt(p['kvsleep_cpu_us_per_2xx'], 1)} | "
                f"{_fmt(p['bare_proxy_cpu_us_per_2xx'], 1)} | {_fmt(p['ratio'], 3)} | "
                f"{_fmt(p.get('answers_per_run'), 0)} | {verdict} |"
            )
        out += [
            "",
            "A point is judged when a run finishes at least "
            f"{MIN_ANSWERS_PER_SLOT} x concurrency answers: the answers a run cuts off at its "
            "end have their CPU charged to the finished ones.",
            "",
        ]
    wake = sc.get("wake")
    if wake and "skipped" not in wake:
        out += [
            f"## (c) Wake path: {wake['requests']:,} requests at once at an asleep model "
            f"(sim wake latency {wake['wake_latency_s']:g} s)",
            "",
            "| round | wake calls | errors | TTFB-wake p50 ms | TTFB-wake p99 ms | "
            "awake burst p99 ms (kvsleep / direct) | hold added p99 ms | send spread ms | "
            "SYN drops (wake / awake kvsleep) | lone request: hold added ms (median) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(wake["rounds"], 1):
            out.append(
                f"| {i} | {r['wake_calls']} | {r['errors']} | {_fmt(r['ttfb_minus_wake_p50_ms'])}"
                f" | {_fmt(r['ttfb_minus_wake_p99_ms'])} | "
                f"{_fmt(r['awake_kvsleep']['ttfb_p99_ms'])} / "
                f"{_fmt(r['awake_direct']['ttfb_p99_ms'])} | {_fmt(r['hold_added_p99_ms'])} | "
                f"{_fmt(r['send_spread_ms'])} | {_fmt(r['syn_drops'])} / "
                f"{_fmt(r['awake_kvsleep']['syn_drops'])} | {_fmt(r['single_hold_added_ms'])} |"
            )
        out += [
            "",
            f"Lone request's hold over {wake['single_hold_count']} sleep/wake cycles: "
            f"median {_fmt(wake['single_hold_added_ms'])} ms, worst "
            f"{_fmt(wake['single_hold_added_max_ms'])} ms. Split by the sim's event log "
            f"(medians): request -> `/wake_up` reaches the engine "
            f"{_fmt(wake['single_reaction_ms'])} ms; `/wake_up` answered -> held request "
            f"reaches the engine {_fmt(wake['single_release_ms'])} ms; engine -> client "
            f"{_fmt(wake['single_relay_ms'])} ms.",
        ]
        out += [
            "",
            "TTFB-wake: each request's time to first byte minus the configured wake "
            "latency. Hold added: that, minus the p99 of the same burst sent to the model "
            "while awake through kvsleep (what serving 1,000 requests at once costs "
            f"anyway). kvsleep's own wake call took {_fmt(wake['wake_call_overhead_ms'])} "
            "ms more than the sim's wake latency (median). Lone request: one request at a time "
            "at the asleep model, its TTFB minus the wake latency minus the median TTFB of "
            "20 lone requests while awake (the hold's own cost, no queueing).",
            "",
        ]
    scale = sc.get("scale")
    if scale and "skipped" not in scale:
        out += [
            "## (d) Scale: 1,000 configured models, check_interval 1 s",
            "",
            "| engines | startup s | scrape p50 ms | scrape max ms | bytes | series | "
            "gzip p50 ms | gzip bytes | reconcile tick ms | RSS MiB | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, v in scale.items():
            if not isinstance(v, dict) or "models" not in v:
                continue
            out.append(
                f"| {key.replace('engines_', '')} | {_fmt(v['startup_to_ready_s'])} | "
                f"{_fmt(v['scrape_ms_p50'])} | {_fmt(v['scrape_ms_max'])} | "
                f"{_fmt(v['scrape_bytes'])} | {_fmt(v['scrape_series'])} | "
                f"{_fmt(v['scrape_gzip_ms_p50'])} | {_fmt(v['scrape_gzip_bytes'])} | "
                f"{_fmt(v['reconcile_tick_mean_ms'])} | {_fmt(v['rss_mib'], 1)} | "
                f"{_fmt(v['peak_rss_mib'], 1)} |"
            )
        out += ["", scale.get("note", ""), ""]
    for key in ("profile", "profile_stream"):
        profile = results.get(key)
        if profile and "skipped" not in profile:
            kind = "streams" if profile.get("stream") else "non-streaming"
            out += [
                f"## Profile: kvsleep, {kind}, concurrency {profile['concurrency']} "
                f"({profile['samples']} samples; py-spy)",
                "",
                "| self % | frame |",
                "|---:|---|",
            ]
            out += [f"| {r['pct']} | `{r['frame']}` |" for r in profile["self"][:15]]
            out.append("")
    out += [
        "## Acceptance targets",
        "",
        "| check | target | measured | pass |",
        "|---|---|---:|---|",
    ]
    for row in results["acceptance"]:
        verdict = "not run" if row["pass"] is None else ("PASS" if row["pass"] else "FAIL")
        digits = 3 if row["check"].startswith("CPU µs per 2xx") else 2
        out.append(
            f"| {row['check']} | {row['target']} | {_fmt(row['value'], digits)} | {verdict} |"
        )
    notes = meta.get("notes") or []
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
