"""TRL's entry point (issue 27, parts 1 and 2): ``from fp16rl import GRPOTrainer, GRPOConfig``, every TRL
field classified, the converters of each mapped group, TRL names on the command line and in YAML, and
scripts from TRL's GRPOTrainer documentation with only the import line changed (tiny model, 1-2 steps)."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fp16rl.config.parse import parse_train_args
from fp16rl.config.trl_fields import DEFAULT_ONLY, GRPO_CONFIG_NAMES, HONOURED, IGNORED, MAPPED, TRL_FIELDS
from fp16rl.config.trl_names import translate
from fp16rl.core.errors import ConfigError, DatasetError
from fp16rl.runs.tracking import read_metrics

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "trl"
FAST = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
            logging_steps=1, bf16=False, use_cpu=True, learning_rate=1e-3, gradient_checkpointing=False)


def _trl_dataclass_fields(cls: type) -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}


def test_every_trl_grpo_config_field_is_classified_with_trl_default():
    """A TRL upgrade that adds or changes a field fails here until the table says what it becomes."""
    trl = pytest.importorskip("trl")
    fields = _trl_dataclass_fields(trl.GRPOConfig)
    for name, default in fields.items():
        assert name in TRL_FIELDS, f"trl.GRPOConfig.{name} is not classified in fp16rl.config.trl_fields"
        row = TRL_FIELDS[name]
        assert row.kind in (HONOURED, MAPPED, DEFAULT_ONLY, IGNORED)
        assert row.default == default, f"{name}: TRL's default is {default!r}, the table says {row.default!r}"
        assert row.kind == HONOURED or row.note, f"{name} needs a note (difference, refusal or reason)"
    assert set(fields) <= set(GRPO_CONFIG_NAMES)
    for cls in (trl.ModelConfig, trl.ScriptArguments, trl.DatasetMixtureConfig):
        for name, default in _trl_dataclass_fields(cls).items():
            assert name in TRL_FIELDS and TRL_FIELDS[name].default == default, name


def test_fp16rl_grpo_config_has_trl_fields_and_defaults():
    from fp16rl import GRPOConfig

    names = [f.name for f in dataclasses.fields(GRPOConfig)]
    assert names[0] == "output_dir" and set(names) == set(GRPO_CONFIG_NAMES)
    config = GRPOConfig("out")  # positional output_dir, as TRL's
    assert (config.output_dir, config.learning_rate, config.loss_type, config.num_generations) == \
        ("out", 1e-6, "dapo", 8)


def test_default_only_and_unsupported_fields_are_refused_with_one_line():
    from fp16rl import GRPOConfig

    for kwargs, words in (({"use_vllm": True}, "use_vllm=True: not supported"),
                          ({"deepspeed": "zero3.json"}, "--fsdp"), ({"loss_type": "cispo"}, "not supported"),
                          ({"push_to_hub": True}, "export"), ({"optim": "sgd"}, "AdamW"),
                          ({"bf16": True, "fp16": True}, "one precision")):
        with pytest.raises(ConfigError) as err:
            GRPOConfig(**kwargs)
        assert words in str(err.value) and "\n" not in str(err.value)
    GRPOConfig(use_vllm=False, log_level="info", vllm_server_port=9000)  # default, or ignored: accepted


def test_batch_sizes_become_prompts_per_step():
    """per_device x world x accumulation completions per optimizer step; / num_generations prompts."""
    out = translate({"per_device_train_batch_size": 6, "gradient_accumulation_steps": 2, "num_generations": 4})
    assert (out.options["prompts_per_step"], out.options["gradient_accumulation_steps"],
            out.options["num_generations"]) == (3, 2, 4)
    assert translate({"per_device_train_batch_size": 4, "num_generations": 4}, world_size=2).options[
        "prompts_per_step"] == 2
    assert translate({"generation_batch_size": 8}).options["prompts_per_step"] == 1
    for bad in ({"per_device_train_batch_size": 6, "num_generations": 4}, {"steps_per_generation": 2},
                {"generation_batch_size": 16}):
        with pytest.raises(ConfigError):
            translate(bad)


def test_dtype_from_bf16_and_fp16():
    assert translate({}).options["dtype"] == "bfloat16"  # TRL: bf16 unless fp16
    assert translate({"fp16": True}).options["dtype"] == "float16"
    assert translate({"bf16": False}).options["dtype"] == "float32"
    from fp16rl import GRPOConfig, GRPOTrainer  # GRPOConfig(bf16=False) too: False is not bf16's None

    trainer = GRPOTrainer("tiny", reward_funcs=len, train_dataset=[{"prompt": "x"}],
                          args=GRPOConfig(output_dir="unused", bf16=False))
    assert trainer._translation.options["dtype"] == "float32"
    assert translate({"fp16": True, "dtype": "float16"}).options["dtype"] == "float16"
    with pytest.raises(ConfigError, match="training precision"):
        translate({"fp16": True, "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="training precision"):
        translate({"model_init_kwargs": {"torch_dtype": "bfloat16"}, "fp16": True})


def test_vllm_importance_sampling_is_the_is_correction():
    out = translate({}).options
    assert (out["is_correction"], out["is_clip_max"], out["is_clip_min"], out["is_reference"]) == \
        ("sequence_mask", 3.0, 0.0, "behaviour")
    out = translate({"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_cap": 2.0,
                     "vllm_importance_sampling_clip_min": 0.5}).options
    assert (out["is_correction"], out["is_clip_max"], out["is_clip_min"]) == ("token_truncate", 2.0, 0.5)
    assert translate({"vllm_importance_sampling_correction": False}).options["is_correction"] == "none"


def test_schedule_logging_and_saving_in_optimizer_steps():
    out = translate({"max_steps": 10, "num_iterations": 2, "save_steps": 5, "logging_steps": 3,
                     "warmup_steps": 2, "lr_scheduler_type": "cosine", "report_to": ["tensorboard"],
                     "seed": 7, "num_train_epochs": 2}).options
    assert (out["max_steps"], out["num_iterations"], out["save_steps"], out["save_samples_steps"]) == (5, 2, 3, 2)
    assert (out["warmup_ratio"], out["lr_scheduler_type"], out["report_to"], out["seed"], out["epochs"]) == \
        (0.2, "cosine", ["tensorboard"], 7, 2)
    assert translate({"warmup_steps": 0.1}).options["warmup_ratio"] == 0.1
    assert translate({"output_dir": None}).options["output_dir"] == "trainer_output"
    for bad in ({"max_steps": 3, "num_iterations": 2}, {"warmup_steps": 5}, {"report_to": "all"},
                {"logging_steps": 0.1}):
        with pytest.raises(ConfigError):
            translate(bad)


def test_generation_and_loss_fields():
    out = translate({"temperature": 0.7, "top_p": 0.9, "top_k": None, "repetition_penalty": 1.1,
                     "max_completion_length": 64, "max_prompt_length": 100, "mask_truncated_completions": True,
                     "scale_rewards": False, "beta": 0.04, "epsilon_high": 0.28, "reward_weights": [1, 2],
                     "importance_sampling_level": "sequence", "loss_type": "grpo"}).options
    assert (out["temperature"], out["top_p"], out["top_k"], out["repetition_penalty"]) == (0.7, 0.9, 0, 1.1)
    assert (out["max_completion_length"], out["max_seq_length"], out["mask_truncated_completions"]) == (64, 164, True)
    assert (out["scale_rewards"], out["beta"], out["epsilon_high"], out["reward_weights"]) == ("none", 0.04, 0.28,
                                                                                               [1, 2])
    assert (out["importance_sampling_level"], out["loss_type"]) == ("sequence", "grpo")


def test_lora_from_model_config_names_and_peft_config():
    assert translate({}).options["lora_r"] == 0  # no peft: full fine-tuning, as TRL
    out = translate({"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj"]}).options
    assert (out["lora_r"], out["lora_alpha"], out["use_rslora"], out["lora_target_modules"]) == (8, 16, False,
                                                                                                ["q_proj"])
    peft = pytest.importorskip("peft")
    from fp16rl.trl_api import _peft_options

    options = _peft_options(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["v_proj", "q_proj"],
                                            task_type="CAUSAL_LM"))
    assert translate(options).options["lora_target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="use_dora"):
        _peft_options(peft.LoraConfig(use_dora=True))


def test_trl_yaml_runs_through_the_cli_parser(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("model_name_or_path: tiny\ndataset_name: data.jsonl\nper_device_train_batch_size: 8\n"
                    "num_generations: 4\nbf16: false\nfp16: true\nmax_prompt_length: 128\nmax_completion_length: 32\n"
                    "max_steps: 2\nreward_funcs: [my_rewards.length_reward]\nlog_level: info\nuse_vllm: false\n")
    config = parse_train_args(["--config", str(path), "--output-dir", str(tmp_path / "run")])
    assert (config.model_path, config.dataset_path, config.prompts_per_step, config.dtype, config.max_seq_length,
            config.reward_funcs, config.lora_r) == ("tiny", "data.jsonl", 2, "float16", 160,
                                                    ["my_rewards:length_reward"], 0)
    # fp16rl's own names still work and win over TRL's defaults; the command line wins over the file
    assert parse_train_args(["--config", str(path), "--lora-r", "4", "--prompts-per-step", "3"]).prompts_per_step == 3
    with pytest.raises(ConfigError, match="both set epochs"):
        parse_train_args(["--bf16", "--num_train_epochs", "2", "--epochs", "3"])
    with pytest.raises(ConfigError, match="training precision"):  # in a TRL call, dtype is ModelConfig's
        parse_train_args(["--bf16", "--dtype", "float16"])
    with pytest.raises(ConfigError, match="use_vllm"):
        parse_train_args(["--model_name_or_path", "tiny", "--use_vllm", "true"])


def test_per_device_train_batch_size_meaning_follows_the_call():
    """fp16rl's memory bound in an fp16rl call; TRL's batch once a TRL-only name is used."""
    assert parse_train_args(["--per-device-train-batch-size", "2"]).per_device_train_batch_size == 2
    config = parse_train_args(["--per_device_train_batch_size", "8", "--num_generations", "4", "--fp16"])
    assert (config.prompts_per_step, config.per_device_train_batch_size) == (2, None)


def test_trl_quickstart_with_the_import_changed(tmp_path, fp16rl_home):
    """TRL's quickstart: a prompt dataset and a length reward; train, save_model."""
    from fp16rl import GRPOConfig, GRPOTrainer

    dataset = [{"prompt": f"Write about {w}."} for w in ("cats", "dogs", "rain", "tea")]

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    seen = []

    class Recorder:  # a TrainerCallback-shaped object
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((state.global_step, "reward/mean" in logs))

    args = GRPOConfig(output_dir=str(tmp_path / "run"), **FAST)
    trainer = GRPOTrainer(model="tiny", reward_funcs=reward_len, args=args, train_dataset=dataset,
                          callbacks=[Recorder()])
    output = trainer.train()
    assert output.global_step == 2 and seen == [(1, True), (2, True)]
    saved = trainer.save_model()
    assert saved == tmp_path / "run" / "model" and (saved / "config.json").is_file()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_trl_reward_with_extra_columns_and_conversational_data(tmp_path, fp16rl_home):
    """TRL's reward-function examples: a column reaches the reward as a keyword; chat prompts arrive as
    messages and completions as assistant turns; LoRA from a peft LoraConfig."""
    datasets = pytest.importorskip("datasets")
    peft = pytest.importorskip("peft")
    from fp16rl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "ground_truth": str(2 * i)}
            for i in range(4)]
    calls = []

    def correct(prompts, completions, ground_truth, **kwargs):
        calls.append((type(prompts[0]).__name__, completions[0][0]["role"], len(ground_truth)))
        return [1.0 if c[0]["content"].strip() == g else 0.0 for c, g in zip(completions, ground_truth)]

    trainer = GRPOTrainer(model="tiny", reward_funcs=[correct], train_dataset=datasets.Dataset.from_list(rows),
                          args=GRPOConfig(output_dir=str(tmp_path / "run"), **{**FAST, "max_steps": 1}),
                          peft_config=peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    trainer.train()
    assert calls and calls[0] == ("list", "assistant", 4)
    stored = (tmp_path / "run" / "config.yaml").read_text()
    assert "lora_r: 4" in stored and "prompts_per_step: 2" in stored


def test_reward_model_folder_scores_logit_zero(tmp_path, fp16rl_home, tiny_path):
    """A sequence-classification reward model, as TRL scores it: prompt + completion, logit 0."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fp16rl.trl_api import RewardModel

    folder = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(folder)
    scorer = RewardModel(str(folder))
    scores = scorer(prompts=["a b", "c"], completions=[" c", " d e"])
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    alone = model(**tokenizer(["a b c"], return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert scorer.__name__ == "rm" and len(scores) == 2 and scores[0] == pytest.approx(alone, abs=1e-5)


def test_grpo_trainer_refusals(tmp_path, fp16rl_home):
    from fp16rl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "run"), **FAST)
    rows = [{"prompt": "x"}]
    with pytest.raises(ConfigError, match="eval"):
        GRPOTrainer("tiny", reward_funcs=len, args=args, train_dataset=rows, eval_dataset=rows)
    with pytest.raises(ConfigError, match="tools"):
        GRPOTrainer("tiny", reward_funcs=len, args=args, train_dataset=rows, tools=[len])
    with pytest.raises(ConfigError, match="train"):
        GRPOTrainer("tiny", reward_funcs=len, args=args).save_model()
    from datasets import Dataset, DatasetDict

    with pytest.raises(DatasetError, match="must be a datasets.Dataset or a list of dicts, got dict"):
        GRPOTrainer("tiny", reward_funcs=len, args=args, train_dataset={"prompt": ["x"]})
    with pytest.raises(DatasetError, match=r"a DatasetDict with the splits train, test; pass one of them"):
        splits = DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)})
        GRPOTrainer("tiny", reward_funcs=len, args=args, train_dataset=splits)


def test_import_fp16rl_stays_torch_free():
    code = "import sys, fp16rl; fp16rl.GRPOConfig(max_steps=1); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_cli_train_reads_a_trl_yaml(tmp_path, fp16rl_home):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(4)))
    config = tmp_path / "grpo.yaml"
    config.write_text(f"model_name_or_path: tiny\ndataset_name: {data}\nreward_funcs: [math]\n"
                      "per_device_train_batch_size: 4\nnum_generations: 2\nbf16: false\nmax_completion_length: 4\n"
                      f"max_steps: 1\noutput_dir: {tmp_path / 'run'}\nuse_cpu: true\ngradient_checkpointing: false\n")
    result = subprocess.run([sys.executable, "-m", "fp16rl.cli", "train", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1


def test_compare_takes_train_options_on_its_command_line(tmp_path):
    """Train options after compare's own (fp16rl's or TRL's names) are shared by every arm; no YAML needed."""
    from fp16rl.compare import plan_comparison, split_train_args

    train, arms = split_train_args(["dtype=bfloat16", "--model-path", "tiny", "--max-steps", "3", "--lora-r", "0"])
    assert (train, arms) == (["--model-path", "tiny", "--max-steps", "3", "--lora-r", "0"], ["dtype=bfloat16"])
    specs = plan_comparison(None, ["dtype=float16", "dtype=float32"], [0], tmp_path / "cmp", base_args=train)
    config = parse_train_args(specs[1].train_args(None))
    assert (config.max_steps, config.lora_r, config.dtype, config.seed) == (3, 0, "float32", 0)
    manifest = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert manifest["base_options"] == train and manifest["base_config"] == {}
    with pytest.raises(ConfigError, match="unknown option"):
        split_train_args(["--no-such-option", "1"])
    with pytest.raises(ConfigError, match="compare's to set"):
        split_train_args(["--seed", "1"])


def test_a_loaded_model_is_saved_beside_the_run_and_a_used_folder_is_refused(tmp_path, tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp16rl import GRPOConfig, GRPOTrainer
    from fp16rl.core.errors import UserError

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_path), AutoTokenizer.from_pretrained(tiny_path)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8)
    rows = [{"prompt": "hi"}] * 4
    GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                args=args, train_dataset=rows).train()
    saved = tmp_path / "out-initial-model"
    assert (saved / "config.json").is_file() and not list(tmp_path.glob(".out-initial-model.*"))
    (tmp_path / "other-initial-model").mkdir()
    (tmp_path / "other-initial-model" / "notes.txt").write_text("mine\n")
    args = GRPOConfig(output_dir=str(tmp_path / "other"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8)
    with pytest.raises(UserError, match="in use"):
        GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs="math", args=args, train_dataset=rows)
    assert (tmp_path / "other-initial-model" / "notes.txt").read_text() == "mine\n"


