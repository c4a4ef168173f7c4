"""The README stays true: every setting is documented with its default (docs/configuration.md, generated), its links
resolve, and the two commands are there."""

import re
from pathlib import Path

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


def test_the_readmes_links_to_files_resolve() -> None:
    root = Path(__file__).parents[2]
    targets = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", README)
    assert targets
    missing = [t for t in targets if not (root / t.split("#")[0]).exists()]
    assert missing == []


UNINSTALL = ".venv/bin/pip uninstall -qy torchvision torchaudio torchcodec"


def test_the_two_commands_are_in_the_readme() -> None:
    assert f"pip install -e '.[cpu]' && {UNINSTALL} && .venv/bin/rerankfarm up" in README
    assert f"pip install -e '.[cpu,dev]' && {UNINSTALL} && .venv/bin/pytest" in README
    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    assert "pip install -q -e '.[cpu,dev]' && .venv/bin/pip uninstall -qy $UNUSABLE && .venv/bin/pytest" in ci
    assert 'UNUSABLE="torchvision torchaudio torchcodec"' in ci
