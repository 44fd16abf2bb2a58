"""`fp16rl demo`: the whole story on built-in defaults, with no downloads.

Warm-start the tiny model on arc-lite (cached after the first time), run bf16 vs fp16 with paired
seeds on arc-lite code RL, probe SmolLM2-135M's mismatch if it has been prepared, and write the
comparison report. ``quick`` is a ~2-minute version (fewer steps, one seed, no probe) used in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from fp16rl.atomic import atomic_write_text


@dataclass(frozen=True)
class DemoPlan:
    steps: int
    seeds: tuple[int, ...]
    probe: bool

    @classmethod
    def of(cls, quick: bool) -> "DemoPlan":
        return cls(steps=4, seeds=(0,), probe=False) if quick else cls(steps=40, seeds=(0, 1), probe=True)


ARMS = ("dtype=bfloat16", "dtype=float16")


def fresh_dir(base: Path) -> Path:
    """``base`` if unused, else ``base-2``, ``base-3``...: a demo never overwrites an earlier one."""
    candidate, index = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        index += 1
        candidate = base.with_name(f"{base.name}-{index}")
    return candidate


def base_options(model_path: Path, dataset_path: Path, plan: DemoPlan) -> dict:
    """The arc-lite RL settings both arms share (the arms then set the dtype)."""
    from fp16rl.sft import ARC_LITE_RL_OPTIONS

    options = {key: value for key, value in ARC_LITE_RL_OPTIONS.items() if key != "dtype"}
    options.update(model_path=str(model_path), dataset_path=str(dataset_path), max_steps=plan.steps,
                   save_steps=max(1, plan.steps // 2), logging_steps=5)
    return options


def probe_smollm2(output_dir: Path, say: Callable[[str], None]) -> None:
    """Prepare SmolLM2-135M (offline, once) and measure its bf16/fp16/fp32 mismatch; skipped if unavailable."""
    from fp16rl.models import ModelError
    from fp16rl.probe import ProbeSettings, run_probe, write_outputs
    from fp16rl.zoo import prepare_model

    try:
        model = prepare_model("smollm2-135m")
    except ModelError as err:
        say(f"3/4 probe skipped: {err}")
        return
    say("3/4 probing SmolLM2-135M's sampler/trainer mismatch in bf16, fp16, fp32...")
    result = run_probe(ProbeSettings(model_path=str(model), num_samples=8, max_new_tokens=96), show_progress=True)
    write_outputs(result, output_dir)


def run_demo(output_dir: Path, quick: bool, say: Callable[[str], None] = print) -> Path:
    """Run every stage; returns the report's HTML path."""
    from fp16rl.experiments import run_comparison
    from fp16rl.report import build_report
    from fp16rl.sft import ArcLiteSettings, arc_lite_dataset, arc_lite_warm_model

    plan = DemoPlan.of(quick)
    output_dir = fresh_dir(Path(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)

    say("1/4 warm-starting the tiny model on arc-lite (cached after the first time)...")
    model = arc_lite_warm_model(ArcLiteSettings(), show_progress=True)
    dataset = arc_lite_dataset()  # held-out tasks the warm model sometimes solves

    say(f"2/4 bf16 vs fp16 GRPO on arc-lite: {len(plan.seeds)} seed(s) x {plan.steps} steps per arm...")
    base = output_dir / "base.yaml"
    atomic_write_text(base, yaml.safe_dump(base_options(model, dataset, plan), sort_keys=False))
    compare_dir = output_dir / "compare"
    outcomes = run_comparison(base, ARMS, plan.seeds, compare_dir,
                              on_event=lambda spec, event: say(f"    {spec.arm.name} seed {spec.seed}: {event}"))
    failed = [run for run, outcome in outcomes.items() if outcome == "failed"]
    if failed:
        raise RuntimeError(f"demo runs failed; see the logs in {compare_dir / 'logs'}: {failed}")

    if plan.probe:
        probe_smollm2(output_dir / "probe", say)
    else:
        say("3/4 probe skipped (--quick)")

    say("4/4 writing the report...")
    return build_report([compare_dir], output_dir / "report")
