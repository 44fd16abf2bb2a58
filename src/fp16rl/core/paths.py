"""Where models live, checked without loading anything heavy (the CLI refuses bad paths before torch loads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fp16rl.core.errors import ModelError

TINY = "tiny"  # --model-path tiny: the built-in tiny test model, written under fp16rl_home() on first use


def fp16rl_home() -> Path:
    """Cache directory for prepared models (``$FP16RL_HOME``, default ``~/.cache/fp16rl``)."""
    return Path(os.environ.get("FP16RL_HOME", Path.home() / ".cache" / "fp16rl"))


def resolve_model_path(model_path: str | os.PathLike) -> Path:
    """A local HF folder, or the name of a model prepared under ``fp16rl_home()/models``; its config.json is checked."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        prepared = fp16rl_home() / "models" / str(model_path)
        if path.is_absolute() or not (prepared / "config.json").is_file():
            if path.exists():
                raise ModelError(f"model path {model_path!r} is a file; pass the model's folder")
            raise ModelError(
                f"model path {model_path!r} not found (neither a folder nor a prepared model in "
                f"{fp16rl_home() / 'models'}; see `fp16rl models list`)"
            )
        path = prepared
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> dict:
    """The folder's config.json as a dict, or a ``ModelError`` naming what is wrong with it."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"model path {path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{config_path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{config_path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except OSError as err:
        raise ModelError(f"{config_path} cannot be read: {err.strerror}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{config_path} has no \"model_type\": not a Hugging Face model config")
    return config
