"""Reward functions and prompts as TRL 1.16's GRPOTrainer has them (issue 27, parts 3 and 4): the keywords
(``trainer_state``, ``log_metric``, ``log_extra``, the dataset's columns), async functions, the values TRL
accepts, no call before the first real batch; text prompts fed raw, conversations through the chat template."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fp16rl import TrainConfig
from fp16rl.api import train
from fp16rl.core.errors import ConfigError, DatasetError
from fp16rl.core.scores import Scores
from fp16rl.runs.tracking import read_metrics
from fp16rl.tasks.base import RunProgress, encode_text
from fp16rl.tasks.dataset import PromptDatasetTask, prompt_data
from fp16rl.tasks.rewards import RewardError, RewardSet

ROWS = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
CHAT_ROWS = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in ROWS]
TINY = dict(model_path="tiny", dtype="float32", lora_r=0, num_generations=2, prompts_per_step=2,
            max_completion_length=4, max_seq_length=128, beta=0.0, learning_rate=1e-3)


def test_a_reward_gets_trainer_state_and_logs_metrics_and_columns(tmp_path):
    """TRL's documented custom reward: a schedule on ``trainer_state``, ``log_metric`` and ``log_extra``."""
    states = []

    def scheduled(completions, trainer_state, log_metric, log_extra, answer, **kwargs):
        states.append((type(trainer_state).__name__, trainer_state.global_step, trainer_state.max_steps))
        weight = 1.0 - trainer_state.global_step / trainer_state.max_steps
        log_metric("schedule/weight", weight)
        log_metric("schedule/weight", weight + 1.0)  # a step's values are averaged, as TRL averages them
        log_extra("gold", list(answer))
        return [weight * len(c) for c in completions]

    run = tmp_path / "run"
    train(TrainConfig(**TINY, max_steps=2, output_dir=str(run)), dataset=ROWS, reward_funcs=[scheduled])
    assert states == [("TrainerState", 0, 2), ("TrainerState", 1, 2)]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["schedule/weight"] for r in records] == [1.5, 1.0]
    samples = [json.loads(line) for line in (run / "samples" / "step-000001.jsonl").read_text().splitlines()]
    golds = {r["prompt"]: r["answer"] for r in ROWS}
    assert all(s["details"]["gold"] == golds[s["prompt"]] for s in samples)


def test_trainer_state_of_the_step_being_scored(tiny_tokenizer):
    """The task turns the step it scores into TRL's ``trainer_state`` (epoch in this dataset's steps)."""
    seen = []

    def look(completions, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch,
                     trainer_state.num_train_epochs))
        return [0.0] * len(completions)

    task = PromptDatasetTask(prompt_data(TrainConfig(dataset_path="unused.jsonl"), ROWS, [look]), tiny_tokenizer,
                             prompts_per_step=2)  # 6 rows, 2 per step: 3 steps per epoch
    items = task.batch(4, 2)
    task.score(items, ["a", "b"], [False, False], [[1], [2]], RunProgress(global_step=4, max_steps=7))
    task.score(items, ["a", "b"], [False, False])  # outside a run: step 0 of nothing
    assert seen == [(4, 7, 4 / 3, 3), (0, 0, 0.0, 0)]


