"""Guards against silent failures, and the test-only fault injection that proves they work.

`UpdateGuard` decides, once per optimizer update, whether the update may touch the weights:
  - a non-finite loss or gradient norm: skip (train.nonfinite=skip, the default) or stop
    (train.nonfinite=raise) with nothing of the bad update applied or saved;
  - a loss spike: the update's loss above mean + train.spike_sigma * std of the last
    train.spike_window accepted updates is skipped; after train.spike_max_consecutive skips in a row
    the run stops (it has diverged, or its data changed), since skipping forever would hide it.
Its window and counters are part of the checkpoint, so a resumed run judges exactly as the
uninterrupted one would.

`StopSignals` turns SIGTERM/SIGINT into a request to finish the current update, save and exit 0.

`FaultPlan` reads MOELAB_FAULTS (tests only; never set it in real runs), a comma-separated list of
`kind@update[:arg]`:
  nan@K        the loss of update K becomes NaN          spike@K[:x]  ... is multiplied by x (50)
  kill@K       SIGKILL to this process during update K   term@K       SIGTERM during update K
  kill_save@K:N  SIGKILL after N files of the checkpoint of update K are written
  oom@K        raise torch.OutOfMemoryError in update K
  kill_eval@K, term_eval@K  SIGKILL / SIGTERM as the final evaluation after update K starts
  kill_data@0  SIGKILL as a new run starts preparing its data
A `/R` suffix limits a fault to rank R of a data-parallel run (`term@7/1`: rank 1 only).
"""

from __future__ import annotations

import math
import os
import signal
from collections import deque

import torch

from moelab.errors import UserError


class TrainingStopped(UserError):
    """The run cannot go on (non-finite loss with nonfinite=raise, or a persistent spike)."""


class UpdateGuard:
    def __init__(self, nonfinite: str = "skip", spike_sigma: float = 6.0, window: int = 50,
                 min_history: int = 20, max_consecutive: int = 10):
        self.nonfinite, self.spike_sigma = nonfinite, spike_sigma
        self.min_history, self.max_consecutive = min_history, max_consecutive
        self.history: deque[float] = deque(maxlen=window)
        self.skipped = {"nonfinite": 0, "spike": 0, "overflow": 0}
        self.consecutive_spikes = 0

    def check(self, step: int, loss: float, grad_norm: float, scaler_in_use: bool = False) -> str:
        """'ok', 'nonfinite', 'spike' or 'overflow' (fp16 scaler overflow: the scaler skips it
        and lowers its scale; a normal event, counted apart from faults)."""
        if not math.isfinite(loss):
            verdict = "nonfinite"
        elif not math.isfinite(grad_norm):
            verdict = "overflow" if scaler_in_use else "nonfinite"
        elif self.is_spike(loss):
            verdict = "spike"
        else:
            verdict = "ok"
        if verdict == "nonfinite" and self.nonfinite == "raise":
            raise TrainingStopped(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at update {step}; "
                "nothing of it was applied or saved. Lower the LR, raise warmup, or set "
                "train.nonfinite=skip to skip such updates")
        if verdict != "ok":
            self.skipped[verdict] += 1
        if verdict == "spike":
            self.consecutive_spikes += 1
            if self.consecutive_spikes >= self.max_consecutive:
                raise TrainingStopped(
                    f"loss stayed above its recent mean + {self.spike_sigma:g} std for "
                    f"{self.consecutive_spikes} updates in a row (update {step}, loss {loss:.4g}); the run "
                    "diverged or its data changed. Resume from an earlier checkpoint with a lower LR, "
                    "or raise train.spike_sigma")
        else:
            self.consecutive_spikes = 0
        if verdict == "ok":
            self.history.append(loss)
        return verdict

    def is_spike(self, loss: float) -> bool:
        n = len(self.history)
        if self.spike_sigma <= 0 or n < self.min_history:
            return False
        mean = sum(self.history) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.history) / (n - 1))
        return loss > mean + self.spike_sigma * max(std, 1e-3 * abs(mean))

    def state_dict(self) -> dict:
        return {"history": torch.tensor(list(self.history), dtype=torch.float64),
                "skipped": dict(self.skipped), "consecutive_spikes": self.consecutive_spikes}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"].tolist())
        self.skipped.update(state["skipped"])
        self.consecutive_spikes = int(state["consecutive_spikes"])


class StopSignals:
    """While active, SIGTERM/SIGINT set `requested` instead of killing the process; a second
    SIGINT interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class FaultPlan:
    ENV = "MOELAB_FAULTS"

    def __init__(self, spec: str | None = None):
        spec = os.environ.get(self.ENV, "") if spec is None else spec
        self.faults: dict[tuple[str, int], str] = {}
        rank = int(os.environ.get("RANK", "0"))
        for item in filter(None, (s.strip() for s in spec.split(","))):
            item, _, only = item.partition("/")
            if only and int(only) != rank:
                continue
            kind, _, rest = item.partition("@")
            step, _, arg = rest.partition(":")
            self.faults[(kind, int(step))] = arg

    def __bool__(self) -> bool:
        return bool(self.faults)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if ("nan", step) in self.faults:
            return loss * float("nan")
        if ("spike", step) in self.faults:
            return loss * float(self.faults[("spike", step)] or 50)
        return loss

    def during_update(self, step: int) -> None:
        if ("oom", step) in self.faults:
            raise torch.OutOfMemoryError("injected out-of-memory (MOELAB_FAULTS)")
        if ("term", step) in self.faults:
            os.kill(os.getpid(), signal.SIGTERM)
        if ("kill", step) in self.faults:
            os.kill(os.getpid(), signal.SIGKILL)

    def data_preparation(self) -> None:
        """Called as a new run starts preparing its data: `kill_data@0` SIGKILLs it there."""
        if ("kill_data", 0) in self.faults:
            os.kill(os.getpid(), signal.SIGKILL)

    def final_eval(self, step: int) -> None:
        """Called as the final evaluation after update `step` starts: `kill_eval@K` SIGKILLs it,
        `term_eval@K` sends SIGTERM."""
        if ("term_eval", step) in self.faults:
            os.kill(os.getpid(), signal.SIGTERM)
        if ("kill_eval", step) in self.faults:
            os.kill(os.getpid(), signal.SIGKILL)

    def save_hook(self, step: int):
        """A callback for save_checkpoint(after_file=...) that kills the writer, or None."""
        arg = self.faults.get(("kill_save", step))
        if arg is None:
            return None
        limit = int(arg or 1)
        written = []

        def after_file(name: str) -> None:
            written.append(name)
            if len(written) >= limit:
                os.kill(os.getpid(), signal.SIGKILL)
        return after_file
