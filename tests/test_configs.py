"""configs/ holds the README's experiments; they parse, validate and stay the ones the README shows."""

import re
import shlex
from pathlib import Path

import pytest

from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import load_yaml_options, parse_train_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_validates(path):
    options = load_yaml_options(path)
    TrainConfig(**options).validate()
    assert f"configs/{path.name}" in README, f"{path.name} is not shown in the README"


def test_every_config_the_readme_names_exists():
    named = set(re.findall(r"configs/([\w.-]+\.yaml)", README))
    assert named and named == {p.name for p in CONFIGS}


def test_toy_config_is_the_readme_command_line():
    block = README[README.index("# the same with flags:"):]
    command = block[block.index("fp16rl train"):block.index("\n\n")].replace("\\\n", " ")
    from_flags = parse_train_args(shlex.split(command)[2:])
    from_yaml = parse_train_args(["--config", str(ROOT / "configs" / "toy-fp16.yaml"), "--output-dir", "runs/toy"])
    assert {**from_flags.to_dict(), "config": None} == {**from_yaml.to_dict(), "config": None}
