"""ThreadTuner (service/engine/threads.py) with made-up step times: it keeps every thread while they are
faster, drops to one when one is faster (a busy host), probes less often after each probe that loses, and
leaves prefill steps and a one-thread engine alone."""
from __future__ import annotations

from service.engine.threads import BASE_INTERVAL, MAX_INTERVAL, PROBE_STEPS, ThreadTuner


def drive(tuner: ThreadTuner, seconds_by_threads: dict[int, float], steps: int, rows: int = 1) -> list[int]:
    used = []
    for _ in range(steps):
        tuner.begin(rows, decode_only=True)
        used.append(tuner.active)
        tuner.end(rows, True, seconds_by_threads[tuner.active])
    return used


def test_an_idle_host_keeps_every_thread_and_probes_ever_less_often():
    calls = []
    tuner = ThreadTuner(2, calls.append)
    used = drive(tuner, {2: 0.006, 1: 0.009}, 2000)
    assert tuner.current == 2
    assert used.count(1) <= 6 * PROBE_STEPS  # probes after 32, 64, 128, ... steps
    assert tuner.interval > BASE_INTERVAL and tuner.interval <= MAX_INTERVAL
    assert calls and set(calls) <= {1, 2}


def test_a_busy_host_switches_to_one_thread_and_back_when_it_is_idle_again():
    tuner = ThreadTuner(2, lambda n: None)
    drive(tuner, {2: 0.033, 1: 0.009}, BASE_INTERVAL + PROBE_STEPS)
    assert tuner.current == 1
    used = drive(tuner, {2: 0.033, 1: 0.009}, 500)
    assert used.count(1) > 0.9 * len(used)
    drive(tuner, {2: 0.006, 1: 0.009}, 3 * MAX_INTERVAL)  # the other process ended
    assert tuner.current == 2


def test_prefill_steps_and_single_thread_engines_are_left_alone():
    calls = []
    tuner = ThreadTuner(2, calls.append)
    for _ in range(100):
        tuner.begin(3, decode_only=False)
        tuner.end(3, False, 0.05)
    assert calls == [] and tuner.since_probe == 0
    single = ThreadTuner(1, calls.append)
    drive(single, {1: 0.01}, 100)
    assert calls == [] and not single.enabled
