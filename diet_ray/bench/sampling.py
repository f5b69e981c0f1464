"""A background sampler for benchmarks: a daemon thread that calls ``tick()`` every ``interval``
seconds between ``__enter__`` and ``__exit__`` (once more on exit, so a short run still gets a
sample at its end). Subclasses keep their own peaks in ``tick``."""
from __future__ import annotations

import threading
from typing import Any


class PeriodicSampler:
    def __init__(self, interval: float):
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def tick(self) -> None:
        """One sample; runs on the sampler thread."""
        raise TypeError(f"{type(self).__name__} must define tick()")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeriodicSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.tick()