def _reward_model_folder(folder: Path, tiny_path: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(folder)
    return folder


def test_trl_yaml_reward_model_and_soft_overlong_punishment(tmp_path, tiny_path, monkeypatch):
    """trl grpo's reward_model_name_or_path (a local folder) is the first reward function, scored as the Python
    API scores one (the same RewardModel); its get_soft_overlong_punishment is (1280, 256), which fp16rl's
    --overlong-* options override; a hub id is refused with one line."""
    from fp16rl.tasks.dataset import prompt_data
    from fp16rl.tasks.overlong import SoftOverlongPunishment
    from fp16rl.tasks.reward_model import RewardModel

    monkeypatch.chdir(tmp_path)
    _reward_model_folder(tmp_path / "rm", tiny_path)
    path = tmp_path / "grpo.yaml"
    path.write_text("model_name_or_path: tiny\ndataset_name: data.jsonl\nreward_model_name_or_path: rm\n"
                    "reward_funcs: [get_soft_overlong_punishment, accuracy_reward]\n")
    config = parse_train_args(["--config", str(path)])
    assert (config.reward_funcs, config.overlong_max_completion_len, config.overlong_soft_punish_cache) == (
        ["rm", "soft_overlong_punishment", "trl.rewards:accuracy_reward"], 1280, 256)
    assert parse_train_args(["--config", str(path), "--overlong-soft-punish-cache", "64"]).overlong_soft_punish_cache == 64
    rows = [{"prompt": "a b", "solution": "1"}, {"prompt": "c", "solution": "2"}]  # text: accuracy_reward left out
    rewards = prompt_data(dataclasses.replace(config, reward_funcs=config.reward_funcs[:2]), rows).rewards
    assert [type(f) for f in rewards.functions] == [RewardModel, SoftOverlongPunishment]
    assert rewards.names == ["rm", "soft_overlong_punishment_reward"]
    scores = rewards(["a b", "c"], [" c", " d e"], [[1] * 1100, [1] * 1030], {"solution": ["1", "2"]}, [0, 1])
    direct = RewardModel(str(tmp_path / "rm"))(prompts=["a b", "c"], completions=[" c", " d e"])
    assert scores.components["rm"] == pytest.approx(direct, abs=1e-6)
    assert scores.components["soft_overlong_punishment_reward"] == pytest.approx([-(1100 - 1024) / 256, -6 / 256])
    path.write_text("model_name_or_path: tiny\nreward_model_name_or_path: org/reward-model\n")
    with pytest.raises(ConfigError, match="reward_model_name_or_path='org/reward-model': not a local model folder"):
        parse_train_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="do not include"):
        parse_train_args(["--dataset-path", "d.jsonl", "--reward-funcs", "math", "--overlong-max-completion-len", "9"])


