"""The package layers are a contract (pyproject.toml's [tool.importlinter]), checked here by import-linter:
no package imports one above it, siblings in a row stay independent, the modules of a package form no
cycle. The last tests show the check fails when someone adds an upward import or a cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(project: Path, src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", str(project / "pyproject.toml")], cwd=project,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(src)})


def test_the_layer_contracts_hold():
    done = lint(ROOT, ROOT / "src")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.fixture()
def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "src" / "fp16rl", tmp_path / "src" / "fp16rl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    # an upward import: the run folders (runs) reaching for the trainer (train)
    ("runs/folders.py", "from fp16rl.training.trainer import Trainer", "fp16rl.runs is not allowed to import fp16rl.training"),
    # siblings of one row must stay independent: the sampler using the learner's logprobs
    ("rollout/sampler.py", "from fp16rl.learner.logprobs import LogitHead",
     "fp16rl.rollout is not allowed to import fp16rl.learner"),
    # a cycle inside a package: the token batch module importing the loader that imports it
    ("model/forward.py", "from fp16rl.model.loading import load_model", "No cycles are allowed in fp16rl.model"),
    # the light packages stay free of the ML stack (the CLI refuses bad input before torch loads)
    ("config/dtypes.py", "import torch", "fp16rl.config is not allowed to import torch"),
], ids=["upward", "siblings", "cycle", "ml-stack"])
def test_an_added_upward_import_or_cycle_breaks_the_contract(copy_of_the_package, module, line, broken):
    path = copy_of_the_package / "src" / "fp16rl" / module
    path.write_text(path.read_text() + f"\n\ndef _added():\n    {line}\n")  # inside a function: still counted
    done = lint(copy_of_the_package, copy_of_the_package / "src")
    assert done.returncode == 1
    assert broken in done.stdout, done.stdout[-3000:]


def test_names_declared_in_config_match_the_registries():
    """config declares the reward and encoder names so that options are checked without importing tasks."""
    from fp16rl.config import options
    from fp16rl.tasks import rewards
    from fp16rl.tasks.arc import encoders, reward

    assert tuple(reward.REWARDS) == options.ARC_REWARDS
    assert tuple(rewards._builtin_functions()) == options.BUILTIN_REWARDS
    for key, class_name in options.GRID_ENCODERS.items():
        assert type(encoders.get_encoder(key)).__name__ == class_name


def test_no_package_shadows_a_public_name_of_the_root():
    """`from fp16rl import train` must stay the function once the loop's package is imported: a subpackage
    named like a root attribute replaces it (Python sets the attribute when the submodule loads)."""
    import fp16rl
    import fp16rl.training.trainer  # noqa: F401  (the package of the loop)

    packages = {p.name for p in (ROOT / "src" / "fp16rl").iterdir() if (p / "__init__.py").is_file()}
    assert not packages & set(fp16rl.__all__)
    from fp16rl import train

    assert callable(train) and train.__module__ == "fp16rl.api"
