"""A child service process: started with its own environment and log file, waited for until it
answers, and stopped with SIGTERM, then SIGKILL, so that none is ever left behind."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A service did not start, or stopped unexpectedly."""


def free_port(offsets: Sequence[int] = (0,), taken: set[int] | None = None) -> int:
    """A loopback port ``p`` such that every ``p + offset`` is free (SeaweedFS binds each HTTP
    port + 10000 for gRPC) and none is in ``taken``, to which they are added."""
    taken = taken if taken is not None else set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        wanted = {port + o for o in offsets}
        if max(wanted) < 65536 and not wanted & taken and all(_is_free(p) for p in wanted):
            taken |= wanted
            return port
    raise ServiceError(f"no free loopback port with offsets {list(offsets)}")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the thread that started it ends (start
    services from the main thread), so a killed test run or rehearsal leaves none behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class ServiceProcess:
    """One long-running child in its own process group, logging to ``log_path``."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 user: str | None = None, stop_signal: signal.Signals = signal.SIGTERM):
        self.name = name
        self.stop_signal = stop_signal
        self.log_path = log_path
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        log.info("%s started (pid %d, log %s)", name, self.proc.pid, log_path)

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Poll ``ready`` until it returns True; raise with the log's tail if the process exits
        or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception:  # not answering yet
                pass
            time.sleep(0.25)
        self.stop()
        raise ServiceError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 25.0) -> None:
        """Send the stop signal to the process group, wait up to ``grace_s``, then SIGKILL it."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((self.stop_signal, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                log.info("%s stopped", self.name)
                return
            except subprocess.TimeoutExpired:
                continue
        raise ServiceError(f"{self.name} (pid {self.proc.pid}) survived SIGKILL")


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