@pytest.mark.parametrize("script", ["conversational_accuracy", "trainer_state_log_metric"])
def test_examples_trl_scripts_run_on_the_tiny_model(script, tmp_path, fp16rl_home, monkeypatch):
    """examples/trl (TRL's documented scripts, import line changed) on the tiny model, in this process:
    trl.rewards' accuracy_reward and think_format_reward on conversations; a reward reading trainer_state and
    calling log_metric/log_extra (the quickstart and the extra-column examples run in the tests above)."""
    monkeypatch.setenv("FP16RL_EXAMPLE_MODEL", "tiny")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / f"{script}.py"), run_name="__main__")
    (run,) = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").is_file()]
    records = read_metrics(run / "metrics.jsonl")
    if script == "conversational_accuracy":
        assert len(records) == 2 and {"reward/accuracy_reward/mean", "reward/think_format_reward/std"} <= set(records[-1])
    else:  # the target grows with trainer_state.global_step / max_steps: 10 + 40 x (0, 1/3, 2/3)
        assert [r["curriculum/target_length"] for r in records] == pytest.approx([10.0, 10 + 40 / 3, 10 + 80 / 3])
        sample = json.loads((run / "samples" / "step-000001.jsonl").read_text().splitlines()[0])
        assert sample["details"]["length"] == len(sample["completion"])


@pytest.mark.slow
def test_examples_trl_quickstart_as_a_script(tmp_path, fp16rl_home):
    """TRL's quickstart, import line changed, run as `python quickstart.py` on the tiny model."""
    env = {**os.environ, "FP16RL_EXAMPLE_MODEL": "tiny", "FP16RL_HOME": str(fp16rl_home)}
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_metrics(tmp_path / "SmolLM2-135M-GRPO" / "metrics.jsonl")) == 2
