"""`python -m bench --quick` end to end: every scenario and target key is in the results.

Checks structure, never speed: CI machines are small and shared. Peers (vllm-router, litellm)
are left out with --no-peers so the result does not depend on what happens to be installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed (apt-get install wrk; scripts/test installs it as root)",
)

TARGETS = {"direct", "kvsleep", "aiohttp-proxy", "vllm-router", "litellm"}


@pytest.mark.timeout(170)
def test_quick_benchmark_writes_every_scenario(tmp_path: Path) -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--no-peers", "--out", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # children die with it (PR_SET_PDEATHSIG)
        pytest.fail(f"python -m bench --quick did not finish in 150 s:\n{exc.stdout}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.md").read_text().startswith("# kvsleep benchmark")
    assert results["meta"]["mode"] == "quick"
    assert set(results["meta"]["targets"]) == TARGETS
    scenarios = results["scenarios"]
    assert set(scenarios) == {"nonstream", "stream", "wake", "scale"}

    for name, levels, metric in (
        ("nonstream", {"c1", "c16", "c256"}, "ok_per_s"),
        ("stream", {"c64", "c512"}, "chunks_per_s"),
    ):
        points = scenarios[name]["points"]
        assert set(points) == levels
        for point in points.values():
            targets = point["targets"]
            assert set(targets) == TARGETS
            for peer in ("vllm-router", "litellm"):
                assert "skipped" in targets[peer]
            for measured in ("direct", "kvsleep", "aiohttp-proxy"):
                t = targets[measured]
                assert metric in t and "p50_ms" in t and "p99_ms" in t and "rounds" in t
                assert len(t["rounds"]) == results["meta"]["rounds"]
            assert "ratio_to_direct" in targets["kvsleep"]
            assert targets["kvsleep"]["proxy_cpu_us_per_2xx"] > 0
            assert targets["aiohttp-proxy"]["proxy_cpu_us_per_2xx"] > 0
            assert "cpu_ratio_to_bare_proxy" in targets["kvsleep"]
            key = "ttfb_added_ms" if name == "stream" else "added_p50_ms"
            assert key in targets["kvsleep"]

    wake = scenarios["wake"]
    for key in (
        "wake_calls",
        "errors",
        "ttfb_minus_wake_p50_ms",
        "ttfb_minus_wake_p99_ms",
        "hold_added_p99_ms",
        "single_hold_added_ms",
        "rounds",
    ):
        assert key in wake
    # Correctness, not speed: one wake per burst, nothing lost, nothing sent to a sleeping engine.
    assert wake["wake_calls"] == [1] * len(wake["rounds"])
    assert wake["errors"] == 0
    assert wake["served_while_not_awake"] == 0

    up = scenarios["scale"]["engines_up"]
    for key in ("models", "scrape_ms_p50", "scrape_bytes", "reconcile_tick_mean_ms", "rss_mib"):
        assert key in up
    assert up["models"] == 1000
    assert up["engines_up_seen"] == 1000

    # The data path's cost against the bare aiohttp proxy, at every wrk point (the verdict is
    # speed, so not asserted: only that it was measured and judged where runs are long enough).
    cost = results["data_path_cost"]
    assert cost["limit"] == 1.15
    assert [(p["scenario"], p["point"]) for p in cost["points"]] == [
        ("nonstream", "c1"),
        ("nonstream", "c16"),
        ("nonstream", "c256"),
        ("stream", "c64"),
        ("stream", "c512"),
    ]
    assert all(p["ratio"] > 0 for p in cost["points"])
    assert cost["worst"] is not None and cost["pass"] in (True, False)
    assert any(row["check"].startswith("CPU µs per 2xx") for row in results["acceptance"])
    assert "## Data path cost" in (tmp_path / "latest.md").read_text()

    assert {row["check"] for row in results["acceptance"]}
