"""The phone's ClientApp needs only the runtime extra plus flwr: importing it (and every
module it pulls in) with JAX, TensorFlow, torch, flax and optax made unimportable works and
loads none of them."""

from tests.helpers import DESKTOP_FRAMEWORKS, imported

BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {DESKTOP_FRAMEWORKS!r}:
            raise ImportError('blocked on the phone: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_client_app_imports_without_jax_or_tensorflow():
    code = BLOCK + ("import mobiletune.fed.client_app as c, mobiletune.fed.local, "
                    "mobiletune.fed.profiles, mobiletune.fed.spec, mobiletune.fed.records\n"
                    "assert type(c.app).__name__ == 'ClientApp'")
    assert imported(code) == []


def test_the_block_is_real():
    """The same probe catches a module that does import a desktop framework."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", BLOCK + "import mobiletune.train.step"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "blocked on the phone" in r.stderr
