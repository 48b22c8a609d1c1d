"""Sample kvsleep with py-spy while wrk loads it, and rank the frames (`--profile`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.procs import die_with_parent
from bench.scenarios import ENDPOINT, Plan, chat_body, say
from bench.targets import Target
from bench.wrk import Load, run_wrk

# The interpreter's and the event loop's own frames: in every stack, so they say nothing.
WRAPPERS = re.compile(
    r"<frozen runpy>|asyncio/runners\.py|kvsleep/(cli|__main__)\.py|"
    r"run_forever|run_until_complete|_run_once|Handle\._run"
)
# Leaf frames of threads that wait for work (thread-pool workers parked on their queue): py-spy
# does not always see those as idle, and they are not kvsleep spending CPU.
IDLE_LEAVES = re.compile(r"^_worker \(concurrent/futures/thread\.py")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy_path() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if os.access(local, os.X_OK) else shutil.which("py-spy")


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return file


def _frame(raw: str) -> tuple[str, str]:
    """('func (file:line)', 'file') from py-spy's raw frame text."""
    match = FRAME.match(raw)
    if not match:
        return raw, raw
    file = _short(match["file"])
    line = f":{match['line']}" if match["line"] else ""
    return f"{match['func']} ({file}{line})", file


def summarize(collapsed: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per frame, and self share per file."""
    self_frames: Counter[str] = Counter()
    incl_frames: Counter[str] = Counter()
    self_files: Counter[str] = Counter()
    incl_funcs: Counter[str] = Counter()
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if not f[0].startswith("process ")]
        if not frames:
            continue
        leaf, leaf_file = frames[-1]
        if IDLE_LEAVES.search(leaf):
            idle += count
            total -= count
            continue
        self_frames[leaf] += count
        self_files[leaf_file] += count
        for name in {f[0] for f in frames}:
            incl_frames[name] += count
        for name in {re.sub(r":\d+\)$", ")", f[0]) for f in frames}:
            if not WRAPPERS.search(name):
                incl_funcs[name] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return (
            [{"frame": k, "pct": round(100 * v / total, 1)} for k, v in counter.most_common(top)]
            if total
            else []
        )

    return {
        "samples": total,
        "idle_thread_samples_left_out": idle,
        "self": share(self_frames),
        "self_by_file": share(self_files),
        "inclusive_by_function": share(incl_funcs),
    }


def render(summary: dict[str, Any], title: str) -> str:
    lines = [
        title,
        f"samples: {summary['samples']} (left out: "
        f"{summary['idle_thread_samples_left_out']} of idle thread-pool workers)",
        "",
    ]
    for key, label in (
        ("self", "self time (leaf frame)"),
        ("self_by_file", "self time by file"),
        (
            "inclusive_by_function",
            "inclusive time by function (any line; event-loop frames left out)",
        ),
    ):
        lines.append(f"== {label}")
        lines += [f"{row['pct']:5.1f}%  {row['frame']}" for row in summary[key]]
        lines.append("")
    return "\n".join(lines)


async def profile_kvsleep(
    kv: Target, model: str, plan: Plan, out_dir: Path, concurrency: int = 16, stream: bool = False
) -> dict[str, Any]:
    """py-spy (250 Hz) on kvsleep while wrk sends load (non-streaming, or 64-chunk streams).

    Blocking sampling (py-spy's default) pauses kvsleep for each sample, which slows it a
    little, but --nonblocking tore about 40% of the stacks in a trial run.
    """
    spy = py_spy_path()
    if spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    assert kv.child is not None
    name = f"profile-{'stream-' if stream else ''}c{concurrency}"
    raw = out_dir / f"{name}.collapsed"
    seconds = plan.profile_seconds
    proc = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(kv.child.pid),
        "--duration",
        f"{seconds:g}",
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(raw),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    try:
        await asyncio.sleep(0.5)  # let py-spy attach before the load starts
        tokens = plan.stream_max_tokens if stream else plan.nonstream_max_tokens
        load = await run_wrk(
            Load(
                kv.url + ENDPOINT,
                chat_body(model, tokens, stream),
                concurrency,
                seconds,
                sse=stream,
                timeout_s=30,
            )
        )
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0 or not raw.exists():
        return {
            "skipped": f"py-spy failed (exit {proc.returncode}): "
            f"{out.decode(errors='replace')[-400:]}"
        }
    summary = summarize(raw.read_text())
    rate = f"{load['events_per_s']:.0f} chunks/s" if stream else f"{load['ok_per_s']:.0f} 2xx/s"
    text = render(
        summary,
        f"kvsleep under wrk, {'streaming' if stream else 'non-streaming'}, "
        f"concurrency {concurrency}, {seconds:g}s ({rate} while sampled)",
    )
    (out_dir / f"{name}.txt").write_text(text)
    say(f"profile written to {out_dir / f'{name}.txt'}")
    return {
        "concurrency": concurrency,
        "stream": stream,
        "seconds": seconds,
        "ok_per_s_while_sampled": round(load["ok_per_s"], 1),
        "chunks_per_s_while_sampled": round(load["events_per_s"], 1),
        **summary,
    }
