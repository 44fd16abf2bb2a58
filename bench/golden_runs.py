"""Golden fp32 runs: record metrics.jsonl of four short runs, or check that a refactoring left them equal.

A restructuring must not change behaviour. In fp32 on one machine the runs are deterministic, so the
step records (timings aside) of the same four runs before and after must be identical:
tiny model on toy:digits and on arc-lite (the warm-started tiny model), LoRA and full fine-tuning,
4 steps each.

    .venv/bin/python bench/golden_runs.py record /tmp/golden-before     # on the old commit
    .venv/bin/python bench/golden_runs.py check /tmp/golden-before      # after the change
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from fp16rl.config.options import TrainConfig
from fp16rl.runs.tracking import read_metrics
from fp16rl.training.trainer import Trainer

COMMON = dict(dtype="float32", max_steps=4, save_steps=2, seed=0, beta=0.01)
TOY = dict(model_path="tiny", dataset_path="toy:digits", learning_rate=2e-3, num_generations=8, prompts_per_step=4,
           max_completion_length=24, max_seq_length=256, max_grad_norm=1.0, warmup_ratio=0.0, top_p=1.0,
           mask_truncated_completions=False)


def runs() -> dict[str, dict]:
    from fp16rl.tasks.arc.lite import ARC_LITE_RL_OPTIONS, arc_lite_dataset
    from fp16rl.tools.arc_lite import arc_lite_warm_model

    arc = {**ARC_LITE_RL_OPTIONS, "model_path": str(arc_lite_warm_model()), "dataset_path": str(arc_lite_dataset())}
    return {
        "toy-full": {**TOY, **COMMON, "lora_r": 0},
        "toy-lora": {**TOY, **COMMON, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2},
        "arc-lite-full": {**arc, **COMMON, "lora_r": 0},
        "arc-lite-lora": {**arc, **COMMON, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2},
    }


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records]


def compare(golden: list[dict], records: list[dict]) -> str:
    """``identical`` when every recorded metric of every step is equal; metrics added since the recording
    are named but do not count (a feature may log more), a missing or changed one does."""
    if golden == records:
        return f"identical ({len(records)} steps, {len(records[0])} metrics each)"
    if len(golden) != len(records):
        return f"DIFFERENT: {len(records)} steps, {len(golden)} recorded"
    for old, new in zip(golden, records):
        missing = sorted(set(old) - set(new))
        changed = [k for k in old if k in new and old[k] != new[k]]
        if missing or changed:
            return f"DIFFERENT at step {old.get('step')}: missing {missing[:3]}, changed {changed[:3]}"
    added = sorted(set(records[0]) - set(golden[0]))
    return f"identical on the {len(golden[0])} recorded metrics ({len(records)} steps); new metrics: {', '.join(added)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("fp16rl").setLevel(logging.ERROR)
    failures = []
    for name, options in runs().items():
        with tempfile.TemporaryDirectory() as tmp:
            Trainer(TrainConfig(output_dir=str(Path(tmp) / name), **options)).train(show_progress=False)
            records = comparable(read_metrics(Path(tmp) / name / "metrics.jsonl"))
        golden = args.folder / f"{name}.json"
        if args.mode == "record":
            args.folder.mkdir(parents=True, exist_ok=True)
            golden.write_text(json.dumps(records, indent=1))
            print(f"{name}: recorded {len(records)} steps")
        else:
            verdict = compare(json.loads(golden.read_text()), records)
            print(f"{name}: {verdict}")
            if verdict.startswith("DIFFERENT"):
                failures.append(name)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
