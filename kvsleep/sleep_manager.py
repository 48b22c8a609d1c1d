"""The kvcached controller's `controller.sleep_manager`, as kvsleep keeps it: `SleepConfig` and
`SleepManager` (docs/kvcached.md). The manager itself lives in kvsleep/control/manager.py."""

from kvsleep.control.manager import SleepConfig, SleepManager

__all__ = ["SleepConfig", "SleepManager"]
