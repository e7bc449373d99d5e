"""SIGTERM and Ctrl-C during training: noted, so that the loop can checkpoint and stop cleanly."""

from __future__ import annotations

import signal
from typing import Optional

__all__ = ["StopSignals"]


class StopSignals:
    """``with StopSignals() as stop:`` notes SIGTERM and SIGINT (Ctrl-C) in ``stop.received``
    instead of raising, so the training loop can finish its step, save a checkpoint and
    exit. A second Ctrl-C raises ``KeyboardInterrupt`` at once (saving nothing more).
    The previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) nothing is installed and nothing is noted.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        self.received = signum
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def name(self) -> str:
        return "Ctrl-C (SIGINT)" if self.received == signal.SIGINT else "SIGTERM"

    @property
    def exit_code(self) -> int:
        """The shell's code for the signal: 130 for Ctrl-C, 143 for SIGTERM."""
        return 130 if self.received == signal.SIGINT else 143

    def __enter__(self) -> StopSignals:
        try:
            self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
            for sig in self.SIGNALS:
                signal.signal(sig, self._note)
        except ValueError:  # not in the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
