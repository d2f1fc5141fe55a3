import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-weight tests (minutes); run in CI")
    config.addinivalue_line("markers", "arm64: the phone side under arm64 emulation (root)")


def require_asset(finder, name):
    """The path of a real asset; skip when it is not installed — except under CI
    (CI=true), where the test command installs assets first and a miss is a failure."""
    from mobiletune.errors import MobiletuneError
    try:
        return finder(name)
    except MobiletuneError as e:
        if os.environ.get("CI"):
            pytest.fail(f"asset {name!r} missing under CI: {e}")
        pytest.skip(str(e))
