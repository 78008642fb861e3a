"""The configuration reference (configs/README.md), generated from the settings tree.

`python -m serving.config_docs --write` rewrites the generated part of configs/README.md;
tests/test_docs.py fails when the file and `serving.config.Settings` differ, so the
reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from serving.config import REPO_ROOT, Settings

README = REPO_ROOT / "configs" / "README.md"
BEGIN = "<!-- BEGIN GENERATED: python -m serving.config_docs --write -->"
END = "<!-- END GENERATED -->"


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The settings model a field holds, and the path suffix ("" or "[]") to reach it."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found, suffix = _model_in(arg)
            if found:
                return found, suffix
        return None, ""
    if origin is list:
        (arg,) = typing.get_args(annotation) or (None,)
        found, _ = _model_in(arg)
        return found, "[]" if found else ""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    return None, ""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | null"
    if origin is list:
        (arg,) = typing.get_args(annotation) or (Any,)
        return f"list[{_type_name(arg)}]"
    if origin is dict:
        return "map"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation)).replace("Path", "path")


def _default(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "default_doc" in extra:
        return str(extra["default_doc"])
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if value in ([], {}):
        return "empty"
    return f"`{value}`"


def _constraints(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every leaf setting, depth first, in field order."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub, suffix = _model_in(field.annotation)
        if sub is not None:
            yield from rows(sub, f"{key}{suffix}.")
            continue
        meaning = field.description or ""
        limits = _constraints(field)
        if limits:
            meaning = f"{meaning} ({limits})" if meaning else f"({limits})"
        yield key, _type_name(field.annotation), _default(field), meaning


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key prefix, docstring) of each settings model that has a docstring."""
    for name, field in model.model_fields.items():
        sub, suffix = _model_in(field.annotation)
        if sub is None:
            continue
        key = f"{prefix}{name}{suffix}"
        doc = " ".join((sub.__doc__ or "").split())
        if doc:
            yield key, doc
        yield from sections(sub, f"{key}.")


def render() -> str:
    """The generated part of configs/README.md."""
    lines = [BEGIN, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for row in rows(Settings):
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in row]
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "What each group of settings is for:", ""]
    lines += [f"- `{key}`: {doc}" for key, doc in sections(Settings)]
    lines += ["", END]
    return "\n".join(lines)


def splice(text: str, generated: str) -> str:
    """`text` with its generated part replaced; ValueError when the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{README}: the markers {BEGIN!r} and {END!r} are missing")
    return text[:start] + generated + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite configs/README.md in place")
    a = p.parse_args(argv)
    if not a.write:
        print(render())
        return 0
    README.write_text(splice(README.read_text(), render()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