def test_async_reward_functions_are_awaited_concurrently(tmp_path):
    """Two async functions that each wait for the other can only finish if they run at once (TRL gathers them)."""
    first, second = asyncio.Event(), asyncio.Event()

    async def ping(completions, **kwargs):
        first.set()
        await asyncio.wait_for(second.wait(), timeout=10)
        return [1.0] * len(completions)

    async def pong(completions, **kwargs):
        second.set()
        await asyncio.wait_for(first.wait(), timeout=10)
        return [0.5] * len(completions)

    class Judge:  # an object with an async __call__, as TRL recognises it
        __name__ = "judge"

        async def __call__(self, completions, **kwargs):
            await asyncio.sleep(0)
            return [0.25] * len(completions)

    rewards = RewardSet.build([ping, pong, Judge()])
    try:
        scores = rewards(["p"] * 3, ["a", "b", "c"], [[1]] * 3, {}, [0, 1, 2])
    finally:
        rewards.close()
    assert scores.rewards == [1.75] * 3 and scores.components["judge"] == [0.25] * 3

    async def inner(completions, **kwargs):
        return [2.0] * len(completions)

    def wrapper(**kwargs):  # a plain function that returns a coroutine (a decorator without functools.wraps)
        return inner(**kwargs)

    assert RewardSet.build([wrapper])(["p"], ["a"], [[]], {}, [0]).rewards == [2.0]
    # In a run, from a file of rewards (the "'coroutine' object is not iterable").
    module = tmp_path / "judge.py"
    module.write_text("async def judged(completions, **kwargs):\n    return [1.0 for _ in completions]\n")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    last = train(TrainConfig(**TINY, max_steps=1, output_dir=str(tmp_path / "run"), dataset_path=str(data),
                             reward_funcs=[f"{module}:judged"]))
    assert last["reward/judged/mean"] == 1.0


def test_values_as_trl_takes_them():
    """True counts 1, NaN is "not applicable" like None (TRL's nansum); an infinity or text is refused."""
    def mixed(completions, **kwargs):
        return [True, False, math.nan, None]

    def one(completions, **kwargs):
        return [1.0] * len(completions)

    scores = RewardSet.build([mixed, one])(["p"] * 4, list("abcd"), [[]] * 4, {}, [0, 1, 2, 3])
    assert scores.rewards == [2.0, 1.0, 1.0, 1.0]
    assert scores.components["mixed"][:2] == [1.0, 0.0] and all(math.isnan(v) for v in scores.components["mixed"][2:])

    def infinite(completions, **kwargs):
        return [math.inf] * len(completions)

    with pytest.raises(RewardError, match=r"'infinite' returned inf for dataset row 5 \(completion 0\); expected a "
                                          "number, or None or NaN for not applicable"):
        RewardSet.build([infinite])(["p"], ["a"], [[]], {}, [5])

    def scalar(completions, **kwargs):
        return 1.0

    with pytest.raises(RewardError, match="'scalar' raised TypeError: returned float, not a list of rewards"):
        RewardSet.build([scalar])(["p"], ["a"], [[]], {}, [0])


def test_logs_are_checked_and_merged_like_trl():
    def bad_extra(completions, log_extra, **kwargs):
        log_extra("note", ["only one"])
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"'bad_extra' logged 1 values for the column 'note' \(log_extra\) for 2"):
        RewardSet.build([bad_extra])(["p"] * 2, ["a", "b"], [[]] * 2, {}, [0, 1])

    def shadowing(completions, log_metric, **kwargs):
        log_metric("reward/mean", 1.0)
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match="'shadowing' raised ValueError: log_metric.*fp16rl's own metrics"):
        RewardSet.build([shadowing])(["p"], ["a"], [[]], {}, [0])
    # Ranks: a logged metric is sum / count over every rank's calls; details stay aligned with the rows.
    left = Scores(rewards=[1.0, 1.0], metrics={"m": 1.0}, metric_sums={"m": (3.0, 3)}, details=[{"x": 1}, {"x": 2}])
    right = Scores(rewards=[0.0], metrics={"m": 5.0}, metric_sums={"m": (5.0, 1)})
    merged = Scores.merge([left, right])
    assert merged.metrics == {"m": 2.0} and merged.details == [{"x": 1}, {"x": 2}, {}]


def test_no_reward_call_before_the_first_real_batch(tmp_path):
    """Rewards with side effects or group assumptions see only real completions, whole steps of them."""
    calls = []

    def counted(completions, completion_ids, **kwargs):
        calls.append((len(completions), all(ids for ids in completion_ids)))
        return [0.0] * len(completions)

    config = TrainConfig(**TINY, max_steps=2, output_dir=str(tmp_path / "run"))
    prompt_data(config, ROWS, [counted])  # the checks a run makes before it starts
    assert calls == []
    train(config, dataset=ROWS, reward_funcs=[counted])
    assert calls == [(4, True), (4, True)]  # prompts_per_step * num_generations, sampled tokens each

    def narrow(completions):  # cannot take what the trainer passes: refused before the run, without a call
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match=r"'narrow' cannot be called as TRL calls reward functions: got an unexpected"
                                          " keyword argument 'prompts'.*column \\(answer\\)"):
        prompt_data(config, ROWS, [narrow])


