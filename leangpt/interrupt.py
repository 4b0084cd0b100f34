"""SIGINT / SIGTERM during training: finish the step, save, return (a killed run would lose its last steps)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """While entered, SIGINT and SIGTERM only set `signal`; the training loop checks it after each step.

    Outside the main thread (where Python cannot install handlers) it never fires.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "signal on another rank"

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
