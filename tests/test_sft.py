"""The supervised warm start: completion-only loss, it learns, saves a loadable HF folder, is
deterministic and cached; `fp16rl arc warmstart` prints paths and a train command that parses."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fp16rl.tools.sft as sft
from fp16rl.config.parse import parse_train_args
from fp16rl.model.loading import load_model, load_tokenizer
from fp16rl.tools.sft import IGNORE_INDEX, completion_loss, encode_pairs, read_warm_start_log, warm_start
from fp16rl.tasks.arc.lite import arc_lite_dataset
from fp16rl.tools.arc_lite import ArcLiteSettings, arc_lite_warm_model
from fp16rl.cli.arc import app
from fp16rl.tasks.arc.data import load_dataset
from fp16rl.tasks.arc.encoders import DigitEncoder
from fp16rl.tasks.arc.prompts import PromptTemplate
from fp16rl.tasks.arc.synthetic import generate_tasks, programs_path, sft_pairs

# Short prompts keep these tests to seconds; the arc-lite warm model uses the default template.
SHORT = PromptTemplate(system="Solve.", user="{examples}Test:\n{test_input}", example="In:\n{input}\nOut:\n{output}\n",
                       assistant_prefix="Code:")


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer) -> list[tuple[str, str]]:
    tasks, programs = generate_tasks(4, 0, 3, 3)
    return list(sft_pairs(tasks, programs, tiny_tokenizer, DigitEncoder(), SHORT))


def test_only_completion_and_eos_are_labelled(tiny_tokenizer, pairs) -> None:
    (ids, labels), = encode_pairs(tiny_tokenizer, pairs[:1])
    prompt_len = len(tiny_tokenizer(pairs[0][0], add_special_tokens=False)["input_ids"])
    assert len(ids) == len(labels) and labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and labels[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[prompt_len:-1]) == pairs[0][1]


def test_warm_start_lowers_the_loss_and_writes_a_loadable_model(tmp_path: Path, tiny_path: Path, tiny_tokenizer,
                                                                pairs) -> None:
    before = completion_loss(load_model(tiny_path), tiny_tokenizer, pairs)
    out = warm_start(tiny_path, pairs, tmp_path / "warm", steps=30, learning_rate=1e-2, batch_size=4, seed=0)
    model = load_model(out)
    after = completion_loss(model, load_tokenizer(out), pairs)
    assert after < 0.5 * before, (before, after)
    log = read_warm_start_log(out)
    assert len(log["losses"]) == 30 and log["losses"][-1] < log["losses"][0]
    assert model.config.hidden_size == load_model(tiny_path).config.hidden_size
    with pytest.raises(ValueError, match="not empty"):
        warm_start(tiny_path, pairs, out, steps=1)


def test_warm_start_is_deterministic(tmp_path: Path, tiny_path: Path, pairs) -> None:
    weights = []
    for name in ("a", "b"):
        out = warm_start(tiny_path, pairs, tmp_path / name, steps=4, batch_size=3, seed=7)
        weights.append(load_model(out).state_dict())
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_arc_lite_model_and_dataset_are_cached(fp16rl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ArcLiteSettings(num_tasks=2, steps=2, batch_size=2)
    first = arc_lite_warm_model(settings)
    assert first == fp16rl_home / "models" / settings.name and (first / "config.json").is_file()
    monkeypatch.setattr(sft, "warm_start", lambda *args, **kwargs: pytest.fail("the cached model was rebuilt"))
    assert arc_lite_warm_model(settings) == first
    data = arc_lite_dataset(num_tasks=3, seed=5)
    assert arc_lite_dataset(num_tasks=3, seed=5) == data
    assert len(load_dataset(str(data))) == 3 and programs_path(data).is_file()


def test_warmstart_cli_prints_paths_and_a_valid_train_command(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "warm"
    result = runner.invoke(app, ["warmstart", "--output", str(out), "--steps", "2", "--num-tasks", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert Path(lines["model"]) == out and (out / "config.json").is_file()
    assert Path(lines["dataset"]) == arc_lite_dataset()
    config = parse_train_args(shlex.split(lines["train"])[2:])
    assert (config.model_path, config.dataset_path) == (str(out), str(arc_lite_dataset()))
    assert config.grid_encoder == "digits" and config.use_data_augmentation is False and config.dtype == "float16"
    again = runner.invoke(app, ["warmstart", "--output", str(out), "--steps", "2"])
    assert again.exit_code == 2 and "not empty" in again.output
