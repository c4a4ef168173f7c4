"""The README and docs/ stay true: every setting is documented with its default (docs/configuration.md, generated),
every link and every command they name resolves, and the two commands are there."""

import importlib.util
import re
from pathlib import Path

import pytest

from rerankfarm import config_doc
from schemas.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_documented_with_its_default() -> None:
    """docs/configuration.md is what `python -m rerankfarm.config_doc` renders from the Settings class."""
    assert config_doc.PATH.read_text() == config_doc.render(), "run `python -m rerankfarm.config_doc`"
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        assert f"| `RERANK_{name.upper()}` | `{default}` |" in config_doc.render(), name
    assert "(docs/configuration.md)" in README


ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_of_the_docs_resolves(page: Path) -> None:
    """Links to files (from the page's own folder) and to headings, in the README and every page of docs/."""
    targets = re.findall(r"\]\(((?!https?://|mailto:)[^)\s]+)\)", page.read_text())
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_every_command_the_docs_name_exists() -> None:
    """`rerankfarm SUB` and `python -m MODULE` named in the README or docs/ are commands the code has."""
    from rerankfarm.cli import build_parser

    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    text = "\n".join(page.read_text() for page in PAGES)
    named = set(re.findall(r"(?<!from )\brerankfarm ([a-z][a-z-]+)", text)) - {"farm"}
    assert named and named <= subcommands, named - subcommands
    modules = set(re.findall(r"python3? -m ([a-z_][\w.]+)", text))
    assert modules and all(importlib.util.find_spec(m) is not None for m in modules), modules


UNINSTALL = ".venv/bin/pip uninstall -qy torchvision torchaudio torchcodec"


def test_the_two_commands_are_in_the_readme() -> None:
    assert f"pip install -e '.[cpu]' && {UNINSTALL} && .venv/bin/rerankfarm up" in README
    assert f"pip install -e '.[cpu,dev]' && {UNINSTALL} && .venv/bin/pytest" in README
    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    assert "pip install -q -e '.[cpu,dev]' && .venv/bin/pip uninstall -qy $UNUSABLE && .venv/bin/pytest" in ci
    assert 'UNUSABLE="torchvision torchaudio torchcodec"' in ci
