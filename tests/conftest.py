from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from openai import OpenAI

from tests.utils import DEFAULT_CONFIG, GatewayProcess, free_port


def pytest_report_header() -> str:
    from serving.engines.cpu import cpu_flags, engine_choice
    from tests.utils import default_engine

    flags = cpu_flags()
    shown = sorted(
        flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}
    )
    engine = default_engine()
    choice = engine_choice(engine["model"], engine["args"], True, flags)
    return (
        f"tiergate: CPU flags {' '.join(shown) or 'none'} -> the default engine serves "
        f"{choice.model} in {choice.dtype} ({choice.why})"
    )


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no TIERGATE_* overrides from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("TIERGATE_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    """The shipped default config, served for real: vLLM on the CPU behind the gateway."""
    log = tmp_path_factory.mktemp("gateway") / "serve.log"
    with GatewayProcess(DEFAULT_CONFIG, log) as gw:
        gw.wait_ready()
        gw.wait_for(lambda: all(e["ready"] for e in gw.engines()), 300, "every engine")
        yield gw
        assert gw.stop(signal.SIGINT) in (0, 130), gw.log_tail()  # a terminal's Ctrl-C
    assert not gw.survivors(), f"processes left after stop: {gw.survivors()}"


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model() -> str:
    return "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def redis_server():
    """A throwaway redis-server (Debian's); stopped (and checked gone) at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it where it runs as root)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        assert proc.wait(10) is not None


@pytest.fixture
def redis_url(redis_server: str):
    """The session's redis-server, emptied for each test: tenants' buckets and spend
    from one test must not count in the next."""
    import redis

    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server
