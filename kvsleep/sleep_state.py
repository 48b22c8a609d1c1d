"""Model sleep states, and the state file that keeps what no engine reveals across restarts.

SGLang has no route that says whether its memory is released, so after a restart kvsleep can only
know it from its own record. The file is small JSON, rewritten atomically (write a temporary file,
fsync, rename) so that a crash mid-write leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    """awake -> draining -> sleeping -> asleep -> waking -> awake; failed after a failed wake.

    starting: a launched engine is being started or restarted (requests are held as for a wake).
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


@dataclass(frozen=True)
class StoredModel:
    state: ModelState
    since: float
    engine: str
    url: str


class StateStore:
    """The state file. `save` is called on every settled transition, so it must stay cheap."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "state.json"

    def load(self) -> dict[str, StoredModel]:
        """Read the file; a missing, unreadable or corrupt file yields nothing (probes decide)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return {
                name: StoredModel(
                    ModelState(rec["state"]),
                    float(rec["since"]),
                    str(rec["engine"]),
                    str(rec["url"]),
                )
                for name, rec in raw["models"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.warning(
                "state file %s is unreadable (%s); recovering state from engine probes",
                self.path,
                exc,
            )
            return {}

    def save(self, models: dict[str, StoredModel]) -> None:
        doc = {
            "version": 1,
            "models": {
                name: {
                    "state": rec.state.value,
                    "since": rec.since,
                    "engine": rec.engine,
                    "url": rec.url,
                }
                for name, rec in sorted(models.items())
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class StateWriter:
    """Writes snapshots of every model's state in a thread: the event loop never waits on a
    disk. `schedule` coalesces writes and starts them after a short delay, so that requests a
    wake just released reach their engine before the writer competes with them for the
    interpreter; `flush` writes now, for a record that must exist before an engine call."""

    DELAY_SECONDS = 0.05

    def __init__(
        self, store: StateStore | None, snapshot: Callable[[], dict[str, StoredModel]]
    ) -> None:
        self.store = store
        self.snapshot = snapshot
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._dirty = False

    def schedule(self) -> None:
        if self.store is None:
            return
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write(self.DELAY_SECONDS))

    async def flush(self) -> None:
        if self.store is None:
            return
        self._dirty = True
        await self._write(0.0)

    async def _write(self, delay: float) -> None:
        assert self.store is not None
        await asyncio.sleep(delay)
        async with self._lock:
            while self._dirty:
                self._dirty = False
                try:
                    await asyncio.to_thread(self.store.save, self.snapshot())
                except OSError as exc:
                    log.error("cannot write state file %s: %s", self.store.path, exc)
