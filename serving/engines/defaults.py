"""What a supervised engine runs with: its config's args and env over its model's
defaults (the manifest's `engine_args`: tool-call parser, sampling defaults), then the
CPU build's per-host choices where the config is silent (serving/engines/cpu.py).
The supervisor and the check at start use this one function, so what is checked is
what runs."""

from __future__ import annotations

from typing import Any

from models.manifest import ModelError, load_manifest
from serving.config import EngineSettings, Settings
from serving.engines import cpu


def model_args_env(engine: EngineSettings) -> tuple[dict[str, Any], dict[str, str]]:
    """The config's args and env over the model's manifest defaults (no host choices)."""
    try:
        return load_manifest(engine.model).with_engine_defaults(engine.args, engine.env)
    except ModelError:  # not a manifest: weights named by path; nothing to add
        return dict(engine.args), dict(engine.env)


def engine_args_env(engine: EngineSettings) -> tuple[dict[str, Any], dict[str, str]]:
    args, env = model_args_env(engine)
    if cpu.is_cpu_build():
        choice = cpu.engine_choice(engine.model, args, engine.host_variant)
        args, env = cpu.apply_cpu_defaults(args, env, cpu.cpu_flags(), choice=choice)
    return args, env


def serves_tools(args: dict[str, Any]) -> bool:
    """vLLM answers tool_choice other than "none" only with both of these."""
    return bool(args.get("enable_auto_tool_choice")) and bool(args.get("tool_call_parser"))


def tools_tier_problems(settings: Settings) -> list[str]:
    """`router.rules.tools_tier` must be able to serve tools: every supervised engine of
    it runs a tool-call parser. (External engines' flags are their own server's.)"""
    name = settings.router.rules.tools_tier
    if name is None:
        return []
    tier = next(t for t in settings.effective_tiers() if t.name == name)
    where = {e.name: (i, e) for i, e in enumerate(settings.engines)}
    problems = []
    for engine_name in tier.engines:
        i, engine = where[engine_name]
        if engine.supervised and not serves_tools(model_args_env(engine)[0]):
            problems.append(
                f"router.rules.tools_tier: tier {name!r} cannot serve tools: engines.{i} "
                f"({engine_name}) runs no tool-call parser; set its args "
                "enable_auto_tool_choice: true and tool_call_parser (e.g. hermes), or "
                "serve a model whose manifest sets them"
            )
    return problems


def engine_task(engine: EngineSettings) -> str:
    """What an engine serves: its manifest's task; an engine not named by a manifest
    generates."""
    try:
        return load_manifest(engine.model).task
    except ModelError:
        return "generate"


def tier_tasks(settings: Settings) -> dict[str, str]:
    """Each tier's task: its own `task`, else its first engine's."""
    engines = {e.name: e for e in settings.engines}
    return {
        tier.name: tier.task or engine_task(engines[tier.engines[0]])
        for tier in settings.effective_tiers()
    }


def task_problems(settings: Settings) -> list[str]:
    """A tier's supervised engines serve its task, and `auto`'s rules and order name
    generating tiers only (an embedding model cannot answer a chat)."""
    tasks = tier_tasks(settings)
    engines = {e.name: (i, e) for i, e in enumerate(settings.engines)}
    problems = []
    for t, tier in enumerate(settings.effective_tiers()):
        for name in tier.engines:
            i, engine = engines[name]
            if engine.supervised and engine_task(engine) != tasks[tier.name]:
                problems.append(
                    f"tiers.{t}.task: tier {tier.name!r} serves {tasks[tier.name]}, but "
                    f"engines.{i} ({name}) serves {engine_task(engine)}"
                )
    refs = {f"router.rules.{k}": v for k, v in settings.router.rules if k.endswith("tier")}
    refs.update({f"router.order.{i}": t for i, t in enumerate(settings.router.order)})
    for key, name in refs.items():
        if name is not None and tasks.get(name) == "embed":
            problems.append(f"{key}: tier {name!r} serves embeddings, not chats")
    return problems
