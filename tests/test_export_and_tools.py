"""Using the results: export to a Hugging Face folder, the perfectible filter, and --report-to trackers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from fp16rl.config.options import TrainConfig
from fp16rl.tools.perfectible import PerfectibleSettings, run_perfectible
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

from support import toy_config


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("lora_r,merge", [(0, False), (4, True), (4, False)])
def test_export_round_trip(tmp_path, lora_r, merge):
    """The exported folder loads with from_pretrained and computes the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from fp16rl.tools.export import export_checkpoint

    trainer = Trainer(toy_config(tmp_path / "run", lora_r=lora_r, lora_alpha=8, learning_rate=1e-2,
                                 max_steps=2, save_steps=2))
    trainer.train(show_progress=False)
    out = export_checkpoint(tmp_path / "run", tmp_path / "exported", merge=merge)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    trained = _logits(trainer.model, ids)  # fp32 run: the model computes with its fp32 masters
    if lora_r and not merge:
        from peft import PeftModel

        from fp16rl.model.loading import load_model

        assert (out / "adapter_config.json").is_file()
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        exported = PeftModel.from_pretrained(load_model(base), out)
    else:
        exported = AutoModelForCausalLM.from_pretrained(out)
    # Merging folds B @ A into W: the same function up to fp32 rounding.
    assert torch.allclose(_logits(exported, ids), trained, atol=1e-5 if not merge else 1e-4, rtol=0)
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(Exception, match="in use"):
        export_checkpoint(tmp_path / "run", out)


