"""Every user error through the CLI: exit 2, exactly one `error:` line naming the problem, no
traceback, and nothing written or changed on disk. One table, one workspace, one snapshot per case."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fp16rl.training.trainer import Trainer
from support import toy_config

GOOD_TASK = {"train": [{"input": [[1, 2]], "output": [[2, 1]]}], "test": [{"input": [[3, 4]], "output": [[4, 3]]}]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files every case can point at: good and bad configs, models, datasets and runs."""
    ws = tmp_path_factory.mktemp("bad_inputs")
    (ws / "good.yaml").write_text("dtype: float32\nlora_r: 0\n")
    (ws / "unknown_key.yaml").write_text("bogus_option: 1\n")
    (ws / "wrong_type.yaml").write_text("lora_r: many\n")
    (ws / "list.yaml").write_text("- a\n- b\n")
    (ws / "syntax.yaml").write_text("dtype: [\n")
    (ws / "latin1.yaml").write_bytes("arm: caf\xe9\n".encode("latin-1"))
    (ws / "nan_lr.yaml").write_text("learning_rate: .nan\n")
    (ws / "a_file").write_text("not a folder")
    (ws / "in_use").mkdir()
    (ws / "in_use" / "notes.txt").write_text("precious")
    (ws / "not_a_run").mkdir()
    (ws / "not_a_run" / "x.txt").write_text("x")
    (ws / "data_folder").mkdir()
    for name, config in (("broken_model", "{not json"), ("typeless_model", "{}")):
        (ws / name).mkdir()
        (ws / name / "config.json").write_text(config)
    (ws / "latin1_model").mkdir()
    (ws / "latin1_model" / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}')
    payload = json.dumps({"t1": GOOD_TASK}).encode()
    (ws / "truncated.json.gz").write_bytes(gzip.compress(payload)[:-12])
    (ws / "corrupt.json").write_bytes(payload[:-5])
    (ws / "good_task.json").write_bytes(payload)
    (ws / "latin1_program.py").write_bytes("def transform(grid):\n    return grid  # caf\xe9\n".encode("latin-1"))
    (ws / "latin1.json").write_bytes(payload.replace(b"t1", b"t\xe9"))
    bad_grid = {"t1": GOOD_TASK, "bad_task": {**GOOD_TASK, "train": [{"input": [[1, 12]], "output": [[1]]}]}}
    (ws / "bad_grid.json").write_text(json.dumps(bad_grid))
    # Prompt datasets and reward functions.
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 2 + 2?", "answer": "4"}]
    (ws / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "no_prompt.jsonl").write_text("".join(json.dumps({"question": r["prompt"]}) + "\n" for r in rows))
    (ws / "number_prompt.jsonl").write_text('{"prompt": 3}\n{"prompt": 4}\n')
    (ws / "null_prompt.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": null}\n')
    (ws / "empty.jsonl").write_text("")
    (ws / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (ws / "latin1.jsonl").write_bytes('{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (ws / "blank.jsonl").write_text("\n  \n")
    (ws / "scalars.jsonl").write_text('{"prompt": "a"}\n"b"\n')
    (ws / "broken_list.json").write_text('[{"prompt": "a"},\n {"prompt": }]')
    (ws / "empty_list.json").write_text("[]")
    (ws / "latin1.csv").write_bytes("prompt,answer\nWhat is 1 + 1?,2\ncaf\xe9,3\n".encode("latin-1"))
    (ws / "garbage.parquet").write_bytes(b"PAR1 not really a parquet file")
    (ws / "rows.txt").write_text("What is 1 + 1?\n")
    (ws / "no_prompt.csv").write_text("question,answer\nWhat is 1 + 1?,2\n")
    (ws / "rewards.py").write_text('''
def fine(completions, **kwargs):
    return [0.0] * len(completions)

def narrow(completions):
    return [0.0] * len(completions)

NOT_A_FUNCTION = 3
''')
    (ws / "syntax_error.py").write_text("def f(:\n")
    # A run on a prompt dataset as far as its options go (the reward check comes before the checkpoint's).
    (ws / "prompt_run").mkdir()
    (ws / "prompt_run" / "config.yaml").write_text(f"config:\n  dataset_path: {ws / 'good.jsonl'}\n"
                                                   "  reward_funcs: [math]\n")
    # A real run (2 steps, a checkpoint each) and corrupted copies of it.
    Trainer(toy_config(ws / "run", max_steps=2, save_steps=1)).train(show_progress=False)
    for name in ("run_bad_ckpt", "run_bad_metrics", "run_no_metrics"):
        shutil.copytree(ws / "run", ws / name)
    weights = ws / "run_bad_ckpt" / "checkpoints" / "step-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    metrics = ws / "run_bad_metrics" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["{garbage", *lines[1:]]) + "\n")
    (ws / "run_no_metrics" / "metrics.jsonl").unlink()
    return ws


# (arguments after `fp16rl`, a fragment the one error line must contain); {ws} is the workspace.
CASES = [
    # configuration files
    (["train", "--config", "{ws}/unknown_key.yaml"], "unknown option 'bogus_option'"),
    (["train", "--config", "{ws}/wrong_type.yaml"], "option 'lora_r' expects int, got 'many'"),
    (["train", "--config", "{ws}/list.yaml"], "must hold a mapping"),
    (["train", "--config", "{ws}/syntax.yaml"], "is not valid YAML"),
    (["train", "--config", "{ws}/latin1.yaml"], "latin1.yaml is not UTF-8 text"),
    (["train", "--config", "{ws}/missing.yaml"], "missing.yaml not found"),
    (["train", "--config", "{ws}/nan_lr.yaml"], "--learning-rate must be a finite number"),
    # values and ranges
    (["train", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["train", "--learning-rate", "-1"], "--learning-rate must be > 0"),
    (["train", "--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["train", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["train", "--temperature", "0"], "--temperature must be > 0"),
    (["train", "--repetition-penalty", "-1"], "--repetition-penalty must be > 0"),
    (["train", "--num-generations", "1"], "--num-generations must be >= 2"),
    (["train", "--seed", "-1"], "--seed must be >= 0"),
    (["train", "--epochs", "0"], "--epochs must be > 0"),
    (["train", "--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1]"),
    (["train", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["train", "--loss-type", "ppo"], "--loss-type must be one of grpo, bnpo, dapo, dr_grpo"),
    (["train", "--sampler-engine", "turbo"], "--sampler-engine must be one of auto, fast, hf"),
    (["train", "--lora-r", "abc"], "argument --lora-r/--lora_r: invalid int value: 'abc'"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["train", "--grid-encoder", "braille"], "unknown grid encoder 'braille'"),
    # options that cannot go together
    (["train", "--is-clip-min", "3", "--is-clip-max", "2"], "--is-clip-min (3.0) must be smaller than --is-clip-max"),
    (["train", "--num-generations", "6", "--gradient-accumulation-steps", "4"], "must be divisible by"),
    (["train", "--max-completion-length", "4096", "--max-seq-length", "2048"], "to leave room for the prompt"),
    (["train", "--lora-r", "0", "--load-in-4bit"], "--load-in-4bit needs LoRA"),
    (["train", "--reward-name", "arc-v1"], "--reward-name cannot be used with --dataset-path toy:digits"),
    (["train", "--dataset-path", "{ws}/bad_grid.json", "--reward-name", "nonsense"], "reward 'nonsense' is unknown"),
    # models
    (["train", "--model-path", "{ws}/no_model"], "no_model' not found"),
    (["train", "--model-path", "{ws}/a_file"], "is a file; pass the model's folder"),
    (["train", "--model-path", "{ws}/broken_model"], "broken_model/config.json is not valid JSON"),
    (["train", "--model-path", "{ws}/typeless_model"], "has no \"model_type\""),
    (["train", "--model-path", "{ws}/latin1_model"], "latin1_model/config.json is not UTF-8 text"),
    # datasets
    (["train", "--dataset-path", "toy:letters"], "unknown toy task 'toy:letters'"),
    (["train", "--dataset-path", "{ws}/no_data.json"], "no_data.json: file not found"),
    (["train", "--dataset-path", "{ws}/data_folder"], "data_folder is a folder"),
    (["train", "--dataset-path", "{ws}/truncated.json.gz"], "truncated.json.gz: not valid gzipped JSON"),
    (["train", "--dataset-path", "{ws}/corrupt.json"], "corrupt.json: not valid JSON"),
    (["train", "--dataset-path", "{ws}/latin1.json"], "latin1.json: not valid JSON"),
    (["train", "--dataset-path", "{ws}/bad_grid.json"], "task 'bad_task'"),
    # prompt datasets
    (["train", "--dataset-path", "{ws}/no_prompt.jsonl", "--reward-funcs", "math"],
     "no_prompt.jsonl: no column 'prompt' (columns: question)"),
    (["train", "--dataset-path", "{ws}/no_prompt.csv", "--reward-funcs", "math"], "no column 'prompt'"),
    (["train", "--dataset-path", "{ws}/number_prompt.jsonl", "--reward-funcs", "math"],
     "column 'prompt': holds int64, expected text or a list of chat messages"),
    (["train", "--dataset-path", "{ws}/null_prompt.jsonl", "--reward-funcs", "math"],
     "null_prompt.jsonl, row 2, column 'prompt': empty or missing prompt"),
    (["train", "--dataset-path", "{ws}/empty.jsonl", "--reward-funcs", "math"], "empty.jsonl: holds no rows"),
    (["train", "--dataset-path", "{ws}/blank.jsonl", "--reward-funcs", "math"], "blank.jsonl: holds no rows"),
    (["train", "--dataset-path", "{ws}/broken.jsonl", "--reward-funcs", "math"],
     "broken.jsonl: line 2, column 12: not valid JSON"),
    (["train", "--dataset-path", "{ws}/latin1.jsonl", "--reward-funcs", "math"],
     "latin1.jsonl: line 2 is not UTF-8 text (byte 16 of the line is 0xe9)"),
    (["train", "--dataset-path", "{ws}/scalars.jsonl", "--reward-funcs", "math"],
     "scalars.jsonl: line 2 holds a JSON str, not an object of columns"),
    (["train", "--dataset-path", "{ws}/broken_list.json", "--reward-funcs", "math"],
     "broken_list.json: line 2, column 13: not valid JSON"),
    (["train", "--dataset-path", "{ws}/empty_list.json", "--reward-funcs", "math"], "empty_list.json: holds no rows"),
    (["train", "--dataset-path", "{ws}/latin1.csv", "--reward-funcs", "math"], "latin1.csv: line 3 is not UTF-8 text"),
    (["train", "--dataset-path", "{ws}/garbage.parquet", "--reward-funcs", "math"],
     "garbage.parquet: cannot read it as parquet"),
    (["train", "--dataset-path", "{ws}/rows.txt", "--reward-funcs", "math"],
     "unknown kind of file; --dataset-path accepts: JSON Lines"),
    (["train", "--dataset-path", "reasoning-gym:basic_arithmetics"], "no such reasoning-gym dataset"),
    (["train", "--dataset-path", "{ws}/good.jsonl"], "say how completions score with --reward-funcs"),
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "math", "--dataset-size", "5"],
     "--dataset-size only apply to procedural datasets"),
    (["train", "--dataset-path", "{ws}/bad_grid.json", "--prompt-column", "question"],
     "--prompt-column cannot be used with ARC data"),
    (["train", "--reward-funcs", "math"], "--reward-funcs cannot be used with --dataset-path toy:digits"),
    # reward functions
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "no_such_module_xyz:f"],
     "cannot import no_such_module_xyz"),
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "{ws}/rewards.py:missing"],
     "rewards.py has no 'missing'"),
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "{ws}/nowhere.py:f"], "nowhere.py not found"),
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "{ws}/syntax_error.py:f"], "SyntaxError"),
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "{ws}/rewards.py:NOT_A_FUNCTION"],
     "'NOT_A_FUNCTION' is not callable"),
    # (A function that raises or returns bad values fails on the first real batch, not before the run:
    # tests/test_trl_rewards.py. Its signature is checked before, without a call.)
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "{ws}/rewards.py:narrow"],
     "reward function 'narrow' cannot be called as TRL calls reward functions"),
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "{ws}/rewards.py:fine,math",
      "--reward-weights", "1"], "--reward-weights has 1 values for 2 --reward-funcs"),
    (["train", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "math", "--reward-name", "math"],
     "--reward-name and --reward-funcs both given"),
    (["train", "--report-to", "tensorboard,neptune"], "--report-to must be 'none' or some of"),
    (["data", "perfectible", "--model-path", "tiny", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "math",
      "--keep", "0.9,0.1", "--output", "{ws}/kept.jsonl"], "--keep must be LOW,HIGH"),
    (["data", "perfectible", "--model-path", "tiny", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "math",
      "--output", "{ws}/good.jsonl"], "exists; choose another file"),
    (["data", "perfectible", "--model-path", "tiny", "--dataset-path", "{ws}/good.jsonl", "--reward-funcs", "math",
      "--solved-threshold", "nan", "--output", "{ws}/kept.jsonl"], "--solved-threshold must be a finite number, got nan"),
    (["export", "{ws}/not_a_run", "--output", "{ws}/exported"], "neither a run folder with checkpoints"),
    (["export", "{ws}/run", "--output", "{ws}/in_use"], "is in use (not empty)"),
    # output folders and resuming
    (["train", "--output-dir", "{ws}/a_file"], "exists and is a file"),
    (["train", "--output-dir", "{ws}/in_use"], "is in use (not empty)"),
    (["train", "--output-dir", "{ws}/not_a_run", "--resume"], "not an fp16rl run"),
    (["train", "--output-dir", "{ws}/never_ran", "--resume"], "never_ran/config.yaml not found"),
    (["train", "--output-dir", "{ws}/run", "--resume", "--dtype", "bfloat16"],
     "started with dtype=float32, this call asks for --dtype bfloat16"),
    (["train", "--output-dir", "{ws}/run", "--resume", "--lora-r", "4"], "started with lora_r=0"),
    (["train", "--output-dir", "{ws}/prompt_run", "--resume", "--reward-funcs", "math_format"],
     "was started with the rewards math (weight 1), this call asks for math_format (weight 1)"),
    (["train", "--output-dir", "{ws}/prompt_run", "--resume", "--reward-weights", "0.5"],
     "was started with the rewards math (weight 1), this call asks for math (weight 0.5)"),
    (["train", "--output-dir", "{ws}/prompt_run", "--resume", "--reward-weights", "1"],  # the same rewards
     "prompt_run holds no checkpoint to resume from; move it away"),
    (["train", "--output-dir", "{ws}/run_bad_ckpt", "--resume"],
     "step-2 is corrupt: trainable.safetensors has"),
    (["train", "--output-dir", "{ws}/run_bad_metrics", "--resume"], "metrics.jsonl is corrupt: line 1"),
    (["train", "--output-dir", "{ws}/run_no_metrics", "--resume"], "metrics.jsonl is missing"),
    # other commands share the contract
    (["compare", "--config", "{ws}/good.yaml", "--arms", "dtype=float9", "--seeds", "0", "--output-dir",
      "{ws}/cmp"], "unknown dtype 'float9'"),
    (["compare", "--config", "{ws}/good.yaml", "--arms", "dtype=float16", "--seeds", "0,1,0", "--output-dir",
      "{ws}/cmp"], "--seeds lists seed 0 more than once"),
    (["compare", "--config", "{ws}/good.yaml", "--arms", "dtype=float16", "--parallel", "0", "--output-dir",
      "{ws}/cmp"], "--parallel must be >= 1, got 0"),
    (["report", "{ws}/not_a_run", "-o", "{ws}/report_out"], "not_a_run"),
    (["arc", "run-code", "{ws}/latin1_program.py", "--dataset-path", "{ws}/good_task.json", "--task-id", "t1"],
     "latin1_program.py is not UTF-8 text"),
    (["arc", "run-code", "{ws}/data_folder", "--dataset-path", "{ws}/good_task.json", "--task-id", "t1"],
     "data_folder is a folder; pass the program's file"),
    (["arc", "run-code", "{ws}/latin1_program.py", "--dataset-path", "{ws}/good_task.json", "--task-id", "t1",
      "--memory-limit-mb", "8"], "--memory-limit-mb must be >= 64, got 8"),
    (["arc", "run-code", "{ws}/latin1_program.py", "--dataset-path", "{ws}/good_task.json", "--task-id", "t1",
      "--timeout", "-1"], "--timeout must be in (0, 3600] seconds, got -1.0"),
    (["arc", "synth", "--output", "{ws}/synth.json", "--num-tasks", "2", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["arc", "synth", "--output", "{ws}/synth.json", "--num-tasks", "2", "--seed", "0", "--max-side", "99"],
     "--max-side must be in [--min-side (3), 30], got 99"),
    (["arc", "warmstart", "--steps", "0"], "--steps must be >= 1, got 0"),
    # click's usage errors (typer parses every command but train): the same one line, not click's framed box
    (["report", "--bogus"], "error: fp16rl report: No such option: --bogus (see `fp16rl report --help`)"),
    (["report", "{ws}/run", "--margin", "abc"], "fp16rl report: Invalid value for '--margin'"),
    (["export"], "fp16rl export: Missing argument 'checkpoint'"),
    (["nosuchcmd"], "fp16rl: No such command 'nosuchcmd'"),
    (["compare", "--seeds"], "Option '--seeds' requires an argument"),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size, mtime and content hash."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(root))] = (digest, stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return state


@pytest.mark.parametrize("args,fragment", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line_and_changes_nothing(workspace, args, fragment):
    argv = [a.replace("{ws}", str(workspace)) for a in args]
    if argv[0] == "train" and "--output-dir" not in argv:
        argv += ["--output-dir", str(workspace / "new_run")]
    before = _snapshot(workspace)
    result = subprocess.run([sys.executable, "-m", "fp16rl.cli", *argv], capture_output=True, text=True,
                            cwd=workspace, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment.replace("{ws}", str(workspace)) in lines[0], lines[0]
    assert _snapshot(workspace) == before  # nothing written, nothing changed

