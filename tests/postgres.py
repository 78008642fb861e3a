"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` package, a cluster
in a temp folder, started and stopped here (and stoppable mid-test, to act out an
outage). initdb refuses root, so as root it runs as the `postgres` user."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.launch import _die_with_parent
from tests.utils import free_port


def binaries() -> Path | None:
    """The folder with initdb and postgres, if the server is installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(folders[-1]) if folders else None


class PgServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="tiergate-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._run([self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "tiergate",
                   "--no-sync", "-E", "UTF8"])  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://tiergate@127.0.0.1:{self.port}/postgres"

    def _as_owner(self) -> dict:
        """As the cluster's owner, and dying with this process (no orphan on a kill)."""
        user = self.user

        def demote() -> None:
            if user is not None:
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
            _die_with_parent()  # after setuid, which clears it

        return {"preexec_fn": demote}

    def _run(self, cmd: list) -> None:
        subprocess.run(
            [str(c) for c in cmd], check=True, capture_output=True, timeout=120, **self._as_owner()
        )

    def start(self) -> PgServer:
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **self._as_owner(),
        )  # fmt: skip
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are cut, as in an outage."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
