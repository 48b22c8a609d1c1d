"""kvsleep benchmarks: `python -m bench` (see bench/README.md).

Everything runs as separate processes on 127.0.0.1: simulated engines, kvsleep, the peers
(vllm-router, litellm) when installed, and `wrk` as the load generator.
"""
