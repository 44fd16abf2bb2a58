"""Shared fixtures: an isolated $FP16RL_HOME and the tiny model written there once per session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist's workers ignore SIGINT (their controller handles Ctrl-C), and an ignored signal stays
    ignored in every process they start: the Ctrl-C tests' runs would never see theirs. Give the workers
    Python's usual handler, which their subprocesses then start with."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def fp16rl_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never read or write the user's model cache."""
    home = tmp_path_factory.mktemp("fp16rl_home")
    os.environ["FP16RL_HOME"] = str(home)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # One thread: tiny models gain nothing from two, and an oversubscribed machine slows 2 threads 10x+.
    torch.set_num_threads(1)
    return home


@pytest.fixture(scope="session")
def tiny_path(fp16rl_home: Path) -> Path:
    from fp16rl.model.loading import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path: Path):
    from fp16rl.model.loading import load_tokenizer

    return load_tokenizer(tiny_path)
