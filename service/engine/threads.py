"""ThreadTuner: on a CPU, how many intra-op threads the step thread runs with, chosen by timing decode steps.

Why: a step's parallel regions need every one of their threads at once. On an idle host two threads decode
~1.4x faster than one; on a host where another busy process takes a core, each region waits for the thread
the OS descheduled, and two threads are ~3.5x slower than one (SmolLM2 on 2 cores, spinning OpenMP workers:
33 vs 9 ms a batch-1 step; bench/results/cpu_fast_path.md). No fixed setting is right for both, and a host
changes while it serves. So the engine decodes with every thread and, from time to time, times a few decode
steps with one; whichever is faster for steps of that size is kept. A probe that loses waits twice as long
before the next, so a wrong guess costs little. Thread count does not change results: the CPU kernels
compute each output on one thread, in one order.
"""
from __future__ import annotations

import logging
import statistics
from collections import deque

log = logging.getLogger("kvserve.engine")

BASE_INTERVAL = 32  # decode steps between probes, after a probe that won
MAX_INTERVAL = 2048
PROBE_STEPS = 4
KEEP = 16  # recent step times per (thread count, batch size class)
MARGIN = 0.9  # a probe must be this much faster (time ratio) to switch


def size_class(rows: int) -> int:
    """1, 2, 4, 8, ...: steps of about the same size take about the same time."""
    return 1 << (rows - 1).bit_length()


class ThreadTuner:
    def __init__(self, max_threads: int, set_threads):
        self.choices = (max_threads, 1)
        self.current, self.active = max_threads, max_threads
        self.set_threads = set_threads  # torch.set_num_threads, or a test's recorder
        self.times: dict[tuple[int, int], deque[float]] = {}
        self.interval, self.since_probe, self.probe_left = BASE_INTERVAL, 0, 0
        self.probe_class: int | None = None

    @property
    def enabled(self) -> bool:
        return self.choices[0] > 1

    @property
    def other(self) -> int:
        return self.choices[1] if self.current == self.choices[0] else self.choices[0]

    def begin(self, rows: int, decode_only: bool) -> None:
        """Before a step: pick its thread count (a probe's, or the current one)."""
        if not self.enabled:
            return
        probing = decode_only and (self.probe_left > 0 or self.since_probe >= self.interval) and \
            self.probe_class in (None, size_class(rows))
        if probing and self.probe_left == 0:
            self.probe_left, self.probe_class = PROBE_STEPS, size_class(rows)
        self._use(self.other if probing else self.current)

    def end(self, rows: int, decode_only: bool, seconds: float) -> None:
        """After a step: record its time; at a probe's end, keep the faster thread count."""
        if not self.enabled or not decode_only:
            return
        key = (self.active, size_class(rows))
        self.times.setdefault(key, deque(maxlen=KEEP)).append(seconds)
        if self.active == self.current:
            self.since_probe += 1
            return
        self.probe_left -= 1
        if self.probe_left == 0:
            self._decide(size_class(rows))

    def _decide(self, cls: int) -> None:
        probe = statistics.median(list(self.times[(self.other, cls)])[-PROBE_STEPS:])
        mine = self.times.get((self.current, cls))
        self.since_probe, self.probe_class = 0, None
        if mine and probe < MARGIN * statistics.median(mine):
            log.info("decode steps of ~%d rows: %d intra-op thread(s) %.1f ms, %d thread(s) %.1f ms: switching to %d",
                     cls, self.other, probe * 1e3, self.current, statistics.median(mine) * 1e3, self.other)
            self.current, self.interval = self.other, BASE_INTERVAL
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)

    def _use(self, threads: int) -> None:
        if threads != self.active:
            self.set_threads(threads)
            self.active = threads
