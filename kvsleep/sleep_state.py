"""Model sleep states, and the state file that keeps what no engine reveals across restarts.

SGLang has no route that says whether its memory is released, so after a restart kvsleep can only
know it from its own record. The file is small JSON, rewritten atomically (write a temporary file,
fsync, rename) so that a crash mid-write leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    """awake -> draining -> sleeping -> asleep -> waking -> awake; failed after a failed wake."""

    AWAKE = "awake"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    ASLEEP = "asleep"
    WAKING = "waking"
    FAILED = "failed"


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
                name: StoredModel(ModelState(rec["state"]), float(rec["since"]),
                                  str(rec["engine"]), str(rec["url"]))
                for name, rec in raw["models"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("state file %s is unreadable (%s); recovering state from engine probes",
                        self.path, exc)
            return {}

    def save(self, models: dict[str, StoredModel]) -> None:
        doc = {
            "version": 1,
            "models": {
                name: {"state": rec.state.value, "since": rec.since, "engine": rec.engine,
                       "url": rec.url}
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
