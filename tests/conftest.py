import atexit
import os
import shutil
import tempfile

import jax
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# JAX's persistent compilation cache for this session only, in a fresh folder removed at exit: a program
# that an earlier test already compiled (the same computation and shapes behind another jax.jit object,
# e.g. an experiment run twice to test resumption) is loaded instead of compiled again. Every program is
# stored, however fast it compiled. Nothing is shared with other sessions: the runner's main() (which
# enables its own cache) is pointed at the same folder instead of the user's ~/.cache.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="gradsketch_tests_jax_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.setdefault("GRADSKETCH_COMPILATION_CACHE", _COMPILATION_CACHE)
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
