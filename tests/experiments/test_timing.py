"""median_time's call counts under a fake clock (deterministic: each call advances the clock by a fixed step)."""
import pytest

from experiments.common import timing


@pytest.fixture
def fake_clock(monkeypatch):
    clock = {"now": 0.0, "calls": 0}

    def perf_counter():
        return clock["now"]

    def fn():
        clock["now"] += 2.0 ** -6  # exact in binary: the sums below are exact
        clock["calls"] += 1
        return 0

    monkeypatch.setattr(timing.time, "perf_counter", perf_counter)
    return clock, fn


def test_repeats_warmup_and_min_timed_seconds(fake_clock):
    clock, fn = fake_clock
    stats = timing.median_time(fn, warmup=2, repeats=3)
    assert (stats["warmup"], stats["repeats"], clock["calls"]) == (2, 3, 5)
    assert stats["median_s"] == 2.0 ** -6
    # min_timed_s: timed calls go on past `repeats` until they add up to 10 calls' time
    stats = timing.median_time(fn, warmup=1, repeats=3, min_timed_s=10 * 2.0 ** -6)
    assert stats["repeats"] == 10
    # the budget still stops them (first call included), after at least one timed call
    stats = timing.median_time(fn, warmup=1, repeats=3, min_timed_s=1.0, budget_s=5 * 2.0 ** -6)
    assert stats["repeats"] == 4
    stats = timing.median_time(fn, warmup=5, repeats=3, budget_s=2.0 ** -10)
    assert (stats["warmup"], stats["repeats"]) == (1, 1)


def test_interleaved_calls_alternate_and_count_per_function(monkeypatch):
    clock, order = {"now": 0.0}, []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def make(name, seconds):
        def fn():
            clock["now"] += seconds
            order.append(name)
        return fn

    # call lengths of 1/64 and 1/32 s: exact in binary, so the sums below are exact
    stats = timing.interleaved_median_times({"a": make("a", 2.0 ** -6), "b": make("b", 2.0 ** -5)}, warmup=2,
                                            repeats=2, min_timed_s=0.125)
    # first calls, one warm-up round, then round-robin until each has >= 2 calls adding up to 1/8 s
    assert order[:4] == ["a", "b", "a", "b"] and order[4:6] == ["a", "b"]
    assert stats["a"]["repeats"] == 8 and stats["b"]["repeats"] == 4
    assert stats["a"]["median_s"] == 2.0 ** -6 and stats["b"]["median_s"] == 2.0 ** -5
    assert order[4:12] == ["a", "b"] * 4  # alternating while both still need calls
