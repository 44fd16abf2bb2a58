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


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    """`make test` runs `--dist loadgroup` so that the tests sharing a costly session cache (the arc-lite warm
    model, 5-10 min on 2 busy cores) run on one worker and build it once. xdist groups them by appending
    ``@<group>`` to their node ids, which pytest 9.2 ignores (pytest-xdist#1386): the groups then split without
    a word and each worker builds the model. A scratch suite shows whether the installed pair still groups."""
    import subprocess
    import sys

    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this scratch suite's own settings, not the repo's
    (tmp_path / "test_grouped.py").write_text(
        "import os, pathlib, pytest\n"
        "def note(name): (pathlib.Path(__file__).parent / name).write_text(os.environ['PYTEST_XDIST_WORKER'])\n"
        + "".join(f"@pytest.mark.xdist_group('shared')\ndef test_g{i}(): note('g{i}.worker')\n" for i in range(4))
        + "".join(f"def test_free{i}(): note('free{i}.worker')\n" for i in range(4)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p",
                           "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]
    grouped = {path.read_text() for path in tmp_path.glob("g*.worker")}
    assert len(list(tmp_path.glob("*.worker"))) == 8 and grouped <= {"gw0", "gw1"}
    assert len(grouped) == 1, "the group ran on both workers: this pytest and pytest-xdist do not group (pytest-xdist#1386)"
