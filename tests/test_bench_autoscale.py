"""`python -m bench --autoscale --quick` end to end, on real processes (kvsleep serve, three
batch-limited sim engines, a closed-loop load that steps from one replica's worth to three).

Checks what must hold whatever the machine's speed: every variant ends with every replica
serving, no error, no engine hazard, no request held; warm takes exactly one wake per extra
replica and sleeps them again after drains; cold and always-on wake nothing. No timing is
asserted (the numbers are the benchmark's output, not its pass mark).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(200)
def test_quick_autoscale_step(tmp_path: Path) -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "--autoscale", "--quick", "--out", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # children die with it (PR_SET_PDEATHSIG)
        pytest.fail(f"python -m bench --autoscale --quick did not finish in 180 s:\n{exc.stdout}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "autoscale.json").read_text())
    report = (tmp_path / "autoscale.md").read_text()
    assert report.startswith("# kvsleep autoscaling benchmark")
    assert "## Warm: where the seconds go" in report and "## Cold: where the seconds go" in report
    assert results["meta"]["mode"] == "quick"
    variants = results["variants"]
    assert list(variants) == ["always-on", "warm", "cold"]

    for name, v in variants.items():
        assert v["second_serves_s"] is not None and v["third_serves_s"] is not None, name
        assert v["errors"] == 0 and set(v["kvsleep_codes"]) == {"200"}, (name, v["kvsleep_codes"])
        assert v["hazards"] == 0 and v["served_while_not_awake"] == 0, name
        assert v["held"] == 0, name
        for phase in ("before", "during", "after"):
            assert v["latency"][phase]["errors"] == 0, (name, phase)
        assert v["latency"]["before"]["requests"] > 0 and v["latency"]["after"]["requests"] > 0
        assert [r["replica"] for r in v["replicas"]] == ["0", "1", "2"]

    warm = variants["warm"]
    assert [r["wake_up_calls"] for r in warm["replicas"]] == [0, 1, 1]
    assert warm["wakes_scale_up"] == 2
    assert warm["scale_events"]["up 1 (target)"] == 1
    assert warm["scale_events"]["up 2 (target)"] == 1
    down = warm["scale_down"]
    assert down["back_to_one_awake_s"] is not None
    assert len(down["sleeps_at_s"]) == 2 and down["aborted"] == 0
    assert down["latency"]["errors"] == 0

    for name in ("always-on", "cold"):
        assert [r["wake_up_calls"] for r in variants[name]["replicas"]] == [0, 0, 0]
        assert variants[name]["scale_down"] is None
    cold = variants["cold"]
    assert cold["pods_started_s"] is not None
    assert all(r["joined_s"] is not None for r in cold["replicas"][1:])
