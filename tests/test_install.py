"""The environment the suite runs in is the one constraints.txt pins (what `make` installs and CI tests)."""

import importlib.metadata
import re
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_installed_versions_are_the_pinned_ones():
    pins = _pins()
    assert {"torch", "transformers", "peft", "trl", "numpy"} <= set(pins)
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in importlib.metadata.distributions()}
    wrong = {name: (version, installed.get(name)) for name, version in pins.items()
             if installed.get(name, "").split("+")[0] != version}
    assert not wrong, f"installed versions differ from constraints.txt (run `make install`): {wrong}"


def test_torch_is_the_cpu_wheel_pinned_first():
    makefile = (CONSTRAINTS.parent / "Makefile").read_text()
    assert 'TORCH_VERSION ?= ' + _pins()["torch"] in makefile
    assert makefile.index('"torch==$(TORCH_VERSION)"') < makefile.index("-c constraints.txt -e")
