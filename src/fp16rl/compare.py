"""Paired multi-seed comparisons: every arm x seed as an ordinary ``fp16rl train`` run.

Pairing comes from the seed alone: a task's prompts and augmentations are a pure function of
``(seed, step)`` and the sampler's draws of ``step_seed(seed, step)``, so runs with the same seed
see the same prompts in every arm; only what the arm changes (e.g. the dtype) differs.

Layout: ``<out>/compare.json`` (base options, arms, seeds), ``<out>/runs/<arm_slug>/seed-<s>/``
(normal run folders), ``<out>/logs/<arm_slug>-seed-<s>.log``. Re-running the same command keeps
finished runs, resumes interrupted ones from their last checkpoint and starts missing ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from fp16rl.core.atomic import atomic_write_text
from fp16rl.runs.checkpoint import checkpoint_dirs
from fp16rl.config.options import TrainConfig
from fp16rl.config.parse import (build_parser, is_trl_call, load_yaml_mapping, load_yaml_options, option_names,
                                 parse_train_args)
from fp16rl.config.trl_fields import TRL_FIELDS
from fp16rl.core.errors import INTERRUPTED_EXIT, ConfigError
from fp16rl.core.paths import TINY, resolve_model_path
from fp16rl.runs.folders import arm_slug, FINAL_STATUSES, refuse_used_folder
from fp16rl.tasks.checks import check_dataset


@dataclass(frozen=True)
class Arm:
    name: str  # as the user wrote it, e.g. "dtype=bfloat16,is_correction=token_truncate"
    overrides: dict[str, str]

    @property
    def slug(self) -> str:
        return arm_slug(self.name)


def parse_arm(spec: str) -> Arm:
    """``"dtype=bfloat16,is_correction=token_truncate"`` -> an Arm; keys in either spelling."""
    names = {**{name: name for name in TRL_FIELDS}, **option_names()}  # fp16rl's names, and TRL's in a TRL base
    overrides = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ConfigError(f"arm {spec!r}: expected key=value pairs separated by commas, got {part!r}")
        name = names.get(key.strip().replace("-", "_"))
        if name is None or name in ("output_dir", "seed", "resume", "config", "arm"):
            raise ConfigError(f"arm {spec!r}: {key.strip()!r} is not an option an arm can set")
        overrides[name] = value.strip()
    if not overrides:
        raise ConfigError(f"arm {spec!r} sets nothing")
    return Arm(spec.strip(), overrides)


@dataclass
class RunSpec:
    arm: Arm
    seed: int
    run_dir: Path
    log_path: Path
    threads: int | None = None  # the comparison's one CPU thread count (None: the arm's or base's --threads)
    base_args: tuple[str, ...] = ()  # train options given on compare's command line, before the arm's

    def train_args(self, base_config: Path | None) -> list[str]:
        args = (["--config", str(base_config)] if base_config is not None else []) + list(self.base_args) + [
            "--output-dir", str(self.run_dir), "--seed", str(self.seed), "--arm", self.arm.name] + (
            [] if self.threads is None else ["--threads", str(self.threads)])
        for key, value in self.arm.overrides.items():
            flag = "--" + key.replace("_", "-")
            if value.lower() in ("true", "false") and key in TrainConfig.__dataclass_fields__ and _is_bool(key):
                args.append(flag if value.lower() == "true" else flag.replace("--", "--no-", 1))
            else:
                args += [flag, value]
        return args

    def state(self) -> str:
        """done | resume | fresh: what running it again means (a run the mismatch budget stopped is done: it
        would stop again at the same step)."""
        summary = self.run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") in FINAL_STATUSES:
            return "done"
        if checkpoint_dirs(self.run_dir):
            return "resume"
        return "fresh"


def _sets_threads(options: dict) -> bool:
    """Whether base or arm options fix the CPU threads (0 is auto: the comparison's count then applies)."""
    return str(options.get("threads", 0)).strip() not in ("0", "")


def _is_bool(name: str) -> bool:
    return isinstance(getattr(TrainConfig(), name), bool)


def split_train_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """compare's extra command-line words as (train options, arms): ``--arms A B --max-steps 5`` leaves
    ``B --max-steps 5``; the train options are those ``fp16rl train`` takes, the other words are arms."""
    args = list(args)
    _, leftover = build_parser(trl=is_trl_call(args)).parse_known_args(args)
    stray = [word for word in leftover if word.startswith("-")]
    if stray:
        raise ConfigError(f"unknown option(s) {' '.join(stray)}")
    train, arms = list(args), []
    for word in leftover:  # argparse keeps their order: take each one out of the command line
        index = next(i for i, w in enumerate(train) if w == word)
        arms.append(train.pop(index))
    owned = {"output_dir", "seed", "resume", "config", "arm"} & {w[2:].split("=")[0].replace("-", "_")
                                                                  for w in train if w.startswith("--")}
    if owned:
        raise ConfigError(f"--{sorted(owned)[0].replace('_', '-')} is compare's to set (per run), not a train option "
                          "here")
    return train, arms


def _base_options(base_config: Path | None) -> dict:
    """The base file's options as compare.json records them (a TRL file's as written)."""
    if base_config is None:
        return {}
    if is_trl_call(["--config", str(base_config)]):
        return {str(k): v for k, v in load_yaml_mapping(base_config, "config file").items()}
    return load_yaml_options(base_config)


def plan_comparison(base_config: Path | None, arm_specs: Sequence[str], seeds: Sequence[int], output_dir: Path,
                    parallel: int = 1, base_args: Sequence[str] = ()) -> list[RunSpec]:
    """Validate everything up front (each arm x seed parses as a train config) and record compare.json.

    CPU threads: the count changes the order of floating-point sums, so arms computing with other counts
    differ by more than their arm. Unless the base config or an arm sets ``threads``, every run gets one
    count, resolved when the comparison is first planned (``comparison_threads``) and kept in compare.json,
    so re-running the command (missing or resumed runs) uses it too."""
    base_config = Path(base_config) if base_config is not None else None
    base = _base_options(base_config)
    arms = [parse_arm(spec) for spec in arm_specs]
    if len({arm.slug for arm in arms}) != len(arms):
        raise ConfigError("two arms have the same name")
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    repeated = [seed for seed, count in Counter(seeds).items() if count > 1]
    if repeated:  # one run folder per arm x seed: a repeated seed would be one run, counted twice
        raise ConfigError(f"--seeds lists seed {repeated[0]} more than once")
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    manifest = {
        "base_config": base,
        "arms": [{"name": arm.name, "overrides": arm.overrides} for arm in arms],
        "seeds": list(seeds),
        **({"base_options": list(base_args)} if base_args else {}),  # absent when none: older compare.json agree
    }
    output_dir = Path(output_dir)
    manifest_path = output_dir / "compare.json"
    if manifest_path.is_file():
        stored = json.loads(manifest_path.read_text())
        threads = stored.pop("cpu_threads", None) or comparison_threads(parallel)  # None: written before it was kept
        if stored != manifest:
            raise ConfigError(f"{output_dir} holds a different comparison (compare.json differs); "
                              "use another --output-dir")
    else:
        refuse_used_folder(output_dir, "--output-dir", "it holds no compare.json; choose another folder")
        threads = comparison_threads(parallel)
    manifest["cpu_threads"] = threads
    specs = [RunSpec(arm, seed, output_dir / "runs" / arm.slug / f"seed-{seed}",
                     output_dir / "logs" / f"{arm.slug}-seed-{seed}.log",
                     None if _sets_threads(base) or _sets_threads(arm.overrides) or "threads" in
                     _option_names_used(base_args) else threads, tuple(base_args))
             for arm in arms for seed in seeds]
    for spec in specs:  # an impossible arm fails now, not after hours of other runs
        config = parse_train_args(spec.train_args(base_config))
        if config.model_path != TINY:
            resolve_model_path(config.model_path)
        check_dataset(config)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return specs


def _option_names_used(args: Sequence[str]) -> set[str]:
    return {word[2:].split("=")[0].replace("-", "_") for word in args if word.startswith("--")}


def run_comparison(
    base_config: Path | None,
    arm_specs: Sequence[str],
    seeds: Sequence[int],
    output_dir: Path,
    parallel: int = 1,
    on_event: Callable[[RunSpec, str], None] = lambda spec, event: None,
    base_args: Sequence[str] = (),
) -> dict[str, str]:
    """Run (or resume) every arm x seed; returns ``{run_dir: outcome}`` (kept | finished | failed...).
    ``base_args``: train options shared by every arm (after ``base_config``'s, before the arm's)."""
    specs = plan_comparison(base_config, arm_specs, seeds, output_dir, parallel, base_args)
    threads = max(1, (os.cpu_count() or 1) // max(parallel, 1))
    free_gpus: queue.Queue[str | None] = queue.Queue()
    for device in gpu_placement(max(parallel, 1), visible_gpus()):
        free_gpus.put(device)

    def execute(spec: RunSpec) -> tuple[str, str]:
        device = free_gpus.get()  # one of the run slots: a GPU of its own when there are enough
        try:
            return run_one(spec, device)
        finally:
            free_gpus.put(device)

    def run_one(spec: RunSpec, device: str | None) -> tuple[str, str]:
        if processes.stopped_by is not None:  # a signal came: leave it for the next invocation, unannounced
            return str(spec.run_dir), "not started"
        state = spec.state()
        if state == "done":
            on_event(spec, "kept")
            return str(spec.run_dir), "kept"
        if state == "fresh" and spec.run_dir.exists():
            # Interrupted before its first checkpoint: nothing to resume from; keep its partial output aside.
            spec.run_dir.rename(aside_name(spec.run_dir))
        args = spec.train_args(Path(base_config) if base_config is not None else None) + (
            ["--resume"] if state == "resume" else [])
        on_event(spec, "resuming" if state == "resume" else "starting")
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        with spec.log_path.open("a") as log:
            code = processes.run([sys.executable, "-m", "fp16rl.cli", "train", *args], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        result = run_outcome(code, spec.state())
        on_event(spec, result)
        return str(spec.run_dir), result

    processes = RunProcesses()
    with processes.relaying(), ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return dict(pool.map(execute, specs))


STOPPED_OUTCOMES = ("interrupted", "not started")  # a signal stopped the comparison; re-running resumes it


def run_outcome(code: int | None, state: str) -> str:
    """What became of one run, from its exit code (None: never started) and its folder's state."""
    if code is None:
        return "not started"
    if code == INTERRUPTED_EXIT:  # Ctrl-C or SIGTERM: stopped, with a checkpoint unless stopped at once
        return "interrupted"
    return "failed" if code != 0 else ("finished" if state == "done" else "incomplete")


class RunProcesses:
    """The ``fp16rl train`` processes of a comparison, and what a signal to ``compare`` does to them.

    Each run starts in a session of its own, so a Ctrl-C in the terminal reaches ``compare`` alone, which
    passes it (or a SIGTERM) on to every running run once: the first signal stops each at its next safe
    point with a checkpoint, a second one at once, as for a single run. After a signal no other run starts,
    so re-running the same command resumes exactly the runs that were stopped. (Before, a Ctrl-C stopped the
    runs in progress and ``compare`` went on to start the next ones; a SIGTERM left its runs going alone.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopped_by: str | None = None

    def run(self, argv: list[str], **popen: Any) -> int | None:
        """Run ``argv`` to its end and return its exit code; None, without starting it, after a signal."""
        with self._lock:
            if self.stopped_by is not None:
                return None
            process = subprocess.Popen(argv, start_new_session=True, **popen)
            self._running.add(process)
        try:
            return process.wait()
        finally:
            with self._lock:
                self._running.discard(process)

    def _relay(self, number: int, _frame: object) -> None:
        with self._lock:
            self.stopped_by = signal.Signals(number).name
            for process in self._running:
                process.send_signal(number)

    @contextlib.contextmanager
    def relaying(self) -> Iterator[None]:
        """Relay SIGINT and SIGTERM while the block runs (from the main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.signal(number, self._relay) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def aside_name(run_dir: Path) -> Path:
    """Where a run interrupted before its first checkpoint is kept: ``<run>.incomplete``, or
    ``<run>.incomplete-2``, ``-3``... when earlier attempts are already there (none is ever deleted)."""
    candidate, index = run_dir.with_name(run_dir.name + ".incomplete"), 1
    while candidate.exists():
        index += 1
        candidate = run_dir.with_name(f"{run_dir.name}.incomplete-{index}")
    return candidate


def comparison_threads(parallel: int) -> int:
    """The CPU threads of each of a comparison's runs: the cores idle now, shared by ``parallel`` runs at once
    (what ``hardware.auto_threads`` gives one run, resolved once for all of them)."""
    from fp16rl.model.hardware import idle_cores

    cores = os.cpu_count() or 1
    return max(1, min(cores, idle_cores(cores)) // max(parallel, 1))


def visible_gpus() -> list[str]:
    """The GPUs runs may use, as ``CUDA_VISIBLE_DEVICES`` names them (all of the machine's when unset)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def gpu_placement(parallel: int, gpus: Sequence[str]) -> list[str | None]:
    """The device of each of ``parallel`` run slots: GPUs dealt round-robin (one run per GPU when there
    are at least as many GPUs as slots), None (leave the environment alone) without GPUs."""
    if not gpus:
        return [None] * parallel
    return [gpus[slot % len(gpus)] for slot in range(parallel)]
