"""The one settings tree: YAML file, then TIERGATE_* environment overrides.

Every setting is defined once here. The CLI, the gateway and the supervisor all
load through `load_settings`, so a bad key fails the same way everywhere: at
start, with a message that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(Exception):
    """A config file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    """The gateway process: its port, limits, logs and keys."""

    host: str = Field(
        "127.0.0.1", description="Address the gateway listens on; 0.0.0.0 in a container."
    )
    port: int = Field(8000, ge=0, le=65535, description="The OpenAI-compatible endpoint's port.")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    max_upstream_connections: int = Field(
        1024, gt=0, description="Keep-alive connections from the gateway to all engines."
    )
    log_level: str = Field(
        "info",
        description="Gateway and supervisor log level.",
        pattern="^(critical|error|warning|info|debug)$",
    )
    access_log: str = Field(
        "off", pattern="^(off|json)$", description="json: one JSON line per request on stdout."
    )
    access_log_prompt_sample: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of access-log lines that carry the prompt, redacted (emails, "
        "phone numbers and key-like strings replaced); 0: never the prompt.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer keys accepted on /v1/*; empty: no auth. In Kubernetes, set "
        'TIERGATE_SERVER__API_KEYS (a JSON list, e.g. \'["k1","k2"]\') from a Secret.',
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM/Ctrl-C: stop accepting at once, let requests in flight "
        "finish for this long, then end each remaining stream with an error event and "
        "[DONE]. Keep it under Kubernetes' terminationGracePeriodSeconds.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway processes on one port (SO_REUSEPORT) beside one engine "
        "supervisor; one per core the gateway may use (serving/workers.py).",
    )
    max_in_flight: int = Field(
        2048,
        ge=0,
        description="Requests the gateway holds at once; past it, 429 before any upstream "
        "work (0: no limit). Per replica, router.spill.max_in_flight applies as well.",
    )
    max_loop_lag_ms: float = Field(
        0.0,
        ge=0,
        description="Refuse new requests (429) while the event loop runs this late: the "
        "gateway's own core is saturated (0: off, the default: against clients that retry "
        "at once it cost goodput, benchmarks/RESULTS.md).",
    )
    retry_after_max_scale: int = Field(
        4,
        ge=1,
        le=60,
        description="In a sustained overload the max_in_flight 429s (the gateway's, or its "
        "front's) ask clients to wait up to this many times router.spill.retry_after_s: as "
        "many times as clients wait per slot of max_in_flight (refusals a second x "
        "retry-after), so that refusals do not take the core from the streams (1: off; "
        "benchmarks/RESULTS.md).",
    )
    front: bool = Field(
        False,
        description="A second process owns the port, parks idle keep-alive connections and "
        "answers the max_in_flight 429s itself, in milliseconds even while the gateway's "
        "core is saturated; every other request is handed to the gateway with its socket "
        "(serving/front). Under server.workers each worker has its own front, refusing "
        "at that worker's share of max_in_flight. server.max_loop_lag_ms still "
        "applies: the gateway refuses what the front hands it while its loop lags.",
    )
    max_refusals_s: int = Field(
        5000,
        gt=0,
        validation_alias=AliasChoices("max_refusals_s", "front_max_refusals_s"),
        description="Past this many 429s a second, a refused keep-alive connection is not "
        "read again until its Retry-After-Ms has passed, so clients that re-send at once "
        "cannot spend the gateway's core on refusals; clients that honour Retry-After "
        "never notice (benchmarks/RESULTS.md). Also read as front_max_refusals_s.",
    )


class TimeoutSettings(_Strict):
    """Seconds. `read` bounds the wait for the first byte and between stream chunks."""

    connect: float = Field(5.0, gt=0, description="Connecting to an engine.")
    read: float = Field(
        300.0, gt=0, description="Waiting for an engine's first byte, and between chunks."
    )
    pool: float = Field(5.0, gt=0, description="Waiting for a free upstream connection.")
    engine_start: float = Field(600.0, gt=0, description="Wait for an engine's /health.")
    engine_stop: float = Field(
        20.0, gt=0, description="Grace after SIGTERM before SIGKILL (3 s while it starts)."
    )
    health_interval: float = Field(2.0, gt=0, description="Between health checks of each engine.")


class RestartSettings(_Strict):
    """Exponential backoff for crashed engines."""

    initial_backoff: float = Field(1.0, gt=0, description="Seconds before the first restart.")
    max_backoff: float = Field(60.0, gt=0, description="Longest wait between restarts.")
    max_restarts: int = Field(10, ge=0, description="Give up after this many in a row.")


