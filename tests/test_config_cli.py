"""Option parsing (both spellings, YAML, the seed command line) and the CLI's error contract."""

import shlex
import subprocess
import sys

import pytest

from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import parse_train_args
from fp16rl.core.errors import ConfigError

# The seed's command line (README, "The seed's bf16-vs-fp16 experiment"), variables expanded.
SEED_COMMAND = """
--dtype bfloat16 --beta 0.001 --no-load-in-4bit --reward-name arc-v2-no-pixel-score --num-generations 8
--gradient-accumulation-steps 1 --learning-rate 4e-6 --lora_r 1 --repetition-penalty 1.00 --epochs 1
--mask-truncated-completions --scale-rewards batch --gpu_memory_utilization 0.3 --warmup-ratio 0.001
--max-seq-length 9700 --max-completion-length 1024 --n-jobs 20 --model-path MODEL --dataset-path DATA
--output-dir OUT
"""


def test_seed_command_line_parses_with_same_meaning():
    config = parse_train_args(shlex.split(SEED_COMMAND))
    assert config.dtype == "bfloat16" and config.beta == 0.001 and config.load_in_4bit is False
    assert config.reward_name == "arc-v2-no-pixel-score" and config.num_generations == 8
    assert config.gradient_accumulation_steps == 1 and config.learning_rate == 4e-6 and config.lora_r == 1
    assert config.repetition_penalty == 1.0 and config.epochs == 1 and config.mask_truncated_completions is True
    assert config.scale_rewards == "batch" and config.gpu_memory_utilization == 0.3 and config.warmup_ratio == 0.001
    assert config.max_seq_length == 9700 and config.max_completion_length == 1024 and config.n_jobs == 20
    assert (config.model_path, config.dataset_path, config.output_dir) == ("MODEL", "DATA", "OUT")


def test_seed_command_line_accepts_the_memory_options():
    config = parse_train_args(shlex.split(SEED_COMMAND) + ["--gradient-checkpointing", "--per-device-train-batch-size",
                                                          "1", "--save-total-limit", "3"])
    assert config.gradient_checkpointing is True and config.per_device_train_batch_size == 1
    assert parse_train_args(shlex.split(SEED_COMMAND)).gradient_checkpointing is None  # automatic: on above 1B


@pytest.mark.parametrize("flag", ["--lora-r", "--lora_r"])
def test_both_spellings(flag):
    assert parse_train_args([flag, "3"]).lora_r == 3
    assert parse_train_args(["--no-mask_truncated_completions"]).mask_truncated_completions is False
    assert parse_train_args(["--lora-target-modules", "q_proj,v_proj"]).lora_target_modules == ["q_proj", "v_proj"]
    # TRL's spelling of a list (space-separated values) and the comma form mean the same.
    assert parse_train_args(["--lora-target-modules", "q_proj", "v_proj", "--lora-r", "2"]).lora_target_modules == \
        ["q_proj", "v_proj"]
    assert parse_train_args(["--report-to", "none"]).report_to == ["none"]


def test_yaml_then_flags_precedence(tmp_path):
    cfg = tmp_path / "base.yaml"
    cfg.write_text("dtype: float16\nlora-r: 8\nnum_generations: 6\nlora_target_modules: q_proj,k_proj\n")
    config = parse_train_args(["--config", str(cfg), "--lora_r", "2"])
    assert config.dtype == "float16" and config.num_generations == 6 and config.lora_r == 2
    assert config.lora_target_modules == ["q_proj", "k_proj"]


@pytest.mark.parametrize("content,match", [
    ("bogus_option: 1\n", "unknown option 'bogus_option'"),
    ("lora_r: many\n", "option 'lora_r' expects int"),
    ("- a\n- b\n", "must hold a mapping"),
    ("dtype: [\n", "not valid YAML"),
])
def test_bad_yaml_named(tmp_path, content, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        parse_train_args(["--config", str(cfg)])
    assert str(cfg) in str(err.value)


@pytest.mark.parametrize("argv,match", [
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--num-generations", "6", "--gradient-accumulation-steps", "4"], "divisible"),
    (["--max-completion-length", "4096", "--max-seq-length", "2048"], "max-completion-length"),
    (["--loss-type", "ppo"], "--loss-type must be one of grpo, bnpo, dapo, dr_grpo"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--lora-r", "0", "--load-in-4bit"], "needs LoRA"),
    (["--share-prompt-kv", "--sampler-engine", "hf"], "--share-prompt-kv needs the fast sampler engine"),
])
def test_bad_options_rejected(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_train_args(argv)


def test_resume_reuses_stored_options(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    import yaml

    stored = TrainConfig(output_dir=str(out), lora_r=5, dtype="bfloat16").to_dict()
    (out / "config.yaml").write_text(yaml.safe_dump({"config": stored}))
    config = parse_train_args(["--output-dir", str(out), "--resume", "--max-steps", "9"])
    assert config.lora_r == 5 and config.dtype == "bfloat16" and config.max_steps == 9 and config.resume


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fp16rl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("args,match", [
    (["--model-path", "/nonexistent/model"], "model path '/nonexistent/model' not found"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--dataset-path", "/nonexistent/tasks.json"], "/nonexistent/tasks.json"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, match):
    result = _cli("train", "--output-dir", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.stderr


def test_cli_refuses_output_dir_in_use(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = _cli("train", "--output-dir", str(out), "--max-steps", "1")
    assert result.returncode == 2 and "in use" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_cli_train_help_lists_both_spellings():
    result = _cli("train", "--help")
    assert result.returncode == 0
    assert "--lora-r" in result.stdout and "--lora_r" in result.stdout and "--mask-truncated-completions" in result.stdout
    assert "--share-prompt-kv" in result.stdout


def test_models_tiny_writes_loadable_folder(tmp_path):
    result = _cli("models", "tiny", "--output", str(tmp_path / "m"), "--arch", "qwen2")
    assert result.returncode == 0, result.stderr
    from fp16rl.model.loading import load_model, load_tokenizer

    model = load_model(tmp_path / "m")
    assert type(model).__name__ == "Qwen2ForCausalLM" and load_tokenizer(tmp_path / "m").chat_template
    again = _cli("models", "tiny", "--output", str(tmp_path / "m"))
    assert again.returncode == 2 and "not empty" in again.stderr
