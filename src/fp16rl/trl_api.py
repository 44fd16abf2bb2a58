"""TRL's GRPO entry point, so a TRL script switches by changing one import::

    from fp16rl import GRPOTrainer, GRPOConfig          # was: from trl import GRPOTrainer, GRPOConfig

    trainer = GRPOTrainer(model="tiny", reward_funcs=reward_len, train_dataset=dataset,
                          args=GRPOConfig(output_dir="runs/trl", max_steps=10))
    trainer.train()
    trainer.save_model()

``GRPOConfig`` takes every name of TRL 1.16's (its fields and the ``TrainingArguments`` it inherits, with
TRL's defaults); :mod:`fp16rl.config.trl_fields` says what each becomes, and anything fp16rl cannot do is
refused with one line when the config is made. ``GRPOTrainer`` builds an fp16rl run from it:

* ``model``: a folder, a prepared name (``fp16rl models list``) or ``"tiny"``; or a loaded transformers
  model, which is saved (``save_pretrained``, with ``processing_class`` or the tokenizer of its
  ``name_or_path``) to ``<output_dir>-initial-model`` and trained from there (nothing is downloaded).
* ``reward_funcs``: callables in TRL's convention, fp16rl's names (``math``, ``module:function``), or a
  folder (or loaded model) of a sequence-classification reward model, scored as TRL scores it: prompt +
  completion (a conversation through the reward tokenizer's chat template), logit 0.
* ``processing_class``: the model's tokenizer; with a model folder it must be the one saved there.
* ``peft_config``: a peft ``LoraConfig``: ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``;
  ``lora_dropout`` is accepted but not applied (fp16rl trains without dropout); any other non-default
  field is refused. Without it the whole model is trained, as in TRL.
* ``callbacks`` (and ``add_callback``): ``transformers.TrainerCallback`` objects; rank 0 calls their
  ``on_train_begin``, ``on_step_end``, ``on_log(logs=<the step's metrics>)``, ``on_save`` (on a checkpoint
  step) and ``on_train_end`` with the ``GRPOConfig``, a ``TrainerState`` (``global_step`` in optimizer steps
  as TRL counts them, ``log_history``) and a ``TrainerControl`` whose flags fp16rl does not read (a
  callback cannot stop or redirect the run).

The run folder is ``output_dir`` (never overwritten; ``train(resume_from_checkpoint=True)`` continues it);
``save_model()`` exports the trained model (full weights, or the LoRA adapter) to ``<output_dir>/model``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from fp16rl.config.options import TrainConfig
from fp16rl.config.trl_fields import GRPO_CONFIG_NAMES, TRL_FIELDS
from fp16rl.config.trl_names import at_default, translate
from fp16rl.core.atomic import atomic_directory
from fp16rl.core.errors import ConfigError
from fp16rl.core.ranks import launched_ranks
from fp16rl.runs.folders import refuse_used_folder
from fp16rl.tasks.reward_model import RewardModel, is_model_folder

__all__ = ["GRPOConfig", "GRPOTrainer"]
# GRPOTrainer keywords of TRL's that fp16rl has no use for: refused unless None.
_REFUSED_KEYWORDS = {"reward_processing_classes": "the reward model's own tokenizer is loaded from its folder",
                     "optimizers": "fp16rl builds its AdamW and schedule from the config",
                     "quantization_config": "use ModelConfig's load_in_4bit (--load-in-4bit) with a peft_config",
                     "tools": "tool calling is not supported", "rollout_func": "custom rollouts are not supported",
                     "environment_factory": "environments are not supported"}


def _config_fields() -> list[tuple[str, Any, Any]]:
    rows = []
    for name in GRPO_CONFIG_NAMES:
        default = TRL_FIELDS[name].default
        made = dataclasses.field(default_factory=lambda d=default: type(d)(d)) if isinstance(default, (list, dict)) \
            else dataclasses.field(default=default)
        rows.append((name, Any, made))
    return rows


def _given(config: Any) -> dict[str, Any]:
    """The fields of a GRPOConfig that differ from TRL's defaults."""
    return {name: getattr(config, name) for name in GRPO_CONFIG_NAMES
            if not at_default(TRL_FIELDS[name], getattr(config, name))}


def _check(config: Any) -> None:
    translate(_given(config), launched_ranks())  # refuses what fp16rl cannot do, as TRL's __post_init__ would


GRPOConfig = dataclasses.make_dataclass(
    "GRPOConfig", _config_fields(), namespace={
        "__doc__": "TRL's GRPOConfig: every field of TRL 1.16's, with TRL's defaults and meanings (see "
                   "fp16rl.config.trl_fields for what each becomes; the README's 'Coming from TRL' table).",
        "__post_init__": _check,
        "to_dict": lambda self: dataclasses.asdict(self)})
