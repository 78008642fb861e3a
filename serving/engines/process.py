"""Starting and stopping one vLLM OpenAI server process. No policy here.

Each engine runs in its own session (process group), so stopping it also stops
the EngineCore and worker processes vLLM forks. PR_SET_PDEATHSIG makes the
engine receive SIGTERM if tiergate itself dies without a chance to clean up.
Each run gets a folder of its own for vLLM's ZeroMQ sockets (`socket_dir`): vLLM
leaves 3-5 socket files in /tmp per start, and nothing removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def engine_args_to_cli(args: dict[str, Any]) -> list[str]:
    """vLLM engine args (its own names) as command-line flags."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def vllm_command(model_dir: Path, served_name: str, port: int, args: dict[str, Any]) -> list[str]:
    # No engine access log: the gateway polls /health and scrapes /metrics/?name[]=...
    # (which --disable-access-log-for-endpoints does not match) every second or two, and
    # logs each request itself (server.access_log). The engine's warnings and errors stay.
    # `args` can turn it back on (disable_uvicorn_access_log: false).
    args = {"disable_uvicorn_access_log": True, **args}
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *engine_args_to_cli(args),
    ]


def with_kv_events(
    args: dict[str, Any], folder: str
) -> tuple[dict[str, Any], str | None, str | None]:
    """The engine's args with prefix caching and KV events on, and where to subscribe
    and ask for replays. vLLM binds an endpoint with a wildcard or an ipc:// path and
    connects out to any other, so tiergate's own engines publish on ipc sockets in
    `folder` (a private temp folder: local subscribers only, however many workers).
    Args that configure kv_events_config keep it, and a bound tcp://*:PORT is read
    back as loopback; an engine told to connect out cannot be subscribed to."""
    if args.get("runner") == "pooling":
        return args, None, None  # an encoder keeps no KV cache to route by
    config = args.get("kv_events_config")
    if isinstance(config, str):
        config = json.loads(config)
    if isinstance(config, dict):
        if not config.get("enable_kv_cache_events"):
            return args, None, None
        return (
            args,
            _local(config.get("endpoint", "tcp://*:5557")),
            _local(config.get("replay_endpoint")),
        )
    if args.get("enable_prefix_caching") is False:
        return args, None, None  # no cache, nothing to route by
    endpoint, replay = f"ipc://{folder}/events", f"ipc://{folder}/replay"
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "replay_endpoint": replay,
        "topic": "kv",
    }
    return {**args, "enable_prefix_caching": True, "kv_events_config": config}, endpoint, replay


def _local(endpoint: str | None) -> str | None:
    """Where a subscriber on this host reaches an endpoint the engine binds."""
    if not endpoint:
        return None
    if endpoint.startswith("ipc://"):
        return endpoint
    if endpoint.startswith("tcp://*:"):
        return endpoint.replace("*", "127.0.0.1", 1)
    return None  # the engine connects out to it: nothing here to subscribe to


@contextlib.contextmanager
def socket_dir(name: str) -> Iterator[dict[str, str]]:
    """A folder for one engine run's ZeroMQ sockets (vLLM's VLLM_RPC_BASE_PATH), as
    the env to add; removed with what is in it once the run has stopped."""
    path = tempfile.mkdtemp(prefix=f"tiergate-sockets-{name[:12]}-")  # socket paths: <= 107 bytes
    try:
        yield {"VLLM_RPC_BASE_PATH": path}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def bound_cpus(env: dict[str, str]) -> set[int] | None:
    """The cores in VLLM_CPU_OMP_THREADS_BIND ('1', '0-3', '0,2-3'), or None (auto, all,
    nobind, several NUMA lists, or unset)."""
    spec = env.get("VLLM_CPU_OMP_THREADS_BIND", "")
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus or None


async def spawn(cmd: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    cpus = bound_cpus(env)

    def prepare() -> None:
        _die_with_parent()
        # Start the whole engine on its own cores. Its worker is spawned later and
        # inherits this; left to inherit every core, a worker restarted under load was
        # seen born on another engine's core and starved there (benchmarks/RESULTS.md).
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)

    return await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
        preexec_fn=prepare,
    )


async def pump_log(
    proc: asyncio.subprocess.Process, prefix: str, write: Callable[[str], None]
) -> None:
    """Copy the engine's output line by line, each line prefixed."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        write(f"{prefix} {line.decode(errors='replace').rstrip()}\n")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the engine's process group, SIGKILL it after `grace` seconds."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    # The leader is gone; sweep anything it left in its group (vLLM's engine core and
    # workers), and wait until they are gone too: a worker still tearing down when the
    # gateway exits would outlive it.
    _signal_group(proc.pid, signal.SIGKILL)
    for _ in range(100):  # 5 s at most: SIGKILL is not refused, only slow on big heaps
        if not group_members(proc.pid):
            return
        await asyncio.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members
