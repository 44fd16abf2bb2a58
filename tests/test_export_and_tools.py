"""Using the results: export to a Hugging Face folder, the perfectible filter, and --report-to trackers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from fp16rl.config import TrainConfig
from fp16rl.perfectible import PerfectibleSettings, run_perfectible
from fp16rl.tracking import read_metrics
from fp16rl.trainer import Trainer

from support import toy_config


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("lora_r,merge", [(0, False), (4, True), (4, False)])
def test_export_round_trip(tmp_path, lora_r, merge):
    """The exported folder loads with from_pretrained and computes the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from fp16rl.export import export_checkpoint

    trainer = Trainer(toy_config(tmp_path / "run", lora_r=lora_r, lora_alpha=8, learning_rate=1e-2,
                                 max_steps=2, save_steps=2))
    trainer.train(show_progress=False)
    out = export_checkpoint(tmp_path / "run", tmp_path / "exported", merge=merge)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    trained = _logits(trainer.model, ids)  # fp32 run: the model computes with its fp32 masters
    if lora_r and not merge:
        from peft import PeftModel

        from fp16rl.models import load_model

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
    import fp16rl.perfectible as perfectible

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


def test_report_to_every_tracker_gets_the_same_scalars(tmp_path, monkeypatch):
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
    # W&B (offline): every step's scalars, under the same names, and the run's files in the run folder.
    assert [step for step, _ in sent] == [1, 2] and [data["reward/mean"] for _, data in sent] == reward
    assert set(sent[0][1]) == {k for k, v in records[0].items() if k != "step" and isinstance(v, float)}
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    # trackio: its local database inside the run folder.
    (database,) = list((run / "trackio").glob("*.db"))
    with sqlite3.connect(database) as connection:
        tables = [row[0] for row in connection.execute("select name from sqlite_master where type='table'")]
        text = " ".join(str(row) for table in tables for row in connection.execute(f'select * from "{table}"'))
    assert "reward/mean" in text and "mismatch/logp_abs_diff_mean" in text
