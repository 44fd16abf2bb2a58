"""Data-parallel training on torch.distributed (gloo, CPU, 2 processes launched by torchrun): the same
metrics as one process with the same global batch, ranks that stay identical, an overflow on one rank
skipping the step on both, a signal on one rank stopping both, and an exact resume at 2 ranks."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fp16rl.runs.checkpoint import checkpoint_dirs, read_trainer_state
from fp16rl.learner.distributed import DataParallel
from fp16rl.config.options import TrainConfig
from fp16rl.core.scores import Scores
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

WORKER = Path(__file__).with_name("distributed_worker.py")
BASE = dict(model_path="tiny", dataset_path="toy:digits", dtype="float32", learning_rate=2e-3, num_generations=4,
            prompts_per_step=4, max_completion_length=16, max_seq_length=256, beta=0.0, max_grad_norm=1.0,
            warmup_ratio=0.0, max_steps=3, save_steps=100, top_p=1.0, mask_truncated_completions=False, seed=0)


def launch(tmp_path: Path, name: str, ranks: int, **spec) -> tuple[Path, list[dict]]:
    """Run the worker with ``ranks`` processes (1: no torchrun); returns the run folder and rank reports."""
    run = tmp_path / name
    spec = {"report": str(tmp_path / f"{name}-report"), **spec}
    spec["config"] = {**BASE, "output_dir": str(run), **spec.get("config", {})}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks > 1 else [sys.executable])
    done = subprocess.run([*launcher, str(WORKER), str(path)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((Path(spec["report"]) / f"rank-{r}.json").read_text()) for r in range(ranks)]
    return run, reports


def one_process(run: Path, options: dict) -> Path:
    """The one-process reference, in this process (a subprocess would only add its start-up: the
    trainer is the same code; --fsdp is ignored at one rank)."""
    Trainer(TrainConfig(**{**BASE, "output_dir": str(run), **options})).train(show_progress=False)
    return run


def comparable(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
            for r in read_metrics(run / "metrics.jsonl")]


def assert_same_metrics(one: list[dict], two: list[dict], rel: float = 1e-5) -> None:
    assert len(one) == len(two) and one
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        differ = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=rel, abs_tol=rel)}
        assert not differ, f"step {a['step']}: {differ}"


def assert_ranks_identical(reports: list[dict]) -> None:
    for key in ("masters", "model", "adam", "scale", "skipped", "status"):
        assert len({r[key] for r in reports}) == 1, (key, reports)
    assert not any(r["wrapper_alive"] for r in reports), "DDP outlived the process group (gloo's teardown can hang)"


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    # LoRA (DDP over the adapters), bnpo over the whole batch, the batch's reward std, 2 forwards per micro-batch.
    dict(lora_r=8, lora_alpha=16, loss_type="bnpo", scale_rewards="batch", per_device_train_batch_size=4),
    # Full fine-tuning, dapo with 2 micro-batches, 2 optimizer steps per batch (pi_old from the sampled weights).
    dict(lora_r=0, loss_type="dapo", gradient_accumulation_steps=2, num_iterations=2),
    # The same sharded by FSDP2 (--fsdp; ignored by the one-process run), with the KL penalty's reference.
    dict(lora_r=0, loss_type="dapo", gradient_accumulation_steps=2, num_iterations=2, fsdp=True, beta=0.04),
    # FSDP2 with activation checkpointing: its shared-prompt forward recomputes each layer in backward.
    dict(lora_r=0, loss_type="dapo", fsdp=True, gradient_checkpointing=True),
    # Online DPO: pairs from the whole batch, the loss over every rank's pairs; DDP, then FSDP2.
    dict(lora_r=0, algorithm="online_dpo", gradient_accumulation_steps=2, per_device_train_batch_size=1),
    dict(lora_r=0, algorithm="online_dpo", dpo_loss_type="ipo", fsdp=True),
], ids=["lora-bnpo", "full-dapo-ga2", "fsdp-dapo-ga2-kl", "fsdp-checkpointing", "dpo-ga2-rows1", "dpo-ipo-fsdp"])
def test_two_ranks_match_one_process(tmp_path, tiny_path, options):
    single = one_process(tmp_path / "one", options)
    double, reports = launch(tmp_path, "two", 2, config=options)
    assert_same_metrics(comparable(single), comparable(double))
    assert_ranks_identical(reports)
    assert reports[0]["world_size"] == 2 and reports[0]["status"] == "finished"
    assert not (tmp_path / "two" / "rank-1").exists()
    samples = sorted(p.name for p in (double / "samples").iterdir())
    assert samples == sorted(p.name for p in (single / "samples").iterdir())  # rank 0 alone writes, once
    for name in samples:  # every rank's completions, gathered in rank order: the one process's records
        rows = [[(r["uid"], r["completion"], r["rewards"], r["reward"]) for r in map(json.loads, path.read_text()
                 .splitlines())] for path in (single / "samples" / name, double / "samples" / name)]
        assert rows[0] == rows[1] and len(rows[0]) == BASE["prompts_per_step"] * BASE["num_generations"], name


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_fp16_overflow_on_one_rank_skips_the_step_on_both(tmp_path, tiny_path, fsdp):
    """With FSDP each rank holds a shard of the gradient, so the overflow check itself is all-reduced
    (ShardedGradScaler); the reference copy stores the fp16 weights FSDP gathers, so kl_ref starts at 0."""
    run, reports = launch(tmp_path, "overflow", 2, overflow_step=2,
                          config=dict(lora_r=0, dtype="float16", loss_scale_growth_interval=1000, fsdp=fsdp, beta=0.04))
    records = read_metrics(run / "metrics.jsonl")
    assert records[0]["policy/kl_ref"] == 0.0
    assert [r["optim/step_skipped"] for r in records] == [0.0, 1.0, 0.0]
    assert records[1]["optim/loss_scale"] == records[0]["optim/loss_scale"] / 2
    assert_ranks_identical(reports)
    assert reports[0]["skipped"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(lora_r=8, lora_alpha=16), dict(lora_r=0, fsdp=True, dtype="float16")],
                         ids=["lora-ddp", "full-fsdp-fp16"])
def test_a_signal_on_one_rank_stops_both_and_resume_at_two_ranks_is_exact(tmp_path, tiny_path, options):
    """FSDP's checkpoint holds whole tensors in the one-process format: resume re-shards masters and moments."""
    options = dict(options, max_steps=4, save_steps=1)
    reference, _ = launch(tmp_path, "reference", 2, config=options)
    run, reports = launch(tmp_path, "run", 2, config=options, signal_step=2)
    assert [r["status"] for r in reports] == ["interrupted", "interrupted"]
    assert [p.name for p in checkpoint_dirs(run)] == ["step-1", "step-2"]  # both ranks finished step 2, then stopped
    assert read_trainer_state(run / "checkpoints" / "step-2")["world_size"] == 2
    _, resumed = launch(tmp_path, "run", 2, config={**options, "resume": True})
    assert_ranks_identical(resumed)
    assert comparable(run) == comparable(reference)  # bit-exact, not merely close


