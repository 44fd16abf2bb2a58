"""Ctrl-C and SIGTERM stop a run at the next safe point, with a checkpoint, instead of losing the work.

The first SIGINT/SIGTERM only sets a flag. The training loop polls it at safe points: every decoded
token, between micro-batches and at every decoder layer's forward, as long as the step has not yet
changed the weights. There ``StopRequest.check`` raises ``RunInterrupted``: the step is abandoned,
its partial gradients dropped, and the run saves the last completed step and records
``status: interrupted``; ``--resume`` then continues exactly. A second signal stops at once
(``StoppedAtOnce``). Before training starts (loading, checks) no handler is installed: Ctrl-C
raises ``KeyboardInterrupt`` there, and the CLI says that nothing was trained.

Data-parallel ranks must leave together (a rank that stops alone leaves the others waiting in a
collective), so with ``agree`` the mid-step safe points are off and the ranks decide between steps,
together: a signal that reached any rank stops all of them after the same step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:  # the CLI imports this module before torch loads (it tells the two kinds of Ctrl-C apart)
    import torch


class RunInterrupted(Exception):
    """Raised at a safe point after Ctrl-C or SIGTERM."""


class StoppedAtOnce(KeyboardInterrupt):
    """The second signal: the run stops where it is, without a checkpoint. A plain ``KeyboardInterrupt``
    is a first Ctrl-C that came while no ``StopRequest`` was installed (start-up, before training)."""


class StopRequest:
    """The flag the signal handlers set and the safe points poll."""

    def __init__(self, agree: Callable[[bool], bool] | None = None) -> None:
        """``agree(flag)``: True on every rank when ``flag`` is True on any (data-parallel training)."""
        self.signal_name: str | None = None
        self.armed = True  # False while the weights are being changed: finish that first
        self.agree = agree

    def check(self) -> None:
        """A safe point inside a step (none when the ranks must agree)."""
        if self.signal_name is not None and self.armed and self.agree is None:
            raise RunInterrupted(self.signal_name)

    def check_between_steps(self) -> None:
        """The safe point after a step: every rank reaches it, so the ranks can agree here."""
        requested = self.signal_name is not None
        if self.agree is not None:
            requested = self.agree(requested)
        if requested and self.armed:
            raise RunInterrupted(self.signal_name or "a signal on another rank")

    def _handle(self, number: int, _frame: object) -> None:
        if self.signal_name is not None:  # the second signal: do not wait for a safe point
            signal.signal(number, signal.SIG_DFL)
            raise StoppedAtOnce
        self.signal_name = signal.Signals(number).name
        print(f"\n{self.signal_name}: stopping at the next safe point and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Handle SIGINT/SIGTERM while the block runs (only possible in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def watching_layers(self, model: torch.nn.Module) -> Iterator[None]:
        """Poll the flag before every decoder layer's forward, so a long forward stops within one layer."""
        handles = [module.register_forward_pre_hook(lambda *_: self.check())
                   for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
