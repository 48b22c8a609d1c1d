"""The states a model's engine can be in, as kvsleep believes them."""

from __future__ import annotations

import enum


class ModelState(str, enum.Enum):
    """awake -> draining -> sleeping -> asleep -> waking -> awake; failed after a failed wake.

    starting: a launched engine is being started or restarted (requests are held as for a wake).
    unknown: kvsleep cannot tell whether the engine's memory is released (a call that may or
    may not have happened); nothing is called until an operator, or a probe that can tell, says.
    down: only ever reported, never held: the engine of a settled model does not answer.
    """

    AWAKE = "awake"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    ASLEEP = "asleep"
    WAKING = "waking"
    FAILED = "failed"
    STARTING = "starting"
    DOWN = "down"
    UNKNOWN = "unknown"
