"""What ``fp16rl probe`` measures: its settings (every CLI option is generated from this dataclass) and
its prompts. The model options are ``fp16rl train``'s own (``train_option``), with the same defaults,
so a probe measures what a run with the same options would see."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fp16rl.config.options import device_problem, fp32_modules_problem, opt, train_option
from fp16rl.config.dtypes import canonical_dtype
from fp16rl.core.errors import PrecisionError, ProbeError
from fp16rl.tasks.base import encode_text

ATTENTION_KINDS = ("sdpa", "eager")

# Short, varied chat prompts: different lengths (so batches are left-padded as in training) and
# different kinds of answer (facts, code, lists, prose), so the completions cover many token types.
BUILTIN_PROMPTS = (
    "Write a haiku about the sea.",
    "What is the capital of Australia? Answer in one sentence.",
    "Explain what a hash table is to a beginner.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give me three tips for a good night's sleep.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "What is 17 times 23? Show your steps.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "List the colours of the rainbow.",
    "Write a short, friendly email declining a meeting invitation.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
)


@dataclass
class ProbeSettings:
    """What to measure. Defaults finish in a few minutes for a 135M model on 2 CPU cores."""

    model_path: str = field(metadata={"help": "HF model folder, a prepared model name, or 'tiny'."})
    dtypes: tuple[str, ...] = opt(("bfloat16", "float16", "float32"), "Dtypes to measure; float32 is the correctness baseline (~0).")
    attn: tuple[str, ...] = opt(("sdpa",), "Attention kernels of both engines: sdpa, eager.")
    batch_sizes: tuple[int, ...] = opt((8,), "Numbers of sequences the sampler decodes together (kernels depend on the batch shape).")
    num_samples: int = opt(16, "Completions per configuration; sample j uses prompt j mod #prompts.")
    max_new_tokens: int = opt(128, "Maximum new tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature (logprobs are of the temperature-scaled distribution).")
    top_p: float = opt(1.0, "Nucleus threshold; shapes the draw only.")
    seed: int = opt(0, "Sampling seed, the same for every configuration: sample j draws the same noise in each (paired).")
    prompts: str | None = opt(None, "Prompts file: one per line, or JSONL with \"prompt\" (default: 12 built-in chat prompts).")
    chat_template: bool = opt(True, "Render each prompt as a user turn with the model's chat template.")
    check_fp16_range: bool = opt(True, "Measure the largest activation per layer against the fp16 max 65504.")
    fp16_headroom: float = opt(8.0, "Warn when a layer's largest activation exceeds 65504 / this factor.")
    threads: int = opt(0, "CPU threads for torch (0 = auto: the cores other processes leave idle).")
    drill_down: bool = opt(False, "Also compare the sampler's decode path and the trainer's forward layer by layer (each layer's output, attention, MLP, norms, logits) against an fp32 reference, per dtype: drill_down.json/.md/.png.")
    drill_down_samples: int = opt(8, "Completions the drill-down captures per dtype (the probe's first ones, paired); their activations are held in memory.")
    # The trainer's model options, as `fp16rl train` takes them (same defaults).
    lora_r: int = train_option("lora_r")
    lora_alpha: int = train_option("lora_alpha")
    use_rslora: bool = train_option("use_rslora")
    lora_target_modules: list = train_option("lora_target_modules")
    trainer_compute: str = train_option("trainer_compute")
    sampler_engine: str = train_option("sampler_engine")
    fp32_modules: list = train_option("fp32_modules")
    device: str = train_option("device")

    def validate(self) -> None:
        """Normalise dtype names and reject impossible values before anything is loaded."""
        try:
            self.dtypes = tuple(dict.fromkeys(canonical_dtype(d) for d in self.dtypes))
        except PrecisionError as err:
            raise ProbeError(f"--dtypes: {err}") from None
        if not self.dtypes:
            raise ProbeError("--dtypes is empty")
        bad = [a for a in self.attn if a not in ATTENTION_KINDS]
        if bad or not self.attn:
            raise ProbeError(f"--attn {','.join(self.attn)}: use sdpa and/or eager")
        self.attn = tuple(dict.fromkeys(self.attn))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ProbeError("--batch-sizes must be positive integers")
        self.batch_sizes = tuple(dict.fromkeys(self.batch_sizes))
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ProbeError("--num-samples and --max-new-tokens must be >= 1")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ProbeError("--temperature must be > 0 and --top-p in (0, 1]")
        if not self.fp16_headroom >= 1:
            raise ProbeError("--fp16-headroom must be >= 1")
        if self.threads < 0:
            raise ProbeError("--threads must be >= 0 (0 = auto)")
        if self.seed < 0:
            raise ProbeError(f"--seed must be >= 0, got {self.seed}")
        if problem := device_problem(self.device):
            raise ProbeError(problem)
        if self.lora_r < 0 or (self.lora_r > 0 and (self.lora_alpha < 1 or not self.lora_target_modules)):
            raise ProbeError("--lora-r must be >= 0 (0 = full fine-tuning), with --lora-alpha >= 1 and target modules")
        for name, choices in (("trainer_compute", ("half_copy", "autocast")), ("sampler_engine", ("auto", "fast", "hf"))):
            if getattr(self, name) not in choices:
                raise ProbeError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")
        if self.drill_down and self.drill_down_samples < 1:
            raise ProbeError(f"--drill-down-samples must be >= 1, got {self.drill_down_samples}")
        self._validate_fp32_modules()

    def _validate_fp32_modules(self) -> None:
        """--fp32-modules as `train` takes it, plus ``flagged`` (which needs the fp16 range check)."""
        problem = fp32_modules_problem(self.fp32_modules, allow_flagged=True)
        if problem:
            raise ProbeError(problem)
        if "flagged" in self.fp32_modules and not self.check_fp16_range:
            raise ProbeError("--fp32-modules flagged needs the fp16 range check; drop --no-check-fp16-range")
        if self.fp32_modules and self.trainer_compute == "autocast" and self.lora_r == 0:
            raise ProbeError("--fp32-modules cannot be used with --trainer-compute autocast (autocast would run an "
                             "island's matmuls in half)")

    def islands(self, fp16_range: dict[str, Any] | None) -> list[str]:
        """--fp32-modules with ``flagged`` replaced by what the fp16 range check flagged (layers and modules)."""
        names: list[str] = []
        for value in self.fp32_modules:
            if value == "flagged":
                names += [] if fp16_range is None else [*fp16_range["flagged_layers"], *fp16_range["flagged_modules"]]
            else:
                names.append(value)
        return list(dict.fromkeys(names))


def read_prompt_texts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or JSON Lines with a "prompt" string (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ProbeError(f"--prompts {path}: cannot read it ({reason})") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ProbeError(f"--prompts {path}: the file holds no prompts")
    is_jsonl = path.suffix == ".jsonl" or numbered[0][1].lstrip().startswith("{")
    if not is_jsonl:
        return [line for _, line in numbered]
    texts = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ProbeError(f"--prompts {path}, line {number}: expected a JSON object with a non-empty \"prompt\" string")
        texts.append(record["prompt"])
    return texts


def encode_prompts(texts: Sequence[str], tokenizer: Any, chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt, as a user turn in the model's chat template when it has one."""
    ids = []
    for text in texts:
        if chat_template and tokenizer.chat_template:
            messages = [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids.append(encode_text(tokenizer, text))
    return ids


