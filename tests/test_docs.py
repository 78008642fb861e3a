"""The documents hold: links resolve, the config reference matches the settings tree, the
README's two commands are the ones CI and the Makefile run, and the sizes stay readable."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from serving import config_docs

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def markdown_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:  # not a git checkout: every .md outside the venv
        return [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts]
    return [ROOT / line for line in out.stdout.splitlines()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def test_relative_links_resolve() -> None:
    broken = []
    for md in markdown_files():
        text = FENCE.sub("", md.read_text())
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (md.parent / file).resolve() if file else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_config_reference_matches_the_settings() -> None:
    text = config_docs.README.read_text()
    assert config_docs.splice(text, config_docs.render()) == text, (
        "configs/README.md is out of date: run python -m serving.config_docs --write"
    )


def test_every_setting_says_what_it_means() -> None:
    from serving.config import Settings

    bare = [key for key, _, _, meaning in config_docs.rows(Settings) if not meaning]
    assert not bare


def test_config_reference_names_nested_keys() -> None:
    text = config_docs.render()
    for key in ("router.prefix.load_tokens", "engines[].discover.kv_events_port", "tiers[].name"):
        assert f"`{key}`" in text


def test_readme_commands_are_what_ci_and_make_run() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## The two commands\s+```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no 'The two commands' block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands[:2] == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: install$", makefile, re.M)
    assert re.search(r"^test: install", makefile, re.M)


def test_sizes_stay_readable() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    paragraphs = FENCE.sub("", readme).split("\n\n")
    longest = max(len(p.strip().splitlines()) for p in paragraphs)
    assert longest <= 25, f"a README paragraph of {longest} lines"
    assert len((ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()) <= 1000
    for folder in ("configs", "k8s", "benchmarks"):
        assert (ROOT / folder / "README.md").exists()


def test_every_code_folder_explains_itself() -> None:
    """Each folder of Python code has a README that names every module in it (test
    files excepted: tests/README.md explains them by their suffix)."""
    missing = []
    for folder in ("serving", "models", "benchmarks", "tests"):
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            here = init.parent
            if ".venv" in here.parts:
                continue
            readme = here / "README.md"
            if not readme.exists():
                missing.append(f"{here.relative_to(ROOT)}: no README.md")
                continue
            text = readme.read_text()
            for module in sorted(here.glob("*.py")):
                if module.name == "__init__.py" or module.name.startswith("test_"):
                    continue  # tests/README.md names them by suffix
                if module.stem not in text:
                    missing.append(f"{here.relative_to(ROOT)}/README.md: no {module.name}")
    assert not missing, "\n".join(missing)


@pytest.mark.skipif(not shutil.which("git"), reason="git is not installed")
def test_no_development_diary() -> None:
    out = subprocess.run(
        ["git", "grep", "-niE", r"\bsessions? [0-9]+"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode > 1:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    assert out.stdout == "", out.stdout
