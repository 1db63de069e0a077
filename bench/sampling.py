"""Watching a running server from the side: its process tree's memory, polled on a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def process_tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS summed over a process and its descendants (PSS counts shared pages once overall)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"rss_bytes": rss, "pss_bytes": pss, "processes": len(procs)}


class Sampler(threading.Thread):
    """Calls `probe()` every `interval_s` seconds until stopped; keeps (seconds since start, its answer)
    for every answer that is not empty."""

    def __init__(self, probe: Callable[[], dict], interval_s: float):
        super().__init__(daemon=True)
        self.probe, self.interval_s = probe, interval_s
        self.samples: list[tuple[float, dict]] = []
        self.started = time.monotonic()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            sample = self.probe()
            if sample:
                self.samples.append((time.monotonic() - self.started, sample))
            self._done.wait(self.interval_s)

    def stop(self) -> list[tuple[float, dict]]:
        self._done.set()
        self.join(timeout=30)
        return self.samples
