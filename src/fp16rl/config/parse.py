"""Reading options: ``fp16rl train``'s flags, ``--config`` YAML files and a run's own ``config.yaml``.

Every source ends in a :class:`~fp16rl.config.options.TrainConfig` that validates itself.
Precedence: defaults < the resumed run's stored options < YAML file < command-line flags. Each
field is one flag in both spellings (``--lora-r`` and ``--lora_r``, as the seed command line mixes
them) plus its aliases; a YAML key may use any of them. Like the rest of the config package this
imports nothing heavy (no torch): the CLI refuses bad input before loading the libraries.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

from fp16rl.config.dtypes import canonical_dtype
from fp16rl.config.options import TrainConfig, element_type, field_type, flag
from fp16rl.core.errors import ConfigError

# Options a resumed run cannot change: its checkpoint, data position and pairing depend on them.
RESUME_FIXED = ("model_path", "dataset_path", "seed", "dtype", "sampler_dtype", "trainer_dtype", "trainer_compute",
                "load_in_4bit", "lora_r", "lora_alpha", "use_rslora", "lora_target_modules", "num_generations",
                "prompts_per_step", "prompt_column", "system_prompt", "dataset_size", "dataset_seed")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check/convert a YAML value to the field's type, naming the field and file on failure."""
    kind = field_type(name)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind is list:
            element = element_type(name)
            items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
            if not isinstance(items, list) or any(isinstance(v, (bool, list, dict)) or v is None for v in items):
                raise TypeError
            return [element(v) for v in items]
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: option {name!r} expects {kind.__name__}, got {value!r}") from None


def read_text_file(path: Path, what: str) -> str:
    """A text file's contents, or a ``ConfigError`` naming the file and what is wrong with it."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a file") from None
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every failure is one ``ConfigError`` line naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_text_file(path, what))
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of option: value")
    return data


def option_names() -> dict[str, str]:
    """Every accepted spelling of an option (its name and its aliases, ``-`` or ``_``) -> the field name."""
    names = {}
    for f in dataclasses.fields(TrainConfig):
        for spelling in (f.name, *f.metadata.get("aliases", ())):
            names[spelling.removeprefix("--").replace("-", "_")] = f.name
    return names


def load_yaml_options(path: str | Path) -> dict[str, Any]:
    """Options from a YAML mapping; keys in any accepted spelling; unknown keys are an error."""
    data = load_yaml_mapping(path, "config file")
    names = option_names()
    options = {}
    for key, value in data.items():
        name = names.get(str(key).replace("-", "_"))
        if name is None:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        options[name] = _coerce(name, value, f"config file {path}")
    return options


class _ErrorRaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we want one line
        raise ConfigError(message)


def _list_parser(element: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [element(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma-separated {element.__name__} list"  # argparse names it in its error
    return parse


class _JoinLists(argparse.Action):
    """A list option takes TRL's spelling (``--reward-funcs a b``) and the comma form (``a,b``), or both."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [item for value in values for item in value])


def build_parser(prog: str = "fp16rl train") -> argparse.ArgumentParser:
    """An argparse parser with one flag per ``TrainConfig`` field, in both spellings."""
    parser = _ErrorRaisingParser(prog=prog, description="RL fine-tuning (GRPO family or online DPO) with one verified precision.",
                                 argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flags = [flag(f.name)]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        flags += list(meta.get("aliases", ()))
        kind = field_type(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: {default})"
        if kind is bool:
            negatives = [name.replace("--", "--no-", 1) for name in flags]
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
            parser.add_argument(*negatives, dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif kind is list:
            parser.add_argument(*flags, dest=f.name, type=_list_parser(element_type(f.name)), help=help_text,
                                metavar="A", nargs="+", action=_JoinLists)
        else:  # choices are checked by validate(), the one place every entry point shares
            parser.add_argument(*flags, dest=f.name, type=kind, help=help_text,
                                metavar="{" + ",".join(meta["choices"]) + "}" if meta.get("choices") else None)
    return parser


def stored_run_options(output_dir: str | Path) -> dict[str, Any]:
    """The options a run was started with (its config.yaml), so ``--resume`` needs no other flag."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found; {output_dir} is not an fp16rl run")
    stored = load_yaml_mapping(path, "run config").get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"run config {path} has no 'config' mapping; it was not written by fp16rl")
    names = option_names()
    return {names[k]: _coerce(names[k], v, f"run config {path}") for k, v in stored.items()
            if k in names and names[k] not in ("resume", "config")}


def resume_conflicts(stored: dict[str, Any], config: TrainConfig) -> str | None:
    """Why ``config`` cannot continue a run started with ``stored`` options, or None."""
    for name in RESUME_FIXED:
        if name not in stored:
            continue
        before, now = stored[name], getattr(config, name)
        if name.endswith("dtype") and before is not None and now is not None:
            before, now = canonical_dtype(before), canonical_dtype(now)
        if before != now:
            return (f"--resume: {config.output_dir} was started with {name}={before}, this call asks for "
                    f"{flag(name)} {now}; a run keeps its {name} (start a new run to change it)")
    return None


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    """Defaults < the resumed run's own options < ``--config`` YAML < flags; validated."""
    flags = vars(build_parser().parse_args(list(argv)))
    options: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    if flags.get("resume"):
        stored = stored_run_options(flags.get("output_dir", TrainConfig.output_dir))
        options.update(stored)
    if flags.get("config"):
        options.update(load_yaml_options(flags["config"]))
    options.update(flags)
    config = TrainConfig(**options)
    config.validate()
    if stored and (conflict := resume_conflicts(stored, config)):
        raise ConfigError(conflict)
    return config
