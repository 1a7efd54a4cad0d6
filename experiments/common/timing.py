"""Measuring wall time and memory of jitted functions honestly (used by every benchmark).

* `median_time`: warm up first (the first call, which compiles unless `fn` is already compiled,
  plus more untimed calls), then time each call to completion with `jax.block_until_ready`; the
  median of the timed calls is reported. An optional time budget caps the number of calls.
  `interleaved_median_times` does the same for several functions at once, alternating their calls,
  so that a ratio of two of them is not skewed by the machine's speed drifting between them.
* `aot_compile` / `memory_of` / `compiled_memory`: compile ahead of time once, and read XLA's own
  memory analysis of the executable (temporary buffers, arguments, outputs) from
  `jax.jit(f).lower(*args).compile().memory_analysis()`; the compiled executable can then be timed
  directly, so a benchmark compiles each function once.
* `PeakRSS`: a context manager sampling this process's resident set size in a background thread,
  reporting the peak above the value at entry (large buffers are mmapped, so freed memory is
  returned to the OS and successive measurements do not hide each other).
* `CompileLog`: a context manager counting XLA backend compilations and their seconds while it is
  open (`jax.monitoring`'s "/jax/core/compile/backend_compile_duration" event, one per executable
  compiled; cache hits send none), to tell compile time from steady-state time and to catch a
  function that recompiles per call or per batch shape.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from typing import Any, Callable, Mapping

import jax

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _force_mmap_for_large_buffers() -> None:
    """glibc: serve allocations >= 1 MiB with mmap so that freeing them lowers RSS again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except OSError:  # not glibc: RSS deltas are then upper-bounded by earlier peaks only
        pass


_force_mmap_for_large_buffers()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def median_time(fn: Callable, *args: Any, warmup: int = 1, repeats: int = 5, budget_s: float | None = None,
                min_timed_s: float = 0.0) -> dict:
    """Median wall time of `fn(*args)` (jitted or AOT-compiled) in seconds, after `warmup` untimed calls.

    The first call is always made and untimed (it includes compilation unless `fn` is compiled);
    `warmup - 1` further untimed calls follow, then up to `repeats` timed calls, each ended by
    `jax.block_until_ready`. With `budget_s`, no further warm-up or timed call is started once all
    calls so far (first call included) have used `budget_s` seconds, but at least one timed call is
    always made: a call slower than the budget costs two calls, not `warmup + repeats`. With
    `min_timed_s`, timed calls go on past `repeats` until they add up to `min_timed_s` seconds (a
    millisecond call gets enough samples for a stable median), still stopped by `budget_s`.
    Returns {"median_s", "min_s", "repeats", "warmup", "first_call_s"} ("repeats" and "warmup":
    the numbers of timed and untimed calls actually made).
    """
    return interleaved_median_times({"fn": lambda: fn(*args)}, warmup=warmup, repeats=repeats, budget_s=budget_s,
                                    min_timed_s=min_timed_s)["fn"]


def interleaved_median_times(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5,
                             budget_s: float | None = None, min_timed_s: float = 0.0) -> dict[str, dict]:
    """`median_time` of several functions, their calls interleaved: every first call, then the warm-up
    calls, then the timed calls round-robin (f1, f2, f1, f2, ...), so a machine whose speed drifts
    during the measurement (other load, clock frequency) slows each function alike and their ratio
    stays fair. `budget_s`, `repeats` and `min_timed_s` apply to each function separately.
    Returns {name: median_time's dict}."""
    if warmup < 1 or repeats < 1:
        raise ValueError(f"median_time needs warmup >= 1 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    spent = {name: 0.0 for name in fns}
    first, warmups = {}, {name: 0 for name in fns}
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name]())
        elapsed = time.perf_counter() - t0
        spent[name] += elapsed
        return elapsed

    def over_budget(name) -> bool:
        return budget_s is not None and spent[name] >= budget_s

    for name in fns:
        first[name] = call(name)
        warmups[name] = 1
    for _ in range(warmup - 1):
        for name in fns:
            if not over_budget(name):
                call(name)
                warmups[name] += 1

    def wants_more(name) -> bool:
        enough = len(times[name]) >= repeats and sum(times[name]) >= min_timed_s
        return not enough and not (times[name] and over_budget(name))

    while any(wants_more(name) for name in fns):
        for name in fns:
            if wants_more(name):
                times[name].append(call(name))
    return {name: {"median_s": statistics.median(times[name]), "min_s": min(times[name]), "repeats": len(times[name]),
                   "warmup": warmups[name], "first_call_s": first[name]} for name in fns}


def aot_compile(fn: Callable, *args: Any):
    """`jax.jit(fn).lower(*args).compile()`: an executable called as `compiled(*args)`."""
    return jax.jit(fn).lower(*args).compile()


def memory_of(compiled: Any) -> dict:
    """Bytes XLA plans for an AOT-compiled executable: temp (scratch), argument and output buffers.

    Empty when the backend does not report a memory analysis.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
    }


def compiled_memory(fn: Callable, *args: Any) -> dict:
    """Bytes XLA plans for `jax.jit(fn)(*args)`: temp (scratch), argument and output buffers."""
    return memory_of(aot_compile(fn, *args))


class PeakRSS:
    """`with PeakRSS() as p: ...` then `p.peak_delta_bytes`: peak RSS above the RSS at entry."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.baseline_bytes = current_rss_bytes()
        self.peak_bytes = self.baseline_bytes
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    @property
    def peak_delta_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileLog:
    """`with CompileLog() as c: ...` then `c.count` (XLA compilations inside the block) and `c.seconds`
    (their summed backend compile time). Compilations in other threads are counted too."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def _listener(self, event: str, duration_s: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += float(duration_s)

    def __enter__(self) -> "CompileLog":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
