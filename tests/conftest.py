import os

import jax
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def x64():
    """Float64 inside one test only (dense float64 references)."""
    with jax.enable_x64(True):
        yield
