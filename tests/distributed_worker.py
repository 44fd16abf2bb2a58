"""One rank of a data-parallel test run (``python -m torch.distributed.run --nproc-per-node N`` this
file SPEC.json), or the one-process reference (run without torchrun).

SPEC: {"config": TrainConfig options, "report": folder, "overflow_step": k | null,
"signal_step": k | null}. ``overflow_step``: rank 1 alone makes its loss infinite at step k (an fp16
overflow on one rank). ``signal_step``: rank 1 alone receives SIGTERM during step k (as a Ctrl-C that
reaches one rank). Each rank writes report/rank-R.json: its status and a fingerprint of its weights,
optimizer and loss scale, so the test can check that the ranks stayed identical.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import weakref
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fp16rl.config.options import TrainConfig
from fp16rl.learner.fsdp import full_tensor
from fp16rl.training.trainer import Trainer


def fingerprint(trainer: Trainer) -> dict:
    """Sums over every weight and moment, whole (FSDP shards are gathered: a collective on every rank)."""
    masters = [full_tensor(m) for m in trainer.weights.masters]
    moments = [full_tensor(s["exp_avg"]) for s in trainer.optimizer.state.values() if "exp_avg" in s]
    return {
        "masters": sum(float(m.detach().double().abs().sum()) for m in masters),
        "model": sum(float(full_tensor(p).detach().double().abs().sum()) for p in trainer.weights.params),
        "adam": sum(float(m.double().abs().sum()) for m in moments),
        "scale": float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else 1.0,
        "skipped": trainer.counters["skipped_steps_total"],
    }


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    trainer = Trainer(TrainConfig(**spec["config"]))
    rank = trainer.parallel.rank
    current = {"step": 0}
    step = trainer.step

    def watched_step(number, stop=None):
        current["step"] = number
        if rank == 1 and number == spec.get("signal_step"):
            os.kill(os.getpid(), signal.SIGTERM)
        return step(number, stop)

    trainer.step = watched_step
    if rank == 1 and spec.get("overflow_step"):
        scale = trainer.scaler.scale
        trainer.scaler.scale = lambda loss: scale(loss) * (math.inf if current["step"] == spec["overflow_step"] else 1.0)
    close, trainer.parallel.close = trainer.parallel.close, lambda: None  # the fingerprint gathers FSDP shards
    ddp = weakref.ref(trainer.wrapped) if isinstance(trainer.wrapped, DistributedDataParallel) else None
    trainer.train(show_progress=False)
    prints = fingerprint(trainer)
    close()
    # DDP's Reducer freed after the group hangs gloo's teardown: it must be gone once the group is left.
    prints["wrapper_alive"] = ddp is not None and ddp() is not None
    report = Path(spec["report"])
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank-{rank}.json").write_text(json.dumps({"status": trainer.status, "world_size":
                                                          trainer.parallel.world_size, **prints}))


if __name__ == "__main__":
    main(sys.argv[1])
