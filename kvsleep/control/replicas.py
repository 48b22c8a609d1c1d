"""A model as clients see it: one name, one or more engines (replicas), each its own slot.

Each replica keeps its own state machine (core/machine.py): sleeping and waking, drains,
records and hazards stay per engine. What is per model lives here: which replica a request
goes to (the pure `pick_replica`), and what the scaler remembers between passes. A model with
one engine is a group of one, and its requests take the same path as before replicas existed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvsleep.core.scaling import (
    ReplicaView,
    ScaleDecision,
    ScaleMemory,
    ScalingPolicy,
    model_state,
    pick_replica,
)
from kvsleep.core.states import ModelState

if TYPE_CHECKING:  # the manager builds groups of its slots
    from kvsleep.control.manager import ModelSlot as Slot

# A request that finds no replica awake joins a wake in flight, else wakes one that is asleep.
_JOIN = (ModelState.WAKING, ModelState.STARTING)


@dataclass(eq=False)
class ModelGroup:
    """The replicas (slots, in config order) of one served model."""

    name: str
    slots: tuple[Slot, ...]
    scaling: ScalingPolicy | None = None
    affinity: str | None = None
    memory: ScaleMemory = field(default_factory=ScaleMemory)
    decision: ScaleDecision | None = None  # the scaler's last verdict, for metrics
    # (request-seconds in flight, time) at the scaler's last pass: the mean since then is
    # the in-flight demand it weighs.
    meter: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.set_slots(self.slots, self.scaling, self.affinity)

    def set_slots(
        self, slots: tuple[Slot, ...], scaling: ScalingPolicy | None, affinity: str | None
    ) -> None:
        """A reload changed the model's replicas or policy; the scaler's memory stays."""
        self.slots = slots
        self.scaling = scaling
        self.affinity = affinity
        # The data path's fast case: a model with one engine routes to it, nothing to choose.
        self.only = slots[0] if len(slots) == 1 else None
        self._bound = (
            math.ceil(scaling.target_in_flight)
            if scaling is not None and scaling.target_in_flight
            else None
        )

    def mean_in_flight(self, area: float, now: float) -> float | None:
        """Requests in flight on average since the last call (None at the first, or when no
        time has passed: the caller then weighs what is in flight now)."""
        last, self.meter = self.meter, (area, now)
        if last is None or now <= last[1]:
            return None
        return (area - last[0]) / (now - last[1])

    @property
    def state(self) -> ModelState:
        """What the model shows as one (operators' states): awake when any replica is."""
        return model_state([slot.machine.reported_state() for slot in self.slots])

    def views(
        self, fits: Callable[[Slot], bool] | None = None, *, eta: bool = True
    ) -> list[ReplicaView]:
        """Each replica as the router and the scaler weigh it. Its state is the one operators
        see: an engine that does not answer is `down`, neither a destination nor capacity.
        The router needs no wake ETA (`eta=False`, once per request)."""
        return [
            ReplicaView(
                replica=slot.cfg.replica,
                state=slot.machine.reported_state(),
                in_flight=slot.in_engine,
                held=len(slot.waiters),
                wake_eta=slot.machine.wake_eta() if eta else None,
                fits=True if fits is None else fits(slot),
            )
            for slot in self.slots
        ]

    def replica(self, label: str) -> Slot:
        return next(s for s in self.slots if s.cfg.replica == label)

    def route(self, affinity_key: str | None) -> Slot:
        """The replica a request goes to: an awake one (pick_replica), else the one whose wake
        it joins or starts. Never one that is not awake while another is."""
        if self.only is not None:
            return self.only
        views = self.views(eta=False)
        chosen = pick_replica(views, affinity_key, random.random(), bound=self._bound)
        if chosen is not None:
            return self.replica(chosen)
        states = [view.state for view in views]
        for wanted in (_JOIN, (ModelState.ASLEEP,)):
            for slot, state in zip(self.slots, states, strict=True):
                if state in wanted:
                    return slot
        return self.slots[0]