class EnginePlan(_Strict):
    """Hardware facts for the memory check at start (`tiergate plan memory`)."""

    gpu: str = Field(description="A key of configs/gpus.yaml, e.g. h100-80gb.")
    model_spec: str | None = Field(
        None, description="A key of configs/model_specs.yaml; default: the weights' config.json."
    )
    weights_quantization: str | None = Field(
        None, description="How the checkpoint is quantized, when args do not say (e.g. awq)."
    )


class DiscoverSettings(_Strict):
    """A set of replicas found in DNS: each A/AAAA record of `dns` is one engine pod (in
    Kubernetes, a headless Service per tier). Re-resolved every `interval_s`."""

    dns: str = Field(min_length=1, description="e.g. tier-small-engines.ns.svc.cluster.local")
    port: int = Field(8000, gt=0, le=65535, description="Each pod's vLLM HTTP port.")
    interval_s: float = Field(5.0, gt=0, description="Seconds between DNS lookups.")
    nameserver: str | None = Field(
        None, description="'host' or 'host:port'; default: the system's resolver."
    )
    kv_events_port: int | None = Field(
        None,
        gt=0,
        le=65535,
        description="Each pod's vLLM KV-event publisher (ZMQ PUB, --kv-events-config "
        "endpoint tcp://*:PORT, replay_endpoint tcp://*:PORT+1): the router subscribes to "
        "every discovered pod on it and routes by what each has cached; unset: an "
        "approximate index of what it sent.",
    )


class EngineSettings(_Strict):
    """One vLLM OpenAI server: started by the supervisor, reached at `url`, or a set of
    them found through `discover`."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Unique; tiers list engines by it."
    )
    model: str = Field(description="Manifest name under models/manifests, or a served name.")
    served_model_name: str | None = Field(
        None, description="The name the engine serves under; default: `model`."
    )
    url: str | None = Field(None, description="External engine; nothing is started.")
    kv_events: str | None = Field(
        None,
        pattern=r"^(tcp|ipc)://",
        description="An external engine's KV-event publisher (its --kv-events-config "
        "endpoint, bound: tcp://*:5557 there is tcp://HOST:5557 here). Supervised engines "
        "publish on private ipc sockets when router.prefix.kv_events.",
    )
    kv_replay: str | None = Field(
        None,
        pattern=r"^(tcp|ipc)://",
        description="That engine's replay socket (its replay_endpoint), for lost batches.",
    )
    discover: DiscoverSettings | None = Field(
        None, description="External engines found in DNS (one per record); nothing is started."
    )
    args: dict[str, Any] = Field(default_factory=dict, description="vLLM engine args.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment of a supervised engine."
    )
    host_variant: bool = Field(
        True,
        description="On the CPU build, when args set neither dtype nor quantization, serve "
        "the manifest's gate-passing faster variant for this CPU (cpu_variants).",
    )
    plan: EnginePlan | None = Field(
        None, description="Check at start that the model fits this GPU under `args`."
    )

    @property
    def model_name(self) -> str:
        """The name clients put in `model`."""
        return self.served_model_name or self.model

    @property
    def supervised(self) -> bool:
        """Started and watched by tiergate's supervisor (neither `url` nor `discover`)."""
        return self.url is None and self.discover is None

    @model_validator(mode="after")
    def _args_are_vllm_names(self) -> EngineSettings:
        if self.url is not None and self.discover is not None:
            raise ValueError("set url or discover, not both")
        reserved = {"model", "host", "port", "served_model_name"}
        for key in self.args:
            norm = key.replace("-", "_")
            if norm in reserved:
                raise ValueError(f"args.{key} is set by tiergate; remove it")
        return self


class TierCost(_Strict):
    """Relative cost, used for the estimated-cost metric and the planner."""

    input_per_1k: float = Field(0.0, ge=0, description="Cost of 1,000 prompt tokens.")
    output_per_1k: float = Field(0.0, ge=0, description="Cost of 1,000 output tokens.")


class TierLimits(_Strict):
    """Checked at the gateway, before any engine is asked."""

    max_context: int | None = Field(
        None, gt=0, description="Longer prompts get 400 at the gateway; unset: the engine's."
    )
    max_output_tokens: int | None = Field(
        None, gt=0, description="Larger max_tokens gets 400 at the gateway."
    )


