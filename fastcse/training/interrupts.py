"""SIGINT (Ctrl-C) and SIGTERM (what a job scheduler sends) during training: the run finishes
its current step, saves it, releases its lock and stops with one clear line, instead of a long
``KeyboardInterrupt`` traceback and the steps since the last evaluation lost.

A signal handler only records the signal; the training loop acts on it between steps, where
the model, the optimizer and the random streams are consistent (a checkpoint written in the
middle of a step would not resume bit-identically). A second signal aborts at once: the last
complete checkpoint stays valid, since every save is atomic.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM after finishing step ``step``, saved in ``checkpoint``
    (None: nothing saved, e.g. no step was trained yet). ``exit_code``: the shell's code for
    the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, total_steps: int, output_dir: Path, checkpoint: Path | None):
        self.signum, self.step, self.total_steps = signum, step, total_steps
        self.output_dir, self.checkpoint = output_dir, checkpoint
        self.exit_code = 128 + signum
        saved = f"saved in {checkpoint}" if checkpoint is not None else "nothing saved"
        super().__init__(f"stopped by {signal_name(signum)} after step {step} of {total_steps} ({saved}): continue "
                         f"with resume_from={str(output_dir)!r}")


class StopAborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM while the run was finishing its step or saving it: stopped at once."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"a second {signal_name(signum)} while stopping: aborted at once (the last complete "
                         "checkpoint stays valid)")


class StopRequests:
    """While entered (in the main thread; signal handlers can only be set there): the first
    SIGINT/SIGTERM is recorded in ``signum`` for the loop to act on after the current step; a
    second one raises :class:`StopAborted`. The previous handlers come back on exit."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce  # one notice on stderr (rank 0), so that the wait for the step is explained
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise StopAborted(signum)
        self.signum = signum
        if self.announce:  # os.write: a handler may run in the middle of a print or a log call
            os.write(2, f"\nfastcse: {signal_name(signum)} received: finishing the current step and saving it "
                        f"(send it again to abort at once)\n".encode())
