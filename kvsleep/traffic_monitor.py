"""The kvcached controller's `controller.traffic_monitor`, as kvsleep keeps it (docs/kvcached.md).
The monitor itself lives in kvsleep/control/traffic.py."""

from kvsleep.control.traffic import ModelActivityStats, RequestStats, TrafficMonitor

__all__ = ["ModelActivityStats", "RequestStats", "TrafficMonitor"]
