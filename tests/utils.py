"""Running `tiergate serve` as a real process in tests, and making sure it is gone after."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, **changes: Any) -> Path:
    """configs/default.yaml with top-level keys replaced; returns the new file."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def default_engine(**changes: Any) -> dict[str, Any]:
    engine = yaml.safe_load(DEFAULT_CONFIG.read_text())["engines"][0]
    engine.update(changes)
    return engine


class GatewayProcess:
    """`python -m serving.cli serve` in its own process group, logging to a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None):
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()  # every descendant pid we ever saw

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
        self.seen.update(k.pid for k in kids)
        return kids

    def get(self, path: str, timeout: float = 10) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def engines(self) -> list[dict[str, Any]]:
        return self.get("/tiergate/engines").json()["engines"]

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"tiergate exited ({self.proc.returncode}) waiting for "
                    f"{what}:\n{self.log_tail()}"
                )
            self.descendants()
            with contextlib.suppress(httpx.HTTPError):
                if predicate():
                    return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 420) -> GatewayProcess:
        self.wait_for(lambda: self.get("/ready").status_code == 200, timeout, "/ready")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal tiergate, wait for it, and kill anything left (returns its exit code)."""
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
        alive = []
        for pid in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
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
        self.kill_survivors()  # a test failure must not leave engines behind
