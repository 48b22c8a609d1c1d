"""The keeper: a small process between kvsleep and each engine it launches.

Why it exists: an engine is rarely one process (vLLM's API server has EngineCore and worker
children, SGLang its schedulers, and an operator's command may be a shell wrapper whose engine is a
grandchild). PR_SET_PDEATHSIG reaches only a direct child, and once kvsleep is SIGKILLed nothing of
kvsleep runs to clean up. The keeper is alive for exactly that moment: it leads the engine's session
and process group, is the subreaper of everything the engine starts, and ends the whole group
(SIGTERM, then SIGKILL after the grace period) when

- kvsleep asks it to (`stop` on the control socket, or SIGTERM),
- kvsleep dies, however (the control socket reads EOF; PR_SET_PDEATHSIG as a second line), or
- the engine's main process exits (its children must not outlive it: a restart never starts
  beside survivors).

It also copies the engine's output into the model's log file, rotating it when it grows past a
size cap. When the engine exits it writes `exited CODE` on the control socket at once (so kvsleep
holds new requests while the group is still being cleaned up), and finally exits with the
engine's own status (the same signal, or the same code).

Usage:
`python -m kvsleep.control.keeper --log FILE [--max-bytes N] [--backups K] [--grace S] -- ARGV`;
fd 0 is the control socket. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36
KILL_WAIT_SECONDS = 5.0  # after SIGKILL, how long to wait for the kernel to reap the group
POLL_SECONDS = 0.05

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def prctl(option: int, value: int) -> None:
    if _LIBC is not None:
        _LIBC.prctl(option, value, 0, 0, 0)


def proc_stat(pid: int) -> tuple[int, int, int, int, str] | None:
    """(ppid, pgrp, session, start time in clock ticks since boot, state) of a process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields resume after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0].decode()


def members(group: int, root: int | None = None) -> list[int]:
    """Live processes of a process group or session, plus (with `root`) every descendant of
    `root`: a child that called setsid() has left the group but not its parentage."""
    found: dict[int, int] = {}
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = proc_stat(pid)
        if stat is None or stat[4] == "Z":
            continue
        ppid, pgrp, session, _, _ = stat
        parents[pid] = ppid
        if pgrp == group or session == group:
            found[pid] = 1
    if root is not None:
        for pid in parents:
            seen = set()
            parent = parents.get(pid)
            while parent is not None and parent not in seen and parent > 1:
                if parent == root:
                    found[pid] = 1
                    break
                seen.add(parent)
                parent = parents.get(parent)
    return sorted(found)


class RotatingLog:
    """Appends bytes to FILE; past `max_bytes` it becomes FILE.1 (FILE.1 becomes FILE.2, ...)
    and a fresh FILE is started. The size is read from the file itself, because kvsleep appends
    its own notes (sleep, wake) to the same file."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.fd = self._open()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes) -> None:
        while data:
            size = os.fstat(self.fd).st_size
            if self.max_bytes and size >= self.max_bytes:
                self.rotate()
                size = 0
            room = self.max_bytes - size if self.max_bytes else len(data)
            chunk, data = data[:room], data[room:]
            with contextlib.suppress(OSError):
                os.write(self.fd, chunk)

    def rotate(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(OSError):
            if self.backups < 1:
                self.path.unlink()
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.backups >= 1:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.fd = self._open()

    def note(self, text: str) -> None:
        self.write(f"==== kvsleep keeper: {text}\n".encode())


class Keeper:
    def __init__(self, argv: list[str], log: RotatingLog, grace: float) -> None:
        self.argv = argv
        self.log = log
        self.grace = grace
        self.group = os.getpgrp()
        self.stopping = False
        self.engine: subprocess.Popen[bytes] | None = None
        self.status: int | None = None  # the engine's waitpid status
        self.control = 0

    def run(self) -> int:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.engine = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                preexec_fn=_engine_preexec,
            )
        except OSError as exc:
            self.log.note(f"cannot start {self.argv[0]!r}: {exc}")
            self._tell("exited 127")
            return 127
        finally:
            os.close(out_w)
        self.log.note(f"engine pid {self.engine.pid}, process group {self.group}")
        sel = selectors.DefaultSelector()
        sel.register(out_r, selectors.EVENT_READ, "out")
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        while not self.stopping and self.status is None:
            for key, _ in sel.select(1.0):
                if key.data == "out":
                    if not self._copy(out_r):
                        sel.unregister(out_r)
                elif key.data == "control":
                    self._command(sel)
                else:
                    with contextlib.suppress(OSError):
                        os.read(wake_r, 512)
            self._reap()
        own_exit = self.status is not None and not self.stopping
        if self.status is not None:
            self._tell(f"exited {os.waitstatus_to_exitcode(self.status)}")
        self._end_group(out_r, sel)
        return self._exit_status() if own_exit else 0

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _copy(self, fd: int) -> bool:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return False
        if data:
            self.log.write(data)
        return bool(data)

    def _command(self, sel: selectors.BaseSelector) -> None:
        try:
            data = os.read(self.control, 512)
        except OSError:
            data = b""
        if not data:  # kvsleep is gone
            self.log.note("kvsleep went away; stopping the engine")
            sel.unregister(self.control)
            self.control = -1
        self.stopping = True

    def _tell(self, line: str) -> None:
        if self.control >= 0:
            with contextlib.suppress(OSError):
                os.write(self.control, line.encode() + b"\n")

    def _reap(self) -> None:
        """Reap every child, adopted orphans included; note the engine's own status."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.engine is not None and pid == self.engine.pid:
                self.status = status
                self.engine.returncode = os.waitstatus_to_exitcode(status)

    def _others(self) -> list[int]:
        me = os.getpid()
        return [pid for pid in members(self.group, root=me) if pid != me]

    def _end_group(self, out_r: int, sel: selectors.BaseSelector) -> None:
        """SIGTERM to every process of the engine's group and descendants, SIGKILL after the
        grace period; returns once none is left (or the kernel did not reap them in time)."""
        left = self._others()
        if left:
            self.log.note(f"stopping {len(left)} engine process(es): SIGTERM")
            self._signal(left, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        killed = False
        give_up = deadline + KILL_WAIT_SECONDS
        while left:
            for key, _ in sel.select(POLL_SECONDS):
                if key.data == "out" and not self._copy(out_r):
                    sel.unregister(out_r)
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        os.read(key.fd, 512)
            self._reap()
            left = self._others()
            now = time.monotonic()
            if left and not killed and now >= deadline:
                self.log.note(
                    f"{len(left)} process(es) still running after {self.grace:g}s: SIGKILL {left}"
                )
                self._signal(left, signal.SIGKILL)
                killed = True
            if now >= give_up:
                self.log.note(f"processes {left} did not go away")
                break
        with contextlib.suppress(OSError):
            while self._copy(out_r):
                pass

    @staticmethod
    def _signal(pids: list[int], sig: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _exit_status(self) -> int:
        if self.status is None:
            return 0
        if os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
            # Die of the same signal, so kvsleep sees what killed the engine.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.set_wakeup_fd(-1)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
            time.sleep(1)
            return 128 + sig
        return os.WEXITSTATUS(self.status)


def _engine_preexec() -> None:
    """In the engine, before exec: die if the keeper itself is killed (even by SIGKILL)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvsleep.control.keeper")
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-bytes", type=int, default=0)
    parser.add_argument("--backups", type=int, default=1)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no engine command given")
    log = RotatingLog(Path(args.log), args.max_bytes, args.backups)
    try:
        return Keeper(command, log, args.grace).run()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 127
        raise


if __name__ == "__main__":
    sys.exit(main())