GRPOConfig.__module__ = __name__


class GRPOTrainer:
    """TRL's ``GRPOTrainer`` on fp16rl's engine (the module docstring lists what each argument may be)."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, peft_config: Any = None,
                 callbacks: Sequence[Any] | None = None, **trl_only: Any):
        for name, value in trl_only.items():
            if name not in _REFUSED_KEYWORDS:
                raise TypeError(f"GRPOTrainer() got an unexpected keyword argument {name!r}")
            if value is not None and value != (None, None):
                raise ConfigError(f"GRPOTrainer({name}=...): not supported; {_REFUSED_KEYWORDS[name]}")
        if eval_dataset is not None:
            raise ConfigError("GRPOTrainer(eval_dataset=...): fp16rl has no evaluation loop during training "
                              "(`fp16rl probe` measures a checkpoint)")
        if train_dataset is None:
            raise ConfigError("GRPOTrainer needs a train_dataset (a datasets.Dataset or a list of dicts)")
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "model")
            args = GRPOConfig(output_dir=f"{Path(str(name)).name}-GRPO")
        if isinstance(args, TrainConfig):
            raise ConfigError("GRPOTrainer takes a GRPOConfig; with a TrainConfig use fp16rl.train(config, dataset, "
                              "reward_funcs)")
        from fp16rl.tasks.dataset import given_dataset

        self.args = args
        self.train_dataset = given_dataset(train_dataset)  # as TRL's, a wrong type is refused here, not at train()
        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in callbacks or []]
        model_options = {**_peft_options(peft_config), "model_name_or_path": self._model_path(model, processing_class)}
        self._translation = translate({**_given(args), **model_options}, launched_ranks())
        config = TrainConfig(**self._translation.options)
        config.validate()
        self.reward_funcs = [_reward_function(f) for f in (reward_funcs if isinstance(reward_funcs, list)
                                                            else [reward_funcs] if reward_funcs is not None else [])]
        self.run_dir: Path | None = None
        self.state: Any = None

    def _model_path(self, model: Any, processing_class: Any) -> str:
        if isinstance(model, (str, Path)):
            if processing_class is not None:
                _check_same_tokenizer(str(model), processing_class)
            return str(model)
        return _save_model_object(model, processing_class, Path(f"{self.args.output_dir or 'trainer_output'}"
                                                                "-initial-model"))

    def add_callback(self, callback: Any) -> None:
        """Add a ``transformers.TrainerCallback`` (a class or an instance), called as the module docstring says."""
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def remove_callback(self, callback: Any) -> None:
        self.callbacks = [cb for cb in self.callbacks if cb is not callback and type(cb) is not callback]

    def train(self, resume_from_checkpoint: bool | str | None = None, **unused: Any) -> Any:
        """Run the training; returns a ``transformers.trainer_utils.TrainOutput`` (global_step in optimizer
        steps, training_loss: the last step's loss, metrics: the last step's). ``resume_from_checkpoint=True``
        continues ``output_dir`` from its latest checkpoint."""
        from transformers.trainer_utils import TrainOutput

        from fp16rl.training.trainer import Trainer

        options = dict(self._translation.options)
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:  # True: refuses a path
            options["resume"] = translate({"resume_from_checkpoint": resume_from_checkpoint}).options["resume"]
        trainer = Trainer(TrainConfig(**options), dataset=self.train_dataset, reward_funcs=self.reward_funcs)
        self.run_dir = trainer.run_dir
        observer = _CallbackObserver(self.args, self.callbacks, trainer)
        self.state = observer.state
        if trainer.tracker is not None:
            trainer.tracker = observer.wrap(trainer.tracker)
        observer.event("on_train_begin")
        metrics = trainer.train(show_progress=self._translation.progress)
        observer.event("on_train_end")
        return TrainOutput(observer.state.global_step, float(metrics.get("optim/loss", float("nan"))), metrics)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> Path:
        """Export the trained model (full weights, or the LoRA adapter, with the tokenizer) as a Hugging Face
        folder: ``output_dir``, or ``<run folder>/model`` when it is None or the run folder itself."""
        from fp16rl.tools.export import export_checkpoint

        if self.run_dir is None:
            raise ConfigError("save_model(): train() has not run; there is no trained model to save")
        target = Path(output_dir) if output_dir else self.run_dir
        if target.resolve() == self.run_dir.resolve():
            target = self.run_dir / "model"
        return export_checkpoint(self.run_dir, target)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("push_to_hub(): fp16rl uploads nothing; save_model() writes a folder to push yourself")


class _CallbackObserver:
    """Calls the callbacks as each step is logged, standing in front of the run's tracker."""

    def __init__(self, args: Any, callbacks: list[Any], trainer: Any):
        from transformers import TrainerControl, TrainerState

        self.args, self.callbacks, self.trainer = args, callbacks, trainer
        self.passes = trainer.config.num_iterations
        self.state = TrainerState(max_steps=trainer.total_steps * self.passes,
                                  global_step=trainer.start_step * self.passes)
        self.control = TrainerControl()

    def event(self, name: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, name, None)
            if method is not None:
                method(self.args, self.state, self.control, **kwargs)

    def wrap(self, tracker: Any) -> Any:
        observer = self

        class Observed:
            def log(self, step: int, metrics: dict[str, float]) -> None:
                tracker.log(step, metrics)
                observer.state.global_step = step * observer.passes
                observer.state.log_history.append({**metrics, "step": observer.state.global_step})
                observer.event("on_step_end")
                observer.event("on_log", logs=dict(metrics))
                if step % observer.trainer.config.save_steps == 0 or step == observer.trainer.total_steps:
                    observer.event("on_save")

            def __getattr__(self, name: str) -> Any:
                return getattr(tracker, name)

        return Observed()


