"""Stopping a run cleanly: Ctrl-C or SIGTERM asks the training loop to stop after the
current step, with a checkpoint that continues exactly."""

from __future__ import annotations

import signal
import threading

from rich.console import Console


class StopRequest:
    """Ctrl-C or SIGTERM during training asks the loop to stop at the end of the current
    step, so that the checkpoint it saves continues exactly. SIGTERM is what ``kill``,
    cluster schedulers (before their SIGKILL) and torchrun (to every process) send. A
    Ctrl-C while a stop is pending stops at once (the newest complete checkpoint is kept);
    a repeated SIGTERM changes nothing."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, console: Console):
        self.console = console
        self.signal: int | None = None  # the first signal received
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signum
        self.console.print(
            f"[yellow]{self.SIGNALS[signum]}:[/] saving a checkpoint after this step, then "
            "stopping (press Ctrl-C again to stop at once).",
            highlight=False,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
