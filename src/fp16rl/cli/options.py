"""Command-line options generated from a settings dataclass, so an option is declared once.

``settings_command(Settings, run)`` returns a function typer turns into a command whose options are
the dataclass's fields: name (``--lora-r`` and ``--lora_r``), type, default and help text (from the
field's metadata, as ``config.opt`` writes it). Tuples and lists are comma-separated on the
command line. ``fp16rl train`` has its own argparse parser (``config.parse.build_parser``) generated from
``TrainConfig`` the same way, because the seed's command line mixes both spellings freely.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional, get_args, get_origin, get_type_hints

import typer

from fp16rl.core.errors import ConfigError


def _kind(hint: Any) -> tuple[type, type | None, bool]:
    """(the option's base type, the element type of a tuple/list or None, whether None is allowed)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    if optional and len(args) == 1:
        hint = args[0]
    origin = get_origin(hint) or hint
    if origin in (tuple, list):
        element = next((a for a in get_args(hint) if a is not Ellipsis), str)
        return origin, element, optional
    return hint, None, optional


def _split(text: str, element: type, name: str) -> list[Any]:
    try:
        return [element(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: expected comma-separated "
                          f"{element.__name__} values") from None


def settings_command(settings_cls: type, run: Callable[..., None], fail: Callable[[str], None],
                     extra: tuple[inspect.Parameter, ...] = ()) -> Callable[..., None]:
    """A typer command function with one option per field of ``settings_cls``; it builds the
    settings and calls ``run(settings, **extra_values)``. ``extra`` adds command-only options;
    ``fail(message)`` reports a malformed list value (one error line, exit 2)."""
    hints = get_type_hints(settings_cls)
    parameters, sequences = [], {}
    for f in dataclasses.fields(settings_cls):
        kind, element, optional = _kind(hints[f.name])
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = ... if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = f.metadata.get("help", "")
        if element is not None:
            sequences[f.name] = (kind, element)
            default = default if default is ... else ",".join(map(str, default))
            annotation: Any = str
        elif kind is bool:
            flags = [f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"]
            annotation = bool
        else:
            annotation = Optional[kind] if optional else kind
        if f.metadata.get("choices"):
            help_text = f"{help_text} One of: {', '.join(f.metadata['choices'])}."
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=typer.Option(default, *flags, help=help_text)))

    def command(**values: Any) -> None:
        extra_values = {p.name: values.pop(p.name) for p in extra}
        try:
            for name, (kind, element) in sequences.items():
                values[name] = kind(_split(values[name], element, name))
        except ConfigError as err:
            fail(str(err))
        run(settings_cls(**values), **extra_values)

    command.__signature__ = inspect.Signature([*parameters, *extra])  # typer reads options from here
    return command


def option(name: str, annotation: Any, default: Any, *flags: str, help: str) -> inspect.Parameter:
    """A command-only option for ``settings_command(..., extra=...)``."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *flags, help=help))


