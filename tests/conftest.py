import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-weight tests (minutes); run in CI")