class TierSettings(_Strict):
    """A tier: a public model name served by one or more engines (its replicas)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Unique; rules and order use it."
    )
    model: str = Field(description="The name clients send as `model` for this tier.")
    engines: list[str] = Field(min_length=1, description="Names from `engines`.")
    cost: TierCost = Field(default_factory=TierCost)
    limits: TierLimits = Field(default_factory=TierLimits)
    tokenizer: Path | None = Field(None, description="Default: the first engine's weights.")
    task: Literal["generate", "embed"] | None = Field(
        None,
        description="generate: chat, completions and responses; embed: /v1/embeddings, "
        "/v1/rerank and /v1/score. "
        "Default: its engines' models' (a manifest's `task`), else generate.",
    )


class RulesSettings(_Strict):
    """How `model: auto` picks a tier. Tier names must exist; unset rules are skipped."""

    default_tier: str | None = Field(None, description="Where `auto` goes when no rule matches.")
    tools_tier: str | None = Field(None, description="Requests that carry `tools`.")
    long_prompt_tokens: int = Field(
        1024, gt=0, description="Prompt tokens (chat template applied) that make it long."
    )
    long_prompt_tier: str | None = Field(None, description="Requests with a long prompt.")
    long_output_tokens: int = Field(
        512, gt=0, description="max_tokens (or max_completion_tokens) that make it long."
    )
    long_output_tier: str | None = Field(None, description="Requests asking a long answer.")


class SpillSettings(_Strict):
    """A replica past any of these is saturated; a tier whose replicas all are spills."""

    max_waiting: float = Field(8, ge=0, description="Requests the engine has waiting.")
    max_kv_usage: float = Field(0.95, gt=0, le=1, description="Share of KV cache in use.")
    max_in_flight: int = Field(128, gt=0, description="Requests this gateway has there.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of the 429 when all are full.")


class RetrySettings(_Strict):
    """Failover to another replica after an error before the first byte."""

    max_attempts: int = Field(3, ge=1, description="Per request, first try included.")
    budget_ratio: float = Field(0.2, ge=0, description="Retries allowed per request, fleet-wide.")
    min_retries: float = Field(
        10, ge=0, description="Retries allowed whatever the ratio (a floor for low traffic)."
    )


class BreakerSettings(_Strict):
    """A replica that keeps failing is skipped for a while (its breaker opens)."""

    failures: int = Field(3, ge=1, description="Failures in a row that open a replica's breaker.")
    cooldown: float = Field(10.0, gt=0, description="Seconds open before half-open.")
    half_open_share: float = Field(
        0.25, gt=0, le=1, description="Share of requests a half-open replica takes."
    )


class PrefixSettings(_Strict):
    """Routing by what each replica has cached (serving/router/balancer.py has the
    formula): cost = queued prefill - min(matched + session, max_credit_tokens)
    + load_tokens x load, in prompt tokens; the lowest cost wins."""

    load_tokens: float = Field(
        64.0,
        ge=0,
        description="Prompt tokens of prefill that one more request of load on a replica "
        "is worth (a request this gateway has in flight there, or one the engine reported "
        "from elsewhere at its last scrape).",
    )
    max_credit_tokens: int = Field(
        512,
        ge=0,
        description="The most reuse can buy: a replica holding a hot prefix gives it up "
        "once it has max_credit_tokens / load_tokens more requests than another.",
    )
    session_tokens: int = Field(
        512,
        ge=0,
        description="Credit of the replica a session (x-session-id, else `user`) last used.",
    )
    kv_events: bool = Field(
        True,
        description="Supervised engines publish vLLM's KV events (prefix caching on) and "
        "the router subscribes; off, or where an engine publishes none: an approximate "
        "index of what the router sent there.",
    )
    block_size: int | None = Field(
        None,
        gt=0,
        description="The engines' KV block in tokens; default: the engine's block_size "
        "arg, else 128 on the CPU build of vLLM and 16 on GPUs.",
    )
    max_prompt_tokens: int = Field(
        8192,
        gt=0,
        description="Prompt tokens looked at for reuse (a bound on the per-request cost).",
    )
    approx_blocks: int = Field(
        4096, gt=0, description="Blocks the approximate index keeps per replica (LRU)."
    )
    max_blocks: int = Field(
        262_144,
        gt=0,
        description="Past this many blocks from one engine's events (~250 bytes each: "
        "64 MB), its index is emptied and refilled: a bound on memory whatever it sends.",
    )
    pending_s: float = Field(
        5.0,
        ge=0,
        description="Seconds a request's blocks count as cached where it was sent, until "
        "the engine's events say so (bursts of one prefix stay together).",
    )


class RouterSettings(_Strict):
    """How a request finds a tier and a replica."""

    auto_model: str = Field("auto", description="The `model` name that lets the router pick.")
    order: list[str] = Field(default_factory=list, description="Spill/fallback order.")
    rules: RulesSettings = Field(default_factory=RulesSettings)
    spill: SpillSettings = Field(default_factory=SpillSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    affinity: bool = Field(
        True,
        description="Prefer the replica that holds the prompt's prefix or the session "
        "(router.prefix); false: by load alone.",
    )
    prefix: PrefixSettings = Field(default_factory=PrefixSettings)
    scrape_interval: float = Field(
        1.0, gt=0, description="Seconds between scrapes of each engine's load (/metrics)."
    )
    wait_ready_s: float = Field(
        60.0,
        ge=0,
        description="Hold a request up to this long for a replica of its tier to become "
        "ready (an engine restarting: ~30-45 s for the CPU default) instead of an instant "
        "503; 0: answer at once.",
    )
    wait_ready_max: int = Field(
        256,
        ge=0,
        description="Requests held at once by wait_ready_s; past it, 503 at once.",
    )


class TenancySettings(_Strict):
    """Named keys per tenant (team), stored hashed in SQLite (one host) or PostgreSQL (a
    fleet); `tiergate keys` manages them. `server.api_keys` keep working beside them,
    with access to every tier."""

    enabled: bool = Field(False, description="Require a tenant key (or server.api_keys).")
    db: Path | None = Field(None, description="Default: tenants.sqlite3 in model_cache.")
    database_url: SecretStr | None = Field(
        None,
        description="postgresql://user:password@host:5432/db: keys, tenants and usage in "
        "PostgreSQL, shared by every router replica and worker, instead of `db` (e.g. "
        "from TIERGATE_TENANCY__DATABASE_URL).",
    )
    max_stale_s: float = Field(
        300.0,
        ge=0,
        description="With PostgreSQL unreachable, how long the keys each gateway holds in "
        "memory keep working after its last contact (then 503); unknown keys get 503.",
    )
    usage_retention_days: int = Field(
        400,
        ge=1,
        description="PostgreSQL: usage rows older than this many days are deleted (checked "
        "hourly by each gateway).",
    )
    redis_url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix)://",
        description="Keep the limit counters in Redis, shared by every router replica and "
        "worker (e.g. redis://redis:6379/0); unset: in each process.",
    )
    redis_lease: float = Field(
        30.0,
        ge=3,
        description="Seconds after a gateway process's last word in Redis (renewed every "
        "third of this while it holds requests) that its requests in flight stop counting "
        "against max_concurrency: how long a dead replica can hold a tenant's slots.",
    )

    @field_validator("database_url")
    @classmethod
    def _postgres(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and not url.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("must start with postgresql:// (or postgres://)")
        return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TIERGATE_", env_nested_delimiter="__", extra="forbid"
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    restart: RestartSettings = Field(default_factory=RestartSettings)
    model_cache: Path = Field(
        default_factory=lambda: (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiergate" / "models"
        ),
        description="Prepared weights, compiled kernels and the tenants' SQLite file.",
        json_schema_extra={"default_doc": "`$XDG_CACHE_HOME/tiergate/models` (`~/.cache/...`)"},
    )
    validate_engine_args: bool = Field(
        True, description="Check supervised engines' args with vLLM's EngineArgs at start."
    )
    engines: list[EngineSettings] = Field(min_length=1)
    tiers: list[TierSettings] = Field(
        default_factory=list, description="Empty: one tier per engine model."
    )
    router: RouterSettings = Field(default_factory=RouterSettings)
    tenancy: TenancySettings = Field(default_factory=TenancySettings)

    def tenancy_db(self) -> Path:
        return self.tenancy.db or self.model_cache / "tenants.sqlite3"

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        names: set[str] = set()
        for i, engine in enumerate(self.engines):
            if engine.name in names:
                raise ValueError(f"engines.{i}.name {engine.name!r} is used twice")
            names.add(engine.name)
        tiers = {t.name for t in self.tiers}
        if len(tiers) != len(self.tiers):
            raise ValueError("tiers: names must be unique")
        for i, tier in enumerate(self.tiers):
            for name in tier.engines:
                if name not in names:
                    raise ValueError(f"tiers.{i}.engines: no engine named {name!r}")
            if tier.model == self.router.auto_model:
                raise ValueError(f"tiers.{i}.model: {tier.model!r} is the auto model's name")
        refs = {
            f"router.rules.{k}": v
            for k, v in self.router.rules.model_dump().items()
            if k.endswith("tier")
        }
        refs.update({f"router.order.{i}": t for i, t in enumerate(self.router.order)})
        for key, tier in refs.items():
            if tier is not None and tier not in tiers:
                raise ValueError(f"{key}: no tier named {tier!r}")
        return self

    def effective_tiers(self) -> list[TierSettings]:
        """The configured tiers, or one per distinct engine model when none are."""
        if self.tiers:
            return self.tiers
        by_model: dict[str, list[str]] = {}
        for engine in self.engines:
            by_model.setdefault(engine.model_name, []).append(engine.name)
        return [TierSettings(name=m, model=m, engines=e) for m, e in by_model.items()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file (passed as init kwargs).
        return (env_settings, init_settings)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load a YAML config; `overrides` (e.g. server={"port": 1}) win over the file."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc
