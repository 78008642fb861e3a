"""The `tiergate` command: serve, and prepare models."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from models.manifest import ModelError, load_manifest, manifest_names
from models.prepare import prepare
from serving.config import ConfigError, Settings, load_settings

log = logging.getLogger("tiergate")


def prepare_engine_models(settings: Settings, force: bool = False) -> dict[str, Path]:
    """Prepare the weights of every supervised engine; returns engine name -> folder."""
    from serving.engines import cpu

    cpu_build = cpu.is_cpu_build()
    dirs: dict[str, Path] = {}
    for i, engine in enumerate(settings.engines):
        if not engine.supervised:
            continue
        try:
            manifest = load_manifest(engine.model)
            choice = (
                cpu.engine_choice(engine.model, engine.args, engine.host_variant)
                if cpu_build
                else None
            )
            if choice is not None and choice.model != engine.model:
                log.info("engine %s serves %s: %s", engine.name, choice.model, choice.why)
                manifest = load_manifest(choice.model)
        except ModelError as exc:
            raise ConfigError(f"engines.{i}.model: {exc}") from exc
        dirs[engine.name] = prepare(manifest, settings.model_cache, force=force)
    return dirs


def check_engines(settings: Settings, model_dirs: dict[str, Path]) -> None:
    """Before anything starts: every engine's args pass vLLM's own checks, and every
    model the planner can judge fits its memory. Raises ConfigError naming the keys."""
    from serving.engines import cpu
    from serving.engines.defaults import engine_args_env, task_problems, tools_tier_problems
    from serving.engines.memory_check import check_settings
    from serving.engines.validate import validate_engines

    cpu_build = cpu.is_cpu_build()
    problems = check_settings(settings, model_dirs, cpu_build=cpu_build)
    problems += tools_tier_problems(settings) + task_problems(settings)
    if settings.validate_engine_args:
        jobs = []
        for i, engine in enumerate(settings.engines):
            if not engine.supervised:
                continue
            args, _ = engine_args_env(engine)
            jobs.append(
                {"where": f"engines.{i}", "model_dir": str(model_dirs[engine.name]), "args": args}
            )
        if jobs:
            log.info("checking engine args against vLLM's EngineArgs")
            problems += validate_engines(jobs, settings.model_cache / ".validated-args")
    if problems:
        raise ConfigError("engine config refused:\n  " + "\n  ".join(problems))


def banner(host: str, port: int, models: list[str], embedders: Sequence[str] = ()) -> str:
    """`models`: every name clients may send; `embedders`: those for /v1/embeddings."""
    base = f"http://{host}:{port}"
    model = next(m for m in models if m not in embedders)
    text = f"""
tiergate is ready on {base}  (models: {", ".join(models)})

  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}/v1', api_key='unused'); \\
print(c.chat.completions.create(model='{model}', \\
messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)"
"""
    if embedders:
        text += f"""
  curl {base}/v1/embeddings -H 'Content-Type: application/json' \\
    -d '{{"model": "{embedders[0]}", "input": ["Hello!"]}}'
"""
    return text


async def run_server(settings: Settings, model_dirs: dict[str, Path]) -> int:
    from serving.api.server import bind, server_for
    from serving.app import build_registry, create_app, uvicorn_config
    from serving.engines.supervisor import EngineStartError, Supervisor
    from serving.metrics import GatewayMetrics

    registry = build_registry(settings)
    metrics = GatewayMetrics()
    supervisor = Supervisor(settings, registry, model_dirs, metrics)
    app = create_app(settings, registry, metrics, supervisor, model_dirs=model_dirs)
    config = uvicorn_config(app, settings, host=settings.server.host, port=settings.server.port)
    try:
        listener = bind(settings.server.host, settings.server.port)
    except OSError as exc:
        await supervisor.stop()
        raise ConfigError(
            f"server.port: cannot bind {settings.server.host}:{settings.server.port}: {exc}"
        ) from exc
    server, sockets, link = server_for(listener, config, app, settings)
    failed = False

    async def announce() -> None:
        nonlocal failed
        while not server.started:  # noqa: ASYNC110 (uvicorn only exposes a flag)
            await asyncio.sleep(0.05)
        try:
            await supervisor.wait_started()
        except EngineStartError as exc:
            log.error("start-up failed, stopping everything: %s", exc)
            failed = True
            server.should_exit = True
            return
        port = listener.getsockname()[1]
        embedders = [t.model for t in registry.tiers if t.task == "embed"]
        print(banner(settings.server.host, port, registry.models(), embedders), flush=True)

    watcher = asyncio.create_task(announce())
    try:
        await server.serve(sockets=sockets)
    finally:
        watcher.cancel()
        if link is not None:
            await link.close()
        listener.close()
        await supervisor.stop()  # idempotent; covers a failed bind too
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    server: dict = {}
    if args.host:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    settings = load_settings(args.config, **({"server": server} if server else {}))
    model_dirs = prepare_engine_models(settings)
    check_engines(settings, model_dirs)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if settings.server.workers > 1:
            from serving.workers import run_workers

            return runner.run(run_workers(settings, model_dirs))
        return runner.run(run_server(settings, model_dirs))


def cmd_models_prepare(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    names = (
        [args.name] if args.name else sorted({e.model for e in settings.engines if e.supervised})
    )
    for name in names:
        path = prepare(load_manifest(name), settings.model_cache, force=args.force)
        print(f"{name}: {path}")
    return 0


def cmd_models_list(_: argparse.Namespace) -> int:
    for name in manifest_names():
        m = load_manifest(name)
        print(f"{m.name}\t{m.format}\t{m.quantization}\tctx={m.max_context}\t{m.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiergate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the engines and the gateway")
    serve.add_argument("--config", type=Path, default=None, help="YAML (configs/default.yaml)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="model manifests and weights")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="prepare weights into the model cache")
    prep.add_argument("name", nargs="?", help="manifest name (default: those in the config)")
    prep.add_argument("--config", type=Path, default=None)
    prep.add_argument("--force", action="store_true", help="prepare again even if cached")
    prep.set_defaults(func=cmd_models_prepare)
    msub.add_parser("list", help="list manifests").set_defaults(func=cmd_models_list)
    sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (see: bench --help)")
    sub.add_parser("plan", help="capacity, GPU and memory plans (see: plan --help)")
    sub.add_parser("eval", help="quality gate: golden set or agreement (see: eval --help)")
    sub.add_parser("keys", help="tenants, API keys and usage (see: keys --help)")
    return parser


def _tool(name: str, argv: list[str]) -> int:
    """`tiergate bench`, `plan` and `eval` live in benchmarks/ (they talk HTTP only)."""
    if name == "bench" and argv[:1] == ["compare"]:
        from benchmarks import compare

        return compare.main(argv[1:])
    if name == "bench":
        from benchmarks import bench

        return bench.main(bench.build_parser().parse_args(argv))
    if name == "eval":
        from benchmarks.quality import evaluate

        return evaluate.main(argv)
    from benchmarks import plan

    return plan.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["bench"], ["plan"], ["eval"]):
        return _tool(argv[0], argv[1:])
    if argv[:1] == ["keys"]:
        from serving.tenants import cli as keys

        return keys.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per health probe otherwise
    try:
        return args.func(args)
    except (ConfigError, ModelError) as exc:
        print(f"tiergate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
