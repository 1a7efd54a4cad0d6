import atexit
import os
import shutil
import tempfile

import jax
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The suite is bound by XLA compilation (small programs, compiled once each), not by running them. LLVM's
# optimisation level 0 compiles them about 30% faster (tests/experiments/test_tda_benchmark.py: 78 s -> 56 s)
# and computes the same operations; only the machine code is less optimised, which changes results in the
# last bits, as another CPU's kernels do. A test that passes at one level only asserts rounding luck.
# GRADSKETCH_TEST_XLA_OPT_LEVEL=default runs the suite with the optimisation level users get. Set here,
# before any computation initialises the backend; subprocesses started by tests inherit it.
_OPT_LEVEL = os.environ.get("GRADSKETCH_TEST_XLA_OPT_LEVEL", "0")
if _OPT_LEVEL != "default" and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level={_OPT_LEVEL}".strip()

# JAX's persistent compilation cache for this session only, in a fresh folder removed at exit: a program
# that an earlier test already compiled (the same computation and shapes behind another jax.jit object,
# e.g. an experiment run twice to test resumption) is loaded instead of compiled again. Programs that
# compile in under 0.3 s are not stored: writing thousands of small ones cost more than reloading them
# saves (tests/landscape/test_lanczos.py: 62 s without the cache, 69 s storing every program, 63 s with
# the 0.3 s threshold). GRADSKETCH_TEST_CACHE_MIN_COMPILE_S sets the threshold (negative: no cache).
# Nothing is shared with other sessions: the runner's main() (which enables its own cache) is pointed
# at the same folder instead of the user's ~/.cache.
_MIN_COMPILE_S = float(os.environ.get("GRADSKETCH_TEST_CACHE_MIN_COMPILE_S", "0.3"))
if _MIN_COMPILE_S >= 0:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="gradsketch_tests_jax_cache_")
    atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
    os.environ.setdefault("GRADSKETCH_COMPILATION_CACHE", _COMPILATION_CACHE)
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
else:
    os.environ.setdefault("GRADSKETCH_COMPILATION_CACHE", "off")


@pytest.fixture
def x64():
    """Float64 inside one test only (dense float64 references)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def no_compilation_cache():
    """The persistent compilation cache off inside one test, for tests that count compilations: a cache
    hit sends no compile event, so it would hide a recompile."""
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
