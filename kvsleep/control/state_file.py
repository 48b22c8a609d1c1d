"""The state file that keeps what no engine reveals across restarts.

SGLang has no route that says whether its memory is released, so after a restart kvsleep can only
know it from its own record. The file is small JSON, rewritten atomically (write a temporary file,
fsync, rename) so that a crash mid-write leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvsleep.core.states import ModelState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredModel:
    """One engine's record, under the model name it last served. `incarnation` names the engine
    process it is about; `pending` is the engine call in progress: (op, step, phase), where
    phase `intent` is written before the call and `done` after it."""

    state: ModelState
    since: float
    engine: str
    url: str
    incarnation: str | None = None
    pending: tuple[str, str, str] | None = None

    @property
    def key(self) -> tuple[str, str]:
        """What a record is about: an engine (flavor and address), not a config entry."""
        return (self.engine, self.url.rstrip("/"))

    @property
    def label(self) -> str:
        """The kind of record, for the crash hook: `op:step:phase` for a call in progress
        (`sleep:release:intent`, `wake:resume:done`), `state:STATE` for a settled one."""
        return ":".join(self.pending) if self.pending else f"state:{self.state.value}"


# Fault injection for the crash tests: `KVSLEEP_CRASH_AFTER_WRITE=LABEL` (a `StoredModel.label`)
# makes kvsleep SIGKILL itself right after a write that gives a model a record of that kind it
# did not have before (in the file it loaded or last wrote), so a test can show what a restart
# makes of every kind of record. Unset in production.
CRASH_AFTER_WRITE = os.environ.get("KVSLEEP_CRASH_AFTER_WRITE")


class StateStore:
    """The state file: current engines under `models`, engines of models that left the
    configuration under `retired` (re-added or renamed, they keep what is known of them)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "state.json"
        self._labels: dict[str, str] = {}  # the kind of each model's record on disk

    def load(self) -> dict[str, StoredModel]:
        """The current models' records, by model name."""
        return self.load_all()[0]

    def load_all(self) -> tuple[dict[str, StoredModel], list[tuple[str, StoredModel]]]:
        """Every record: current ones by model name, and retired ones with their last name. A
        missing, unreadable or corrupt file, whatever its content, yields nothing (probes
        decide), with a warning."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            models = {str(name): _record(rec) for name, rec in raw["models"].items()}
            retired = [(str(rec["model"]), _record(rec)) for rec in raw.get("retired", [])]
            self._labels = {name: rec.label for name, rec in models.items()}
            return models, retired
        except FileNotFoundError:
            return {}, []
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.warning(
                "state file %s is unreadable (%s); recovering state from engine probes",
                self.path,
                exc,
            )
            return {}, []

    def save(
        self, models: dict[str, StoredModel], retired: dict[str, StoredModel] | None = None
    ) -> None:
        doc = {
            "version": 2,
            "models": {name: _doc(rec) for name, rec in sorted(models.items())},
            "retired": [
                {"model": name, **_doc(rec)} for name, rec in sorted((retired or {}).items())
            ],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        labels, self._labels = self._labels, {name: rec.label for name, rec in models.items()}
        if CRASH_AFTER_WRITE and any(
            label == CRASH_AFTER_WRITE and labels.get(name) != label
            for name, label in self._labels.items()
        ):
            os.kill(os.getpid(), signal.SIGKILL)


def _record(rec: dict[str, object]) -> StoredModel:
    pending = rec.get("pending")
    return StoredModel(
        ModelState(rec["state"]),
        float(rec["since"]),  # type: ignore[arg-type]
        str(rec["engine"]),
        str(rec["url"]),
        None if rec.get("incarnation") is None else str(rec["incarnation"]),
        None
        if pending is None
        else (str(pending["op"]), str(pending["step"]), str(pending["phase"])),  # type: ignore[index]
    )


def _doc(rec: StoredModel) -> dict[str, object]:
    return {
        "state": rec.state.value,
        "since": rec.since,
        "engine": rec.engine,
        "url": rec.url,
        "incarnation": rec.incarnation,
        "pending": None
        if rec.pending is None
        else dict(zip(("op", "step", "phase"), rec.pending, strict=True)),
    }


def _fsync_dir(directory: Path) -> None:
    """The rename itself must reach the disk before the engine call it announces."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateWriter:
    """Writes snapshots of every engine's state in a thread: the event loop never waits on a
    disk. `schedule` coalesces writes and starts them after a short delay, so that requests a
    wake just released reach their engine before the writer competes with them for the
    interpreter; `write_now` writes at once and says whether the record reached the disk, for a
    record that must exist before an engine call."""

    DELAY_SECONDS = 0.05

    def __init__(
        self,
        store: StateStore | None,
        snapshot: Callable[[], tuple[dict[str, StoredModel], dict[str, StoredModel]]],
        on_error: Callable[[str], None] = lambda error: None,
    ) -> None:
        self.store = store
        self.snapshot = snapshot
        self.on_error = on_error
        self._task: asyncio.Task[str | None] | None = None
        self._lock = asyncio.Lock()
        self._dirty = False

    def schedule(self) -> None:
        if self.store is None:
            return
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write(self.DELAY_SECONDS))

    async def flush(self) -> None:
        await self.write_now()

    async def write_now(self) -> str | None:
        """Write now; the error, or None once the current state is on disk."""
        if self.store is None:
            return None
        self._dirty = True
        return await self._write(0.0)

    async def _write(self, delay: float) -> str | None:
        assert self.store is not None
        await asyncio.sleep(delay)
        error = None
        async with self._lock:
            while self._dirty:
                self._dirty = False
                try:
                    await asyncio.to_thread(self.store.save, *self.snapshot())
                    error = None
                except OSError as exc:
                    error = str(exc)
                    log.error("cannot write state file %s: %s", self.store.path, exc)
                    self.on_error(error)
        return error