def _peft_options(peft_config: Any) -> dict[str, Any]:
    """A peft ``LoraConfig`` as ModelConfig's names (use_peft, lora_r...); None: full fine-tuning."""
    if peft_config is None:
        return {}
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config: {type(peft_config).__name__} is not supported; fp16rl trains LoRA "
                          "(peft.LoraConfig)")
    taken = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "task_type", "peft_type",
             "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
    default = LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        if f.name not in taken and getattr(peft_config, f.name) != getattr(default, f.name):
            raise ConfigError(f"peft_config: LoraConfig({f.name}={getattr(peft_config, f.name)!r}) is not "
                              "supported; fp16rl takes r, lora_alpha, lora_dropout, target_modules, use_rslora")
    if peft_config.task_type not in (None, "CAUSAL_LM"):
        raise ConfigError(f"peft_config: task_type {peft_config.task_type!r}; fp16rl trains causal LMs (CAUSAL_LM)")
    targets = peft_config.target_modules
    return {"use_peft": True, "lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
            "lora_dropout": peft_config.lora_dropout, "use_rslora": peft_config.use_rslora,
            "lora_target_modules": sorted(targets) if isinstance(targets, (set, frozenset)) else targets}


def _check_same_tokenizer(model_path: str, tokenizer: Any) -> None:
    """``processing_class`` with a model folder must be the tokenizer saved there (fp16rl loads that one)."""
    from fp16rl.model.loading import load_tokenizer, model_folder

    saved = load_tokenizer(model_folder(model_path))
    if saved.get_vocab() != tokenizer.get_vocab() or getattr(saved, "chat_template", None) != \
            getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"processing_class differs from the tokenizer saved with {model_path} (vocabulary or chat "
                          "template); save it into the model folder (tokenizer.save_pretrained)")


def _save_model_object(model: Any, tokenizer: Any, folder: Path) -> str:
    """A loaded transformers model (and its tokenizer) written to ``folder`` for fp16rl to load."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ConfigError(f"model: expected a path, a prepared name or a transformers model, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ConfigError("model: a peft model; pass its base model and the LoraConfig as peft_config")
    if folder.is_dir() and (folder / "config.json").is_file():
        raise ConfigError(f"{folder} already holds a model; pass that folder as model (or remove it)")
    refuse_used_folder(folder, "the folder for the model object")
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = getattr(model.config, "name_or_path", "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception:
            raise ConfigError("model: pass its tokenizer as processing_class (none is found at the model's "
                              f"name_or_path {source!r})") from None
    with atomic_directory(folder) as tmp:  # a crash leaves no half-written model to be trained from
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(folder)


def _reward_function(reward: Any) -> str | Callable[..., Any]:
    """A reward model (folder or loaded) as a reward function; callables and fp16rl's names as they are."""
    if is_model_folder(reward):
        return RewardModel(str(reward))
    if isinstance(reward, (str, Path)) or (callable(reward) and not hasattr(reward, "config")):
        return str(reward) if isinstance(reward, Path) else reward
    if hasattr(reward, "config") and hasattr(reward, "forward"):
        return RewardModel(reward)
    raise ConfigError(f"reward_funcs: {reward!r} is not a function, a reward name or a reward model folder")