@pytest.mark.slow
def test_torchrun_cli_refusal_is_one_error_line(tmp_path, tiny_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "fp16rl", "train", "--model-path", "tiny", "--dataset-path", "toy:digits",
                           "--prompts-per-step", "3", "--max-steps", "1", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: --prompts-per-step 3 does not divide among 2 ranks; each rank owns whole prompt groups "
                      "(use a multiple of the number of ranks)"]
    assert not (tmp_path / "run").exists()


def test_one_process_collectives_are_the_identity():
    parallel = DataParallel()
    assert parallel.shard(6) == range(6) and parallel.sum([1, 2.5]) == [1.0, 2.5] and not parallel.any(False)
    scores = Scores(rewards=[1.0, 0.0], metrics={"code/ok_ratio": 0.5}, counts={"data/skipped_long_prompts": 1.0})
    assert Scores.merge([scores]) is scores


def test_scores_merge_exactly():
    left = Scores(rewards=[1.0, 0.0, 1.0], components={"f": [1.0, math.nan, 1.0]}, metrics={"code/ok_ratio": 2 / 3},
                  counts={"reward/f/errors": 1.0}, details=[{"i": 0}, {"i": 1}, {"i": 2}])
    right = Scores(rewards=[0.0], components={"f": [0.0]}, metrics={"code/ok_ratio": 0.0},
                   counts={"reward/f/errors": 2.0, "data/skipped_long_prompts": 1.0}, details=[{"i": 3}])
    merged = Scores.merge([left, right])
    assert merged.rewards == [1.0, 0.0, 1.0, 0.0] and [d["i"] for d in merged.details] == [0, 1, 2, 3]
    assert merged.metrics == {"code/ok_ratio": 0.5}  # 2 of 4, not the mean of 2/3 and 0
    assert merged.counts == {"reward/f/errors": 3.0, "data/skipped_long_prompts": 1.0}
    assert merged.components["f"][3] == 0.0 and math.isnan(merged.components["f"][1])


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_two_ranks(tmp_path, tiny_path):
    """``accelerate launch --multi_gpu`` starts the ranks as torchrun does (also on a CPU, with gloo): a 2-rank
    CLI run logs what one process logs. (``--cpu --num_processes 2`` would start one process: accelerate's
    CPU multi-process mode goes through MPI.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = ["train", "--model-path", "tiny", "--dataset-path", "toy:digits", "--dtype", "float32",
            "--prompts-per-step", "2", "--num-generations", "4", "--max-completion-length", "16", "--max-steps", "2",
            "--no-mask-truncated-completions", "--learning-rate", "2e-3", "--report-to", "none"]
    with socket.socket() as probe:  # accelerate's default port 29500 may be taken by a concurrent run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(port)]
    for name, launcher in (("one", [sys.executable, "-m", "fp16rl"]), ("two", [*accelerate, "-m", "fp16rl"])):
        done = subprocess.run([*launcher, *args, "--output-dir", str(tmp_path / name)], capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert_same_metrics(comparable(tmp_path / "one"), comparable(tmp_path / "two"))
