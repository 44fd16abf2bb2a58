"""A sequence-classification reward model as a reward function, scored as TRL 1.16's GRPOTrainer scores one
(``_calculate_rewards``): text prompts concatenated with the completion, conversations (prompt + completion
messages) rendered with the reward tokenizer's chat template, right-padded, no special tokens added; the
reward is logit 0 of the model (loaded with ``num_labels=1`` in float32).

Used by ``GRPOTrainer(reward_funcs=<folder or loaded model>)``, by ``--reward-funcs <folder>`` and by a TRL
config's ``reward_model_name_or_path`` (:func:`fp16rl.tasks.rewards.load_reward_function`). Nothing is
downloaded: a folder is one written by ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_model_folder(spec: Any) -> bool:
    """Whether ``spec`` names a local model folder (one holding ``config.json``)."""
    return isinstance(spec, (str, Path)) and (Path(spec) / "config.json").is_file()


class RewardModel:
    """A sequence-classification reward model scoring prompt + completion as TRL's GRPOTrainer does: text
    prompts concatenated with the completion, conversations rendered with the reward tokenizer's chat
    template, right-padded, no special tokens added; the reward is logit 0."""

    def __init__(self, model: Any, tokenizer: Any = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, str):
            self.__name__ = Path(model).name
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
        else:
            self.__name__ = str(getattr(model.config, "name_or_path", "") or "reward_model").split("/")[-1]
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.eval(), tokenizer

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        import torch

        if prompts and isinstance(prompts[0], list):
            texts = [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = self.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(**{k: v.to(device) for k, v in inputs.items()}).logits
        return [float(x) for x in logits[:, 0].float().cpu()]

