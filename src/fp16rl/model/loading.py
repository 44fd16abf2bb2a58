"""Loading causal LMs and tokenizers from local folders, LoRA through peft, and a tiny-model factory.

Everything is a normal Hugging Face folder loaded with ``from_pretrained``: the tiny test model is
written to disk and read back exactly like a user's model, so tests exercise the real path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fp16rl.core.atomic import atomic_directory
from fp16rl.config.options import DEFAULT_LORA_TARGETS
from fp16rl.core.errors import ModelError
from fp16rl.model.forward import causal_lm
from fp16rl.model.half_matmul import widen_linears
from fp16rl.model.islands import island_parameter_ids, keep_in_fp32, resolve_islands
from fp16rl.core.paths import TINY, fp16rl_home, resolve_model_path
from fp16rl.runs.folders import refuse_used_folder

if TYPE_CHECKING:  # transformers is imported where it is used: the CLI starts without it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# ChatML, the template of Qwen2 and SmolLM2; `continue_final_message` needs the assistant text
# to be rendered verbatim, which this template does.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not loop.last or message['role'] != 'assistant' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda when available, else cpu; asking for cuda without it is an error, not a silent cpu run.

    A CUDA device always comes back with its index (``cuda`` -> ``cuda:<current>``): torch calls such as
    ``set_per_process_memory_fraction`` refuse an index-less device, and ``cuda != cuda:0`` in comparisons.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but CUDA is not available on this machine")
    device = torch.device(name)
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise ModelError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return device


def load_tokenizer(model_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The model's tokenizer, set up for left-padded batched generation."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a broken or missing tokenizer file surfaces as many exception types
        raise ModelError(f"cannot load the tokenizer of {path}: {_first_line(err)}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer of {path} has no EOS token; completions could never end")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    model_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    load_in_4bit: bool = False,
) -> PreTrainedModel:
    """Load a causal LM with its weights stored in ``dtype``.

    ``load_in_4bit``: the linear layers of the decoder are quantised to NF4 by bitsandbytes and
    compute in ``dtype`` (QLoRA's recipe: NF4 + double quantisation); embeddings, norms and
    lm_head stay in ``dtype``. Call ``require_4bit_support`` first for a clear error.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(model_path)
    try:
        if load_in_4bit:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation, quantization_config=quantization,
                device_map={"": str(torch.device(device))},
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
            model = model.to(device)
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as err:
        # Truncated weights, an unknown architecture, a config transformers rejects: one line, not a traceback.
        raise ModelError(f"cannot load the model in {path}: {_first_line(err)}") from None
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    widen_linears(model)  # half matmuls at float32 speed where this CPU has no half kernel
    return model


# Device types on which ``--load-in-4bit`` runs: bitsandbytes' NF4 training kernels are CUDA ones.
FOUR_BIT_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def require_4bit_support(device: torch.device) -> None:
    """Raise ``ModelError`` (one line, exit 2) unless 4-bit loading can run on ``device``."""
    if device.type not in FOUR_BIT_DEVICE_TYPES:
        raise ModelError(
            f"--load-in-4bit needs a CUDA GPU (bitsandbytes NF4 kernels) but this run's device is {device.type}; "
            "use --no-load-in-4bit (the seed's bf16-vs-fp16 experiment ran unquantized)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("--load-in-4bit needs the bitsandbytes package: pip install 'fp16rl[quant]'")


def set_4bit_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make every bitsandbytes 4-bit layer of ``model`` dequantise to and multiply in ``dtype``."""
    if sys.modules.get("bitsandbytes") is None:  # no 4-bit layer exists unless it was imported (None: skipped)
        return
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = dtype


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a completion: the union of the tokenizer's EOS, the model config's and the
    generation config's (each an int or a list; Qwen2.5-Instruct lists ``<|im_end|>`` and
    ``<|endoftext|>`` only in generation_config.json)."""
    ids: set[int] = {tokenizer.eos_token_id}
    generation = getattr(model, "generation_config", None)
    for configured in (model.config.eos_token_id, getattr(generation, "eos_token_id", None)):
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(ids - {None})


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ``r == 0`` means full fine-tuning."""

    r: int = 16
    alpha: int = 64
    use_rslora: bool = True
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dropout: float = 0.0


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters held in fp32 (the master weights); the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in lora.target_modules if t in present]
    if not targets:
        raise ModelError(f"none of the LoRA target modules {list(lora.target_modules)} exist in this model")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        use_rslora=lora.use_rslora,
        target_modules=targets,
        lora_dropout=lora.dropout,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def load_trainer_model(
    model_path: str | os.PathLike, trainer_dtype: torch.dtype, lora: LoraSettings | None,
    attn_implementation: str = "sdpa", device: str | torch.device = "cpu", load_in_4bit: bool = False,
    fp32_modules: Sequence[str] = (),
) -> torch.nn.Module:
    """The trainer's model: trainable weights in FP32 (``MasterWeights`` then keeps them as masters
    and gives the model its compute copy); LoRA's frozen base stored in ``trainer_dtype``.

    ``fp32_modules`` (``PrecisionPolicy.fp32_modules``): the FP32 islands (``fp16rl.model.islands``),
    marked here so that ``MasterWeights`` and the sampler's copy leave them in FP32.

    With ``load_in_4bit`` the base's linear layers are NF4 computing in the trainer dtype and
    everything else frozen stays in that dtype too. Unlike peft's ``prepare_model_for_kbit_training``
    the norms and lm_head are not upcast to fp32: the sampler must compute what the trainer computes.
    """
    load_dtype = trainer_dtype if load_in_4bit else torch.float32
    model = load_model(model_path, load_dtype, attn_implementation, device, load_in_4bit=load_in_4bit)
    if lora is None:
        model.requires_grad_(True)
    else:
        model = widen_linears(apply_lora(model, lora))  # the adapters' layers, as load_model did the base's
    islands = resolve_islands(model, fp32_modules) if fp32_modules else []
    keep_in_fp32(model, islands, trainer_dtype)  # before the cast below: their FP32 weights are the loaded ones
    if lora is not None:
        keep = island_parameter_ids(model)
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point() and id(param) not in keep:
                param.data = param.data.to(trainer_dtype)
    return model


# --- tiny models -------------------------------------------------------------------------------

# Text the tiny tokenizer is trained on: the kinds of strings its tasks produce (chat prompts,
# Python `transform` code, grids of digits and colour names), so BPE merges are useful ones.
_TOKENIZER_CORPUS = """\
You are a world-class puzzle solver with exceptional pattern recognition skills and expertise in Python programming.
Below are several input and output examples of a transformation. Write a Python function `transform` that maps any input grid to its output grid.
The grids are 2D arrays written as text: cells are separated by spaces and rows by newlines.
Example 1 Input: Output: Example 2 Example 3 Example 4 Test input:
I will first reason about the transformation and then write Python code using the common library.
The output is the input flipped left to right. The output is the input rotated by 90 degrees.
```python
import numpy as np

def transform(grid):
    grid = np.array(grid)
    out = np.fliplr(grid)
    out = np.flipud(grid)
    out = np.rot90(grid, k=1)
    out = grid.T
    out = np.where(grid == 1, 2, grid)
    out = np.kron(grid, np.ones((2, 2), dtype=int))
    rows, cols = np.nonzero(grid)
    out = grid[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    out = np.tile(grid, (2, 2))
    out = np.roll(grid, 1, axis=0)
    return out.tolist()
```
Black Blue Red Green Yellow Gray Pink Orange Purple Brown
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30
0 0 0 1 1 1 2 2 2 3 3 3 4 4 4 5 5 5 6 6 6 7 7 7 8 8 8 9 9 9
for i in range(len(grid)): for j in range(len(grid[0])): if grid[i][j] == 0: return [row[::-1] for row in grid]
Repeat the digits. Write a sequence of digits. Count from one to ten.
"""


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a small built-in corpus."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS.splitlines(keepends=True) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )


@dataclass
class TinyModelSpec:
    """Shape of a tiny test model: big enough to learn a toy task, small enough for CI on 2 cores."""

    arch: str = "llama"  # llama | qwen2 (fast sampler engine); gemma2 | granite | cohere (logit post-processing)
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    init_std: float = 0.1  # larger than HF's 0.02 so a random model is not near-uniform
    seed: int = 0
    rope: str = "default"  # a TINY_ROPE key (llama/qwen2): RoPE scaling whose frequencies follow the length


def tiny_rope_parameters(spec: TinyModelSpec) -> dict | None:
    """``rope_parameters`` for ``spec.rope``: None (the architecture's own), or a scaling whose frequencies
    depend on the longest position of a forward (``prompt_forward.length_dependent_rope``) and change
    within a short test sequence: ``dynamic`` NTK past ``max_position_embeddings``, ``longrope``'s long
    factors past ``original_max_position_embeddings`` = a quarter of it."""
    half_head = spec.hidden_size // spec.num_attention_heads // 2
    options = {
        "default": None,
        "dynamic": {"rope_type": "dynamic", "factor": 4.0},
        "longrope": {"rope_type": "longrope", "factor": 4.0,
                     "original_max_position_embeddings": spec.max_position_embeddings // 4,
                     "short_factor": [1.0] * half_head, "long_factor": [1.0 + k for k in range(half_head)]},
    }
    if spec.rope not in options:
        raise ModelError(f"unknown tiny RoPE {spec.rope!r} (use {', '.join(options)})")
    return None if options[spec.rope] is None else {"rope_theta": 10000.0, **options[spec.rope]}


# Per architecture: options beyond the common shape. The logit post-processing values are far from
# 1 so that a trainer skipping them would be visibly wrong on a random tiny model.
TINY_ARCH_OPTIONS: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 2.0, "attn_logit_softcapping": None, "sliding_window": 64},
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25},
}


def write_tiny_model(output_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a randomly initialised tiny model (``spec.arch``) plus tokenizer as a normal HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    output_dir = Path(output_dir)
    refuse_used_folder(output_dir, "output folder")
    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    if spec.arch not in TINY_ARCH_OPTIONS:
        raise ModelError(f"unknown tiny architecture {spec.arch!r} (use {', '.join(TINY_ARCH_OPTIONS)})")
    rope = tiny_rope_parameters(spec)
    config = AutoConfig.for_model(spec.arch, **common, **TINY_ARCH_OPTIONS[spec.arch],
                                  **({} if rope is None else {"rope_parameters": rope}))
    # The caller's random state stays as it was: a run seeds before its model folder is first written, and
    # its LoRA and value-head initialisation must not depend on whether that folder existed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output_dir


def tiny_model_path(spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """A cached tiny model folder for ``spec`` under ``fp16rl_home()``, written on first use."""
    name = f"tiny-{spec.arch}-h{spec.hidden_size}-l{spec.num_hidden_layers}-v{spec.vocab_size}-s{spec.seed}"
    if spec.rope != "default":
        name += f"-{spec.rope}-p{spec.max_position_embeddings}"
    path = fp16rl_home() / "models" / name
    if not (path / "config.json").is_file():
        write_tiny_model(path, spec)
    return path


def model_folder(model_path: str) -> Path:
    """``--model-path`` as a folder: ``tiny`` is the built-in tiny model (written on first use)."""
    return tiny_model_path() if model_path == TINY else resolve_model_path(model_path)


GRADIENT_CHECKPOINTING_ABOVE = 1_000_000_000  # parameters; the default turns it on above this size


def enable_gradient_checkpointing(model: torch.nn.Module, wanted: bool | None) -> bool:
    """Turn on activation checkpointing of every decoder layer (``wanted`` None: above 1B parameters).

    Non-reentrant, so frozen inputs (LoRA) need no gradient. transformers checkpoints a layer only in
    training mode; the layers alone are marked so, not their children, so no dropout is switched on and
    the step computes exactly what it computes without checkpointing.
    """
    if wanted is None:
        wanted = sum(p.numel() for p in model.parameters()) > GRADIENT_CHECKPOINTING_ABOVE
    if not wanted:
        return False
    causal_lm(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True  # this module only: transformers' check, not dropout
    return True