def test_columns_reach_rewards_as_trl_passes_them(tmp_path):
    """Every column but the prompt's; TRL drops ``completion``; a column named like a trainer argument is refused."""
    seen = {}

    def keys(completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    rows = [{**r, "completion": "a reference answer", "level": 3} for r in ROWS]
    train(TrainConfig(**TINY, max_steps=1, output_dir=str(tmp_path / "run")), dataset=rows, reward_funcs=[keys])
    assert sorted(seen) == ["answer", "completion_ids", "level", "log_extra", "log_metric", "prompts", "trainer_state"]
    with pytest.raises(DatasetError, match="the column 'trainer_state' has the name of an argument reward functions"):
        prompt_data(TrainConfig(), [{**r, "trainer_state": 1} for r in ROWS], [keys])


def test_text_prompts_are_fed_raw_and_conversations_templated(tiny_tokenizer):
    config = TrainConfig(dataset_path="unused.jsonl")
    text = PromptDatasetTask(prompt_data(config, ROWS, ["math"]), tiny_tokenizer).batch(0, 1)[0]
    assert text.text == ROWS[text.meta["row"]]["prompt"]
    chat = PromptDatasetTask(prompt_data(config, CHAT_ROWS, ["math"]), tiny_tokenizer).batch(0, 1)[0]
    assert chat.text == tiny_tokenizer.apply_chat_template(CHAT_ROWS[chat.meta["row"]]["prompt"], tokenize=False,
                                                           add_generation_prompt=True)
    # --system-prompt puts a system turn first: the text prompt becomes the user's turn of a conversation.
    system = TrainConfig(dataset_path="unused.jsonl", system_prompt="Be brief.")
    item = PromptDatasetTask(prompt_data(system, ROWS, ["math"]), tiny_tokenizer).batch(0, 1)[0]
    assert item.text == tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ROWS[item.meta["row"]]["prompt"]}],
        tokenize=False, add_generation_prompt=True)


