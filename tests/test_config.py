"""The settings tree: defaults load, overrides apply, bad keys fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import ConfigError, load_settings
from serving.engines.defaults import tier_tasks
from tests.utils import REPO, default_engine, write_config


def test_default_config_loads() -> None:
    s = load_settings()
    assert s.server.port == 8000
    assert [e.name for e in s.engines] == ["smollm2-cpu", "minilm-cpu"]
    assert s.engines[0].model_name == "smollm2-135m-instruct"
    assert s.engines[0].args["max_model_len"] == 2048
    assert s.engines[1].model_name == "all-minilm-l6-v2"
    assert tier_tasks(s) == {"smollm2-135m-instruct": "generate", "all-minilm-l6-v2": "embed"}


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERGATE_SERVER__PORT", "9123")
    monkeypatch.setenv("TIERGATE_TIMEOUTS__READ", "12.5")
    s = load_settings()
    assert s.server.port == 9123
    assert s.timeouts.read == 12.5
    assert s.timeouts.connect == 5  # the rest of the file still applies
    assert s.engines[0].name == "smollm2-cpu"


def test_the_refusal_budget_keeps_its_old_name(tmp_path: Path) -> None:
    """server.max_refusals_s was server.front_max_refusals_s: configs with it still load."""
    s = load_settings(write_config(tmp_path / "c.yaml", server={"front_max_refusals_s": 7}))
    assert s.server.max_refusals_s == 7
    assert load_settings(write_config(tmp_path / "d.yaml")).server.max_refusals_s == 5000


def test_cli_overrides_win(tmp_path: Path) -> None:
    s = load_settings(write_config(tmp_path / "c.yaml"), server={"port": 1234})
    assert s.server.port == 1234
    assert s.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"servr": {"port": 1}}, "servr"),
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"timeouts": {"read": -1}}, "timeouts.read"),
        ({"engines": [default_engine(argz={})]}, "engines.0.argz"),
        ({"engines": []}, "engines"),
        ({"engines": [default_engine(), default_engine()]}, "engines"),
        ({"engines": [default_engine(args={"port": 1})]}, "args.port"),
        (
            {"engines": [default_engine(url="http://x:1", discover={"dns": "e.test"})]},
            "url or discover",
        ),
        ({"engines": [default_engine(discover={"dns": "e.test", "port": 0})]}, "discover.port"),
        ({"engines": [default_engine(discover={"dsn": "e.test"})]}, "discover.dsn"),
        ({"server": {"max_refusals_s": 0}}, "server.max_refusals_s"),
        ({"tenancy": {"redis_lease": 1}}, "tenancy.redis_lease"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, changes: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path / "c.yaml", **changes))
    assert key in str(info.value)


def test_bad_env_override_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERGATE_SERVER__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings()


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("server: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"server": {"bogus": 1}}, "server.bogus"),
        ({"engines": [default_engine(model="no-such-model")]}, "engines.0.model"),
    ],
)
def test_serve_refuses_bad_config_at_start(tmp_path: Path, changes: dict, needle: str) -> None:
    config = write_config(tmp_path / "c.yaml", **changes)
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert needle in done.stderr
    assert "vllm.entrypoints" not in done.stderr  # nothing was started
