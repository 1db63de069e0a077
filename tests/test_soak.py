"""`hybrid bench soak`'s verdict pieces on real processes and numbers (the full soak is a benchmark)."""

from __future__ import annotations

import random
import subprocess
import sys
import time

from bench.soak import MIB, MemorySample, memory_verdict, slope_per_hour, watch_load


def _sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_the_load_stops_when_the_server_exits():
    load, server = _sleeper(120), _sleeper(0.5)
    started = time.monotonic()
    died_at = watch_load(load, server, started, deadline_s=60)
    assert died_at is not None and died_at < 30
    assert load.poll() is not None  # the load generator was stopped, not left hammering a dead port


def test_a_load_that_ends_with_the_server_alive_reports_no_death():
    load, server = _sleeper(0.5), _sleeper(120)
    try:
        assert watch_load(load, server, time.monotonic(), deadline_s=60) is None
        assert load.returncode == 0
    finally:
        server.kill()


def _samples(pss_mib) -> list[MemorySample]:
    return [MemorySample(t, 0, int(pss_mib(t) * MIB)) for t in range(0, 3600, 10)]


def test_memory_verdict_ignores_the_warm_up_and_judges_the_peaks():
    # 200 MiB of growth in the first 10 minutes, then +30 MiB per hour: flat under a 64 MiB/h limit
    slow = _samples(lambda t: 1000 + min(t, 600) / 3 + max(t - 600, 0) * 30 / 3600)
    verdict = memory_verdict(slow, warmup_s=600, max_growth_mib_per_hour=64)
    assert verdict["flat"] and abs(verdict["pss_slope_mib_per_hour"] - 30) < 0.5
    assert abs(verdict["peak_growth_mib"] - 30 * 25 / 60) < 0.5  # the later half's peak, 25 minutes on
    assert not memory_verdict(slow[:60], warmup_s=0, max_growth_mib_per_hour=64)["flat"]  # the warm-up's ramp
    assert slope_per_hour([(0, 5.0), (1800, 5.0)]) == 0.0


def test_a_leak_fails_and_a_cache_that_stops_filling_passes():
    rng = random.Random(0)
    noise = {t: rng.uniform(-4, 4) for t in range(0, 3600, 10)}
    leak = _samples(lambda t: 1000 + t * 100 / 3600 + noise[t])  # 100 MiB/h, steadily
    assert not memory_verdict(leak, warmup_s=600, max_growth_mib_per_hour=64)["flat"]
    # one 35 MiB step 25 minutes in (a late cache entry), then bounded: the slope says 'rising', the peaks do not
    step = _samples(lambda t: 1000 + (35 if t >= 1500 else 0) + (20 if 840 <= t < 850 else 0) + noise[t])
    verdict = memory_verdict(step, warmup_s=600, max_growth_mib_per_hour=64)
    assert verdict["flat"] and verdict["pss_slope_mib_per_hour"] > 0


def test_too_few_samples_after_the_warm_up_is_not_flat():
    assert not memory_verdict(_samples(lambda t: 1000)[:62], warmup_s=600, max_growth_mib_per_hour=64)["flat"]