def test_text_prompts_keep_the_bos_a_tokenizer_adds(tiny_tokenizer):
    """TRL tokenizes a text prompt with the tokenizer's special tokens (a Llama-style BOS); so does fp16rl."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    bos = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    item = PromptDatasetTask(prompt_data(TrainConfig(dataset_path="x.jsonl"), ROWS, ["math"]), tokenizer).batch(0, 1)[0]
    prompt = ROWS[item.meta["row"]]["prompt"]
    assert item.text == bos + prompt and encode_text(tokenizer, item.text) == tokenizer(prompt)["input_ids"]


def test_a_conversation_without_a_chat_template_is_refused(tmp_path, tiny_path, tiny_tokenizer):
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="the prompts are conversations .* has no chat template"):
        PromptDatasetTask(prompt_data(TrainConfig(dataset_path="x.jsonl"), CHAT_ROWS, ["math"]), tokenizer)
    PromptDatasetTask(prompt_data(TrainConfig(dataset_path="x.jsonl"), ROWS, ["math"]), tokenizer)  # text: fine
    # The command line: one error line, exit code 2.
    model = tmp_path / "no_template"
    shutil.copytree(tiny_path, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    result = _cli(["train", "--model-path", str(model), "--dataset-path", str(data), "--reward-funcs", "math",
                   "--output-dir", str(tmp_path / "run"), "--dtype", "float32"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {data}: the prompts are conversations (lists of {{role, content}} messages), but the model's tokenizer "
        "has no chat template to render them; use a model with one, set the tokenizer's chat_template, or give "
        "plain-text prompts (fed to the model as they are)"]


def test_a_reward_failing_on_the_first_batch_is_one_error_line(tmp_path):
    module = tmp_path / "rewards.py"
    module.write_text("def raises(completions, **kwargs):\n    raise RuntimeError('no idea')\n")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = _cli(["train", "--model-path", "tiny", "--dataset-path", str(data), "--reward-funcs", f"{module}:raises",
                   "--output-dir", str(tmp_path / "run"), "--dtype", "float32", "--max-steps", "1",
                   "--num-generations", "2", "--prompts-per-step", "1", "--max-completion-length", "4"], tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert errors == ["error: reward function 'raises' raised RuntimeError: no idea (on dataset rows 3)"]
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # after the run's header, nothing else


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fp16rl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


CHATML_CLOSING = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                  "{% endif %}")  # SmolLM2's and Qwen2's ChatML: every turn closed, the last one included


@pytest.mark.parametrize("template", ["tiny", "closing"])
def test_prompt_ids_are_those_trls_grpo_trainer_feeds(tiny_tokenizer, template):
    """The ids the sampler continues equal those of TRL 1.16's ``GRPOTrainer._tokenize_prompts`` (TRL's own
    method, on a stand-in for the trainer) for text prompts and for conversations, one ending on an assistant
    turn included: TRL applies the chat template with ``add_generation_prompt=True`` to every conversation,
    so a final assistant turn is closed by the template and a new one opened, not continued."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    from types import SimpleNamespace

    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    if template == "closing":
        tokenizer.chat_template = CHATML_CLOSING
    trl = SimpleNamespace(_is_vlm=False, environment_factories=None, processing_class=tokenizer, tools=None,
                          chat_template=None, chat_template_kwargs={})
    user = {"role": "user", "content": "What is 2 + 2?"}
    conversations = [[user], [{"role": "system", "content": "Be brief."}, user],
                     [user, {"role": "assistant", "content": "Let me think"}]]
    texts = ["The sky is", "SUBREDDIT: r/tea\nPOST: green or black?\nTL;DR:"]
    reward = [lambda completions, **kwargs: [0.0] * len(completions)]
    for prompts in (conversations, texts):
        expected, _, _ = grpo_trainer.GRPOTrainer._tokenize_prompts(trl, prompts)
        task = PromptDatasetTask(prompt_data(TrainConfig(dataset_path="x.jsonl"), [{"prompt": p} for p in prompts],
                                             reward), tokenizer)
        assert [encode_text(tokenizer, task.render(p)) for p in prompts] == [list(ids) for ids in expected]
    # The assistant turn is closed and a new one opened (by TRL's rule, whichever template renders it).
    last = PromptDatasetTask(prompt_data(TrainConfig(dataset_path="x.jsonl"), [{"prompt": conversations[2]}], reward),
                             tokenizer).render(conversations[2])
    assert last.endswith("Let me think" + ("<|im_end|>\n" if template == "closing" else "") + "<|im_start|>assistant\n")


def test_soft_overlong_punishment_is_trls():
    """The built-in ``soft_overlong_punishment`` gives TRL 1.16's ``get_soft_overlong_punishment`` values (DAPO
    Eq. 13) at every length around both thresholds, its docstring example included; its parameters come from
    the run's options (default L_max = --max-completion-length, cache L_max // 5)."""
    from fp16rl.rewards import get_soft_overlong_punishment
    from fp16rl.tasks.rewards import load_reward_function

    ids = [[1] * n for n in range(0, 106)]
    ours = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert ours([[1] * 90]) == [-0.5] and ours([[1] * 80, [1] * 81, [1] * 100, [1] * 101]) == [0.0, -0.05, -1.0, -1.0]
    trl_rewards = pytest.importorskip("trl.rewards")
    for max_len, cache in ((100, 20), (100, 0), (64, 64), (7, 3)):
        assert get_soft_overlong_punishment(max_len, cache)(ids) == \
            trl_rewards.get_soft_overlong_punishment(max_len, cache)(ids)
    built = load_reward_function("soft_overlong_punishment", TrainConfig(max_completion_length=50))
    assert (built.max_completion_len, built.soft_punish_cache, built.__name__) == (50, 10, "soft_overlong_punishment_reward")
    built = load_reward_function("soft_overlong_punishment", TrainConfig(overlong_max_completion_len=1280,
                                                                        overlong_soft_punish_cache=256))
    assert (built.max_completion_len, built.soft_punish_cache) == (1280, 256)
