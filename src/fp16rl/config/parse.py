"""Reading options: ``fp16rl train``'s flags, ``--config`` YAML files and a run's own ``config.yaml``.

Every source ends in a :class:`~fp16rl.config.options.TrainConfig` that validates itself.

TRL's names are read too (a TRL YAML file, ``--per_device_train_batch_size 8 --bf16``): a call that uses a
name only TRL has (``model_name_or_path``, ``bf16``, ``max_prompt_length``... :func:`trl_only_names`) is read
as TRL reads it. Then every TRL name, the ones fp16rl shares included, has TRL's meaning
(``per_device_train_batch_size`` is TRL's batch, not fp16rl's memory bound; ``max_steps`` counts optimizer
steps), the options the call leaves out follow TRL's defaults (:mod:`fp16rl.config.trl_names`), fp16rl's own
names still work and win over those defaults, and a TRL name and fp16rl's name for the same option in one
source (the file, or the command line) are an error. A call with no TRL-only name is read as before.
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
from fp16rl.config.trl_fields import TRL_FIELDS
from fp16rl.config.trl_names import Translation, coerce, translate
from fp16rl.core.errors import ConfigError
from fp16rl.core.ranks import launched_ranks

# Options a resumed run cannot change: its checkpoint, data position and pairing depend on them.
RESUME_FIXED = ("model_path", "dataset_path", "seed", "dtype", "sampler_dtype", "trainer_dtype", "trainer_compute",
                "fp32_modules",
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


def build_parser(prog: str = "fp16rl train", trl: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one flag per ``TrainConfig`` field, in both spellings; with ``trl`` TRL's
    names too (dest ``trl:<name>``, their text parsed later), which then take the spellings they share."""
    parser = _ErrorRaisingParser(prog=prog, description="RL fine-tuning (GRPO family or online DPO) with one verified precision.",
                                 argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flags = [flag(f.name)]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        flags += list(meta.get("aliases", ()))
        if trl:
            flags = [name for name in flags if name[2:].replace("-", "_") not in TRL_FIELDS]
        if not flags:
            continue
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
    if trl:
        _add_trl_arguments(parser)
    return parser


def _add_trl_arguments(parser: argparse.ArgumentParser) -> None:
    """TRL's names as ``HfArgumentParser`` spells them: ``--bf16`` or ``--bf16 false`` (and ``--no_bf16``),
    lists as several values; every value is kept as text for ``trl_names.coerce``."""
    for name, row in TRL_FIELDS.items():
        spellings = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
        dest, help_text = f"trl:{name}", f"TRL: {row.kind}. {row.note}".strip()
        if row.type is bool:
            parser.add_argument(*spellings, dest=dest, nargs="?", const="true", help=help_text)
            negatives = sorted({f"--no_{name}", f"--no-{name.replace('_', '-')}"})
            parser.add_argument(*negatives, dest=dest, action="store_const", const="false", help=argparse.SUPPRESS)
        elif row.type is list:
            parser.add_argument(*spellings, dest=dest, nargs="+", action=_JoinLists, type=_list_parser(str),
                                help=help_text)
        else:
            parser.add_argument(*spellings, dest=dest, help=help_text)


def trl_only_names() -> set[str]:
    """TRL's names fp16rl has no option of: one of them in a call makes the call read TRL's way."""
    return set(TRL_FIELDS) - set(option_names())


def _used_names(argv: Sequence[str]) -> set[str]:
    """The option names a command line uses (``--bf16``, ``--no-bf16``, ``--lr=1``), in ``_`` spelling."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name)
            names.add(name.removeprefix("no_"))
    return names


def _config_path(argv: Sequence[str]) -> str | None:
    """The ``--config`` file of a command line, found before it is parsed (its keys decide how to parse)."""
    for index, token in enumerate(argv):
        if token.startswith("--config="):
            return token.split("=", 1)[1]
        if token == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


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


def read_yaml_sources(path: str | Path, trl: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fp16rl options, TRL-named values) of a YAML file; with ``trl`` the names TRL has are TRL's."""
    data = load_yaml_mapping(path, "config file")
    names = option_names()
    options, trl_values = {}, {}
    for key, value in data.items():
        spelling = str(key).replace("-", "_")
        if trl and spelling in TRL_FIELDS:
            trl_values[spelling] = coerce(TRL_FIELDS[spelling], value, f"config file {path}")
            continue
        name = names.get(spelling)
        if name is None:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        options[name] = _coerce(name, value, f"config file {path}")
    return options, trl_values


def is_trl_call(argv: Sequence[str]) -> bool:
    """Whether a command line (or its ``--config`` file) uses a name only TRL has."""
    names = _used_names(argv)
    path = _config_path(argv)
    if path:
        names |= {str(key).replace("-", "_") for key in load_yaml_mapping(path, "config file")}
    return bool(names & trl_only_names())


def _trl_layers(translation: Translation, from_file: dict[str, Any], from_flags: dict[str, Any],
                file_options: dict[str, Any], flags: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The translated options split by where they come from: (TRL's defaults, the file, the command line).
    A TRL name and fp16rl's name for the same option in one source is an error."""
    layers: tuple[dict, dict, dict] = ({}, {}, {})
    for name, value in translation.options.items():
        inputs = translation.inputs[name]
        rank = 2 if any(i in from_flags for i in inputs) else 1 if inputs else 0
        fp16rl_source = (None, file_options, flags)[rank]
        if fp16rl_source is not None and name in fp16rl_source:
            where = "on the command line" if rank == 2 else "in the config file"
            raise ConfigError(f"TRL's {', '.join(inputs)} and fp16rl's {flag(name)} both set {name} {where}; "
                              "give one of them")
        layers[rank][name] = value
    return layers


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    """Defaults < TRL's defaults (a TRL call) < the resumed run's own options < ``--config`` YAML < flags;
    validated."""
    argv = list(argv)
    trl = is_trl_call(argv)
    parsed = vars(build_parser(trl=trl).parse_args(argv))
    flags = {k: v for k, v in parsed.items() if not k.startswith("trl:")}
    trl_flags = {k[4:]: coerce(TRL_FIELDS[k[4:]], v, "command line") for k, v in parsed.items() if k.startswith("trl:")}
    file_options, trl_file = read_yaml_sources(flags["config"], trl) if flags.get("config") else ({}, {})
    translation = translate({**trl_file, **trl_flags}, launched_ranks()) if trl else Translation()
    trl_defaults, trl_from_file, trl_from_flags = _trl_layers(translation, trl_file, trl_flags, file_options, flags)
    asked = {**trl_defaults, **trl_from_file, **file_options, **trl_from_flags, **flags}
    stored: dict[str, Any] = {}
    if asked.get("resume"):
        stored = stored_run_options(asked.get("output_dir", TrainConfig.output_dir))
    config = TrainConfig(**{**trl_defaults, **stored, **trl_from_file, **file_options, **trl_from_flags, **flags})
    config.validate()
    if stored and (conflict := resume_conflicts(stored, config)):
        raise ConfigError(conflict)
    return config