def test_perfectible_is_deterministic_resumable_and_trainable(tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym")
    import fp16rl.tools.perfectible as perfectible

    def settings(output: Path, batch: int) -> PerfectibleSettings:
        return PerfectibleSettings(model_path="tiny", dataset_path="reasoning-gym:basic_arithmetic",
                                   output=str(output), dataset_size=10, samples=3, keep=(0.0, 1.0),
                                   solved_threshold=0.01, batch_prompts=batch, dtype="float32",
                                   max_completion_length=12, max_seq_length=512)

    full = run_perfectible(settings(tmp_path / "full.jsonl", 4))
    assert full["rows"] == 10 and full["kept"] == 10  # the band [0, 1] keeps everything
    rows = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert {"prompt", "answer", "gym_entry", "pass_rate"} <= set(rows[0])
    # Interrupted after its first chunk, then resumed with another batching: the same file.
    evaluate = perfectible._evaluate
    calls = []

    def crash_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(perfectible, "_evaluate", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_perfectible(settings(tmp_path / "resumed.jsonl", 3))
    partial = tmp_path / "resumed.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 1 + 3  # the settings line and the first chunk's rows
    monkeypatch.setattr(perfectible, "_evaluate", evaluate)
    run_perfectible(settings(tmp_path / "resumed.jsonl", 3))
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    assert not partial.exists()
    # train reads what perfectible wrote.
    config = TrainConfig(model_path="tiny", dataset_path=str(tmp_path / "full.jsonl"), reward_funcs=["reasoning_gym"],
                         output_dir=str(tmp_path / "train"), dtype="float32", lora_r=0, num_generations=4,
                         max_completion_length=12, max_seq_length=512, max_steps=1)
    last = Trainer(config).train(show_progress=False)
    assert "reward/reasoning_gym/mean" in last


def test_report_to_every_tracker_gets_the_same_scalars_and_the_completions_table(tmp_path, monkeypatch):
    import importlib.util

    for package in ("wandb", "trackio", "mlflow"):  # not imported here: trackio reads TRACKIO_DIR on import
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    for name in ("WANDB_MODE", "TRACKIO_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    import wandb

    sent = []  # what reached wandb's own Run.log (offline files are read by its Go core, not Python)
    real_init = wandb.init

    def recording_init(**kwargs):
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda data, step=None: (sent.append((step, dict(data))), real_log(data, step=step))[1]
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    run = tmp_path / "run"
    Trainer(toy_config(run, max_steps=2, report_to=["tensorboard", "wandb", "trackio", "mlflow"])).train(
        show_progress=False)
    records = read_metrics(run / "metrics.jsonl")
    reward = [r["reward/mean"] for r in records]
    # MLflow: the file store inside the run folder.
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "fp16rl"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, (experiment, runs, list((run / "mlruns").rglob("meta.yaml")))
    mlrun = runs[0]
    history = client.get_metric_history(mlrun.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, reward[0]), (2, reward[1])]
    assert "mismatch/logp_abs_diff_mean" in mlrun.data.metrics
    _assert_completions_tables(run, client, mlrun.info.run_id, sent)
    sent = [(step, data) for step, data in sent if "completions" not in data]
    # W&B (offline): every step's scalars, under the same names, and the run's files in the run folder.
    assert [step for step, _ in sent] == [1, 2] and [data["reward/mean"] for _, data in sent] == reward
    assert set(sent[0][1]) == {k for k, v in records[0].items() if k != "step" and isinstance(v, float)}
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    # trackio: its local database inside the run folder.
    (database,) = list((run / "trackio").glob("*.db"))
    with sqlite3.connect(database) as connection:
        tables = [row[0] for row in connection.execute("select name from sqlite_master where type='table'")]
        text = " ".join(str(row) for table in tables for row in connection.execute(f'select * from "{table}"'))
        logged = [json.loads(value) for table in tables for row in connection.execute(f'select * from "{table}"')
                  for value in row if isinstance(value, bytes) and b'"completions"' in value]
    assert "reward/mean" in text and "mismatch/logp_abs_diff_mean" in text
    assert [entry["completions"]["_type"] for entry in logged] == ["trackio.table"] * 2  # steps 1 and 2
    assert [r["prompt"] for r in logged[1]["completions"]["_value"]] == [s["prompt"] for s in _samples(run, 2)]


def _samples(run: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (run / "samples" / f"step-{step:06d}.jsonl").read_text().splitlines()]


def _assert_completions_tables(run: Path, client, run_id: str, sent: list) -> None:
    """The completions table of each logged step (toy_config: steps 1 and 2) reached TensorBoard (as
    Markdown text), W&B (a Table) and MLflow (a JSON artifact), one row per completion of samples/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    columns = ["step", "prompt", "completion", "digits", "advantage"]  # the toy task's one reward function
    tables = [(step, data["completions"]) for step, data in sent if "completions" in data]
    assert [step for step, _ in tables] == [1, 2]
    for step, table in tables:
        samples = _samples(run, step)
        assert table.columns == columns and len(table.data) == len(samples) == 32
        assert [row[1:] for row in table.data] == [[s["prompt"], s["completion"], s["rewards"]["digits"],
                                                    s["advantage"]] for s in samples]
        stored = client.download_artifacts(run_id, f"completions/step-{step:06d}.json", str(run / "mlflow-read"))
        document = json.loads(Path(stored).read_text())
        assert document["columns"] == columns and len(document["data"]) == len(samples)
    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0}).Reload()
    texts = events.Tensors("completions/text_summary")
    assert [t.step for t in texts] == [1, 2]
    markdown = texts[0].tensor_proto.string_val[0].decode()
    assert markdown.startswith("| step | prompt | completion | digits | advantage |") and markdown.count("\n") == 33


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_merged_export_is_written_in_the_trained_dtype_with_usual_file_modes(tmp_path):
    """Issue 23: `export --merge` after fp16 training wrote the base's dtype, and safetensors files 0600."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fp16rl.tools.export import export_checkpoint

    Trainer(toy_config(tmp_path / "run", dtype="float16", lora_r=4, lora_alpha=8, max_steps=1, save_steps=1,
                       num_generations=2, prompts_per_step=2, max_completion_length=4)).train(show_progress=False)
    out = export_checkpoint(tmp_path / "run", tmp_path / "merged", merge=True)  # the tiny base is stored in fp32
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16
    usual = 0o666 & ~_umask()
    assert _modes(out) == {name: usual for name in _modes(out)} and "model.safetensors" in _modes(out)
    # --dtype chooses another; an adapter keeps its FP32 masters unless --dtype says otherwise.
    bf16 = export_checkpoint(tmp_path / "run", tmp_path / "bf16", merge=True, dtype="bf16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    for dtype, expected in ((None, torch.float32), ("fp16", torch.float16)):
        adapter = export_checkpoint(tmp_path / "run", tmp_path / f"adapter-{dtype}", dtype=dtype)
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
            assert {weights.get_tensor(k).dtype for k in weights.keys()} == {expected}
        assert set(_modes(adapter).values()) == {usual}
    with pytest.raises(Exception, match="--dtype: unknown dtype 'float8'"):
        export_checkpoint(tmp_path / "run", tmp_path / "bad", dtype="float8")
    assert not (tmp_path / "bad").exists()


def test_export_refuses_weights_beyond_float16():
    from fp16rl.core.errors import ConfigError
    from fp16rl.tools.export import _cast_checked

    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = 1e6
    with pytest.raises(ConfigError, match="weight weight does not fit float16 .largest .value. 1e.06."):
        _cast_checked(layer, torch.float16)
    assert layer.weight.dtype == torch.float32  # nothing was cast
    _cast_checked(layer, torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16


def test_metrics_file_writes_non_finite_values_as_json_null(tmp_path):
    """Issue 23: "nan"/"inf" strings made numeric columns text; null is what strict JSON readers accept."""
    import math

    import pandas as pd

    from fp16rl.training.trackers import RunTracker

    tracker = RunTracker(tmp_path / "run", report_to=["none"])
    tracker.log(1, {"optim/loss": float("nan"), "optim/grad_norm": float("inf"), "reward/mean": 0.5})
    tracker.log(2, {"optim/loss": 0.25, "optim/grad_norm": float("-inf"), "reward/mean": 0.75})
    tracker.close()
    path = tmp_path / "run" / "metrics.jsonl"

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    lines = [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]
    assert lines[0] == {"step": 1, "optim/loss": None, "optim/grad_norm": None, "reward/mean": 0.5}
    frame = pd.read_json(path, lines=True)
    assert frame["optim/loss"].dtype == float and math.isnan(frame["optim/loss"][0])
    assert frame["optim/loss"][1] == 0.25
    datasets = pytest.importorskip("datasets")
    rows = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert rows["optim/grad_norm"] == [None, None] and rows["reward/mean"] == [0.5, 0.75]
    # In Python every reader gets floats: null as NaN; the strings of older files as what they name.
    with path.open("a") as old:
        old.write(json.dumps({"step": 3, "optim/loss": "nan", "optim/grad_norm": "-inf", "reward/mean": "inf"}) + "\n")
    records = read_metrics(path)
    assert math.isnan(records[0]["optim/loss"]) and records[0]["reward/mean"] == 0.5
    assert math.isnan(records[2]["optim/loss"]) and records[2]["optim/grad_norm"] == -math.inf
    assert records[2]["reward/mean"] == math.inf
    assert records == read_metrics(path)  # NaN is one object: records with NaN at the same place compare equal
    # Resuming rewrites the kept records: an old file becomes strict JSON too.
    RunTracker(tmp_path / "run", resume_step=3, report_to=["none"]).close()
    assert [json.loads(line, parse_constant=refuse)["optim/grad_norm"] for line in path.read_text().splitlines()] \
        == [None, None, None]


def test_collapse_monitor_sees_a_logged_non_finite_loss_when_it_replays_the_file(tmp_path):
    from fp16rl.training.monitor import CollapseMonitor
    from fp16rl.training.trackers import RunTracker

    tracker = RunTracker(tmp_path / "run", report_to=["none"])
    tracker.log(1, {"optim/loss": float("nan"), "reward/mean": 0.5})
    tracker.close()
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert CollapseMonitor().update(record["step"], record).rule == "non_finite"


def test_console_names_only_the_trackers_in_use(tmp_path):
    """Issue 23: `--report-to none` (or mlflow only) still printed a tensorboard line."""
    from typer.testing import CliRunner

    from fp16rl.cli import app
    from fp16rl.training.trackers import output_lines

    run = tmp_path / "run"
    args = ["train", "--model-path", "tiny", "--dataset-path", "toy:digits", "--dtype", "float32", "--lora-r", "0",
            "--max-steps", "1", "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "4",
            "--output-dir", str(run), "--report-to", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"metrics:      {run / 'metrics.jsonl'}" in result.output
    assert "tensorboard" not in result.output and not (run / "tb").exists()
    assert [line.split(":")[0] for line in output_lines(run, ["tensorboard", "mlflow"])] == \
        ["metrics", "tensorboard", "mlflow", "samples", "checkpoints"]
    assert f"tensorboard --logdir {run / 'tb'}" in output_lines(run, ["tensorboard"])[1]
    assert not any("tensorboard" in line for line in output_lines(run, ["mlflow"]))


def test_progress_line_shows_skipped_steps_and_the_loss_scale():
    """Issue 23: skipped fp16 steps were not visible on the console."""
    import io

    from rich.console import Console

    from fp16rl.runs.tracking import ProgressDisplay, progress_stats

    healthy = {"reward/mean": 0.5, "optim/loss_scale": 65536.0, "optim/step_skipped": 0.0,
               "optim/skipped_steps_total": 0.0}
    assert "scale 65536" in progress_stats(healthy) and "skipped" not in progress_stats(healthy)
    overflow = {**healthy, "optim/loss_scale": 32768.0, "optim/step_skipped": 1.0, "optim/skipped_steps_total": 3.0}
    assert progress_stats(overflow).endswith("scale 32768  skipped 3 (this step)")
    later = {**overflow, "optim/step_skipped": 0.0}
    assert progress_stats(later).endswith("skipped 3")
    log = io.StringIO()  # not a terminal: one plain line per step
    import contextlib

    with contextlib.redirect_stderr(log), ProgressDisplay(10, 0, console=Console(file=io.StringIO())) as display:
        display.step(4, overflow)
    assert "train 4/10" in log.getvalue() and "skipped 3 (this step)" in log.getvalue()


def test_export_cli_refuses_an_unknown_dtype_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from fp16rl.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "out"),
                                      "--dtype", "float8"])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --dtype: unknown dtype 'float8'"), result.output
