"""The repository explains itself: every file the docs and comments name exists in it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "design.md", ROOT / "bench" / "RESULTS.md"]
SOURCES = sorted((ROOT / "src" / "fp16rl").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
REPO_PATH = re.compile(r"(?<![\w/.-])((?:src|tests|bench|docs|configs)/[\w./-]*[\w/])")
MODULE = re.compile(r"`([\w/]+\.py)`")
FILES = {p.name for p in ROOT.rglob("*.py") if ".venv" not in p.parts} | {"setup.py"}


@pytest.mark.parametrize("doc", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(doc):
    text = doc.read_text()
    missing = [path for path in REPO_PATH.findall(text) if not (ROOT / path.rstrip("/")).exists()]
    missing += [name for name in MODULE.findall(text) if Path(name).name not in FILES]
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"
    assert "DESIGN.md" not in text and "notes/" not in text, "the shared design notes are not in this repository"
