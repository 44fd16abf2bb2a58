"""`fp16rl demo`: the whole story on built-in defaults, with no downloads, in about ten minutes.

Warm-start the tiny model on arc-lite (cached after the first time), run bf16 vs fp16 with paired
seeds on arc-lite code RL, probe SmolLM2-135M's mismatch, and write the comparison report.

CPUs differ by an order of magnitude in half-precision speed (most have no float16 matmul kernel, some
no bfloat16 one; ``model.half_matmul`` widens those linears, the rest stays slow), so the demo measures
this machine first: one real GRPO step per arm and a small
probe, then sizes the number of steps and the probe to fit ``BUDGET_S`` and says how long it will
take. ``quick`` is a ~2-minute smoke version (4 steps, one seed, no probe) used in tests.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from fp16rl.core.atomic import atomic_write_text

ARMS = ("dtype=bfloat16", "dtype=float16")
BUDGET_S = 600.0  # the whole demo, warm start included
RUN_OVERHEAD_S = 10.0  # per training run: a new process, imports, model load, sandbox workers
REPORT_S = 20.0
MIN_STEPS, MAX_STEPS = 8, 40
SEEDS = (0, 1)
PROBE_SAMPLES, PROBE_TOKENS = (4, 16), (32, 96)  # smallest and full probe sizes
PROBE_SHARE = 0.3  # of the time left after the warm start
PROBE_OVERHEAD_S = 20.0  # loading SmolLM2, the fp16 range check


@dataclass(frozen=True)
class DemoPlan:
    steps: int
    seeds: tuple[int, ...]
    probe: bool
    probe_samples: int = PROBE_SAMPLES[1]
    probe_tokens: int = PROBE_TOKENS[1]
    expected_s: float = 0.0  # of the RL comparison, probe and report (what is left to run)

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(steps=4, seeds=(0,), probe=False)

    @classmethod
    def sized(cls, budget_s: float, step_s: dict[str, float], probe_token_s: float | None) -> "DemoPlan":
        """Steps and probe size that fit ``budget_s``, from measured seconds per RL step of each arm and
        seconds per probe sample-token (all dtypes together; None = no probe possible).

        ``time = runs x overhead + seeds x steps x sum(step_s) + samples x tokens x probe_token_s + report``.
        """
        runs = len(SEEDS) * len(step_s)
        probe_budget = PROBE_SHARE * budget_s if probe_token_s is not None else 0.0
        samples, tokens = PROBE_SAMPLES[1], PROBE_TOKENS[1]
        if probe_token_s is not None:
            while samples * tokens * probe_token_s > probe_budget and (samples, tokens) != (PROBE_SAMPLES[0],
                                                                                            PROBE_TOKENS[0]):
                samples, tokens = max(PROBE_SAMPLES[0], samples // 2), max(PROBE_TOKENS[0], tokens * 2 // 3)
            probe_budget = PROBE_OVERHEAD_S + samples * tokens * probe_token_s
        rl_budget = budget_s - probe_budget - REPORT_S - runs * RUN_OVERHEAD_S
        per_step = len(SEEDS) * sum(step_s.values())
        steps = int(min(MAX_STEPS, max(MIN_STEPS, math.floor(rl_budget / per_step))))
        expected = runs * RUN_OVERHEAD_S + steps * per_step + probe_budget + REPORT_S
        return cls(steps=steps, seeds=SEEDS, probe=probe_token_s is not None, probe_samples=samples,
                   probe_tokens=tokens, expected_s=expected)

    def describe(self) -> str:
        probe = f"; probe {self.probe_samples} samples x {self.probe_tokens} tokens" if self.probe else ""
        return f"{len(self.seeds)} seed(s) x {self.steps} steps per arm{probe}"


def fresh_dir(base: Path) -> Path:
    """``base`` if unused, else ``base-2``, ``base-3``...: a demo never overwrites an earlier one."""
    candidate, index = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        index += 1
        candidate = base.with_name(f"{base.name}-{index}")
    return candidate


def base_options(model_path: Path, dataset_path: Path, steps: int) -> dict:
    """The arc-lite RL settings both arms share (the arms then set the dtype)."""
    from fp16rl.tasks.arc.lite import ARC_LITE_RL_OPTIONS

    options = {key: value for key, value in ARC_LITE_RL_OPTIONS.items() if key != "dtype"}
    options.update(model_path=str(model_path), dataset_path=str(dataset_path), max_steps=steps,
                   save_steps=max(1, steps // 2), save_samples_steps=5)
    return options


def measure_step_seconds(model_path: Path, dataset_path: Path) -> dict[str, float]:
    """Seconds of one real arc-lite GRPO step per arm dtype on this machine (the second of two steps,
    so one-time start-up costs are left out)."""
    from fp16rl.config.options import TrainConfig
    from fp16rl.training.trainer import Trainer

    seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        for arm in ARMS:
            dtype = arm.split("=", 1)[1]
            options = {**base_options(model_path, dataset_path, 2), "dtype": dtype}
            trainer = Trainer(TrainConfig(output_dir=str(Path(folder) / dtype), **options))
            try:
                trainer.step(1)
                start = time.perf_counter()
                trainer.step(2)
                seconds[dtype] = time.perf_counter() - start
            finally:
                trainer.task.close()
                trainer.tracker.close()
    return seconds


def measure_probe_token_seconds(model: Path) -> float:
    """Seconds per sample-token of the probe (every dtype, sampler and trainer), from a small probe."""
    from fp16rl.probe import ProbeSettings, run_probe

    samples, tokens = 2, 16
    result = run_probe(ProbeSettings(model_path=str(model), num_samples=samples, max_new_tokens=tokens,
                                     batch_sizes=(2,), check_fp16_range=False))
    seconds = sum(c.metrics["time/sampler_s"] + c.metrics["time/trainer_s"] for c in result.configs)
    return seconds / (samples * tokens)


def prepare_probe_model(say: Callable[[str], None]) -> Path | None:
    from fp16rl.core.errors import ModelError
    from fp16rl.tools.zoo import prepare_model

    try:
        return prepare_model("smollm2-135m")
    except ModelError as err:
        say(f"    probe skipped: {err}")
        return None


def run_demo(output_dir: Path, quick: bool, say: Callable[[str], None] = print, budget_s: float = BUDGET_S) -> Path:
    """Run every stage; returns the report's HTML path."""
    from fp16rl.compare import STOPPED_OUTCOMES, run_comparison
    from fp16rl.report import build_report
    from fp16rl.tasks.arc.lite import arc_lite_dataset
    from fp16rl.tools.arc_lite import ArcLiteSettings, arc_lite_warm_model

    started = time.perf_counter()
    output_dir = fresh_dir(Path(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)

    say("1/4 warm-starting the tiny model on arc-lite (cached after the first time)...")
    model = arc_lite_warm_model(ArcLiteSettings(), show_progress=True)
    dataset = arc_lite_dataset()  # held-out tasks the warm model sometimes solves

    if quick:
        plan = DemoPlan.quick()
    else:
        say("    measuring this CPU: one GRPO step per arm and a small probe...")
        step_s = measure_step_seconds(model, dataset)
        probe_model = prepare_probe_model(say)
        probe_token_s = measure_probe_token_seconds(probe_model) if probe_model is not None else None
        plan = DemoPlan.sized(budget_s - (time.perf_counter() - started), step_s, probe_token_s)
        speeds = ", ".join(f"{dtype} {seconds:.1f} s/step" for dtype, seconds in step_s.items())
        say(f"    measured {speeds}; plan: {plan.describe()}; expected to finish in about "
            f"{(time.perf_counter() - started + plan.expected_s) / 60:.0f} min in all")

    say(f"2/4 bf16 vs fp16 GRPO on arc-lite: {len(plan.seeds)} seed(s) x {plan.steps} steps per arm...")
    base = output_dir / "base.yaml"
    atomic_write_text(base, yaml.safe_dump(base_options(model, dataset, plan.steps), sort_keys=False))
    compare_dir = output_dir / "compare"
    outcomes = run_comparison(base, ARMS, plan.seeds, compare_dir,
                              on_event=lambda spec, event: say(f"    {spec.arm.name} seed {spec.seed}: {event}"))
    if any(outcome in STOPPED_OUTCOMES for outcome in outcomes.values()):  # Ctrl-C: compare stopped its runs
        say(f"    stopped; the runs so far are in {compare_dir / 'runs'}")
        raise KeyboardInterrupt
    failed = [run for run, outcome in outcomes.items() if outcome == "failed"]
    if failed:
        raise RuntimeError(f"demo runs failed; see the logs in {compare_dir / 'logs'}: {failed}")

    if plan.probe:
        from fp16rl.probe import ProbeSettings, run_probe, write_outputs

        say("3/4 probing SmolLM2-135M's sampler/trainer mismatch in bf16, fp16, fp32...")
        result = run_probe(ProbeSettings(model_path=str(probe_model), num_samples=plan.probe_samples,
                                         max_new_tokens=plan.probe_tokens), show_progress=True)
        write_outputs(result, output_dir / "probe")
    else:
        say("3/4 probe skipped" + (" (--quick)" if quick else ""))

    say("4/4 writing the report...")
    html = build_report([compare_dir], output_dir / "report")
    say(f"    done in {(time.perf_counter() - started) / 60:.1f} min")
    return html
