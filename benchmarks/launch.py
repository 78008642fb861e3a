"""Start `tiergate serve` as a child process, wait for /ready, and stop it with no orphans.

Used by the benchmarks (and the tests) so that every run starts from the same
command a user types. Talks to the server over HTTP only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """SIGTERM tiergate (which then stops its engines) if our process dies first."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `with GatewayProcess(...)` blocks still clean up;
    SIGINT raises KeyboardInterrupt even where a shell started the study in the
    background (which ignores SIGINT), so `kill -INT` cleans up as Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.default_int_handler)


class GatewayProcess:
    """`python -m serving.cli serve` in its own process group, logging to a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None):
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        # every descendant we ever saw: pid -> start time (pids are reused, start times not)
        self.seen: dict[int, float] = {}

    def start(self) -> GatewayProcess:
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.cli",
                "serve",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        return self

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for kid in kids:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.setdefault(kid.pid, kid.create_time())
        return kids

    def get(self, path: str, timeout: float = 10) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def engines(self) -> list[dict[str, Any]]:
        return self.get("/tiergate/engines").json()["engines"]

    def engine(self, name: str) -> dict[str, Any]:
        """One engine's row of /tiergate/engines, by its name."""
        return next(e for e in self.engines() if e["name"] == name)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tiergate exited ({self.proc.returncode}) waiting for "
                    f"{what}:\n{self.log_tail()}"
                )
            self.descendants()
            with contextlib.suppress(httpx.HTTPError):
                if predicate():
                    return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 420) -> GatewayProcess:
        self.wait_for(lambda: self.get("/ready").status_code == 200, timeout, "/ready")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal tiergate, wait for it, and kill its group if it hangs (returns exit code)."""
        if self.proc is None:
            return None
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def survivors(self) -> list[int]:
        """Descendants still running: the same pid *and* start time (not a reused pid)."""
        alive = []
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def kill_survivors(self) -> None:
        for pid in self.survivors():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill_survivors()  # an error must not leave engines behind
