"""Real GPU memory through a sleep/wake cycle: NVML shows that sleep frees and wake restores it.

Needs a CUDA GPU, torch and nvidia-ml-py. Two simulated engines (vLLM and SGLang flavor) hold
real allocations (`kvsleep sim-engine --cuda-device`) that follow their residency; kvsleep runs
in front of them with a GPU budget that fits one at a time, so the last wake also shows an
eviction. Every step prints NVML's used memory.

    python -m bench.gpu_memory [--device 0] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

GB = 1024**3
MODELS = {  # name: (flavor, weights GB, KV cache GB)
    "gpu/vllm": ("vllm", 6, 10),
    "gpu/sglang": ("sglang", 4, 8),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method: str, url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(args.device)

    def used_gb() -> float:
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / GB

    work = Path(tempfile.mkdtemp(prefix="kvsleep-gpu-"))
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict] = []
    try:
        baseline = used_gb()
        entries = []
        for name, (flavor, weights, kv) in MODELS.items():
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "kvsleep",
                        "sim-engine",
                        "--flavor",
                        flavor,
                        "--model",
                        name,
                        "--port",
                        str(port),
                        "--cuda-device",
                        str(args.device),
                        "--weights-gb",
                        str(weights),
                        "--kv-cache-gb",
                        str(kv),
                        "--wake-latency",
                        "0.2",
                        "--tokens-per-second",
                        "0",
                    ],
                    stdout=(work / f"{flavor}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
            wait_ready(f"http://127.0.0.1:{port}/v1/models")
            entries.append(
                {
                    "name": name,
                    "engine": flavor,
                    "url": f"http://127.0.0.1:{port}",
                    "memory_gb": weights + kv,
                    "gpus": [args.device],
                }
            )
        kv_port = free_port()
        config = {
            "router": {"host": "127.0.0.1", "port": kv_port},
            "sleep_manager": {"check_interval_seconds": 3600, "min_sleep_duration": 0},
            # Room for one of the two: waking the second must evict the first.
            "gpus": [{"id": args.device, "memory_gb": 20}],
            "models": entries,
            "state_dir": str(work / "state"),
            "log_dir": str(work / "logs"),
        }
        (work / "kvsleep.yaml").write_text(yaml.safe_dump(config))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kvsleep", "serve", "--config", str(work / "kvsleep.yaml")],
                stdout=subprocess.DEVNULL,
                stderr=(work / "kvsleep.log").open("wb"),
            )
        )
        base = f"http://127.0.0.1:{kv_port}"
        wait_ready(base + "/-/ready")

        def step(what: str) -> None:
            status = call("GET", base + "/sleep/status")
            rows.append(
                {
                    "step": what,
                    "nvml_used_gb": round(used_gb() - baseline, 2),
                    "states": {m: s["state"] for m, s in status["models"].items()},
                    "committed_gb": status["gpus"][str(args.device)]["committed_gb"],
                }
            )
            print(
                f"{what:<46} NVML used +{rows[-1]['nvml_used_gb']:6.2f} GB  {rows[-1]['states']}",
                flush=True,
            )

        def request(model: str) -> None:
            call(
                "POST",
                base + "/v1/completions",
                {"model": model, "prompt": "hello", "max_tokens": 4},
            )

        step("both engines started (awake)")
        for model in MODELS:
            call("POST", base + f"/models/{model.replace('/', '%2F')}/sleep")
            step(f"{model} put to sleep")
        request("gpu/vllm")
        step("request for gpu/vllm (woken)")
        request("gpu/sglang")
        step("request for gpu/sglang (evicts gpu/vllm)")
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        evictions = [
            line for line in metrics.splitlines() if line.startswith("kvsleep_evictions_total")
        ]
        hazards = {
            name: call("GET", e["url"] + "/sim/stats")["hazards"]
            for name, e in zip(MODELS, entries, strict=True)
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {
        "device": pynvml.nvmlDeviceGetName(handle),
        "steps": rows,
        "evictions": evictions,
        "hazards": hazards,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"evictions": evictions, "hazards": hazards}, indent=2))
    return 0 if not any(hazards.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
