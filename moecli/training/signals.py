"""When a run stops before its last step: a signal (Ctrl-C, a scheduler's SIGTERM) or early stopping."""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass

from moecli.parallel.collectives import all_max
from moecli.parallel.launch import DistInfo


@dataclass
class EarlyStop:
    """train.patience: the lowest validation loss so far (its step) and the passes since without a lower one."""
    patience: int
    lowest: float = math.inf
    lowest_step: int = 0
    passes: int = 0

    @classmethod
    def resumed(cls, patience: int, ts: dict) -> "EarlyStop":
        """From a checkpoint's train_state.json (one written without it: counting starts anew)."""
        s = ts.get("early_stop") or {}
        lowest = s.get("lowest_val_loss")
        return cls(patience, math.inf if lowest is None else float(lowest), int(s.get("lowest_step", 0)),
                   int(s.get("passes", 0)))

    def update(self, val_loss: float, step: int) -> bool:
        """Count one validation pass; True when training should stop."""
        if val_loss < self.lowest:
            self.lowest, self.lowest_step, self.passes = val_loss, step, 0
        else:
            self.passes += 1
        return self.patience > 0 and self.passes >= self.patience

    def state(self) -> dict:
        """As train_state.json, the metrics and the summary record it."""
        return {"lowest_val_loss": self.lowest if math.isfinite(self.lowest) else None,
                "lowest_step": self.lowest_step, "passes": self.passes}


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) during training: the step under way finishes,
    the loop saves a checkpoint of it and ends (``Interrupted``); a second signal stops at once. Under
    torch.distributed the ranks agree at every step's end (``asked``), so all stop after the same step.
    A signal the process ignores stays ignored: ranks of ``moe train --nproc`` ignore SIGINT, and the
    launcher passes a Ctrl-C on to them as one SIGTERM (``parallel.launch.spawn``)."""

    def __init__(self):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.signum: int | None = None  # the signal this process got (set by its handler only)
        self.agreed: int | None = None  # the signal the run stops for (asked): this process's, or another rank's
        self._old: dict = {}

    def install(self) -> None:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    def asked(self, info: DistInfo) -> bool:
        """Whether to stop after this step: a signal came here, or (under torch.distributed) to any rank.
        Every rank calls it at the same point of every step (one small all-reduce when distributed), and all
        decide on the all-reduce's result; a signal whose handler runs during the all-reduce counts at the
        next step. (Assigning the result to signum lost such a signal: the ranks, which mostly wait inside
        that call on a busy machine, then ran to the end.)"""
        self.agreed = (all_max(self.signum or 0) or None) if info.world > 1 else self.signum
        return self.agreed is not None
