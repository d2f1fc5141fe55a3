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


def test_client_app_handlers_on_messages(tmp_path):
    """TRAIN / EVALUATE / QUERY through the ClientApp's handlers (no engine), and a
    profile dropout that raises (the engine turns it into an error reply)."""
    import numpy as np
    import pytest
    pytest.importorskip("tensorflow")
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from mobiletune.fed import client_app as CA
    from mobiletune.fed import profiles as P
    from mobiletune.fed.records import from_record, to_record
    from tests.fed_helpers import make_run
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    run = make_run(tmp_path / "run", "fedprox", clients=2, rounds=1)
    c, spec, _ = CA.client(run, 1)
    g = c.initial_adapter()

    def msg(kind, arrays, rnd=1):
        return Message(RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(
            {"server-round": rnd, "proximal-mu": 0.1})}), dst_node_id=4, message_type=kind)
    r = CA.train(msg(MessageType.TRAIN, g), run, 1)
    m = r.content["metrics"]
    assert m["partition-id"] == 1 and m["num-examples"] == 2 * c.m.effective_batch and m["steps"] == 2
    out = from_record(r.content["arrays"])
    assert set(out) == set(g) and any(not np.array_equal(out[k], g[k]) for k in g)
    e = CA.evaluate(msg(MessageType.EVALUATE, out), run, 1).content["metrics"]
    assert np.isfinite(e["val-loss"]) and e["num-examples"] > 0
    assert CA.query(msg(MessageType.QUERY, {}), run, 1).content["props"]["lora-rank"] == 4
    P.write(run / P.FILE, P.Profiles(0, {"d": P.DeviceProfile(dropout=1.0)}, ["d"]))
    with pytest.raises(CA.ClientUnavailable, match="dropped out of round 2 after 1 steps"):
        CA.train(msg(MessageType.TRAIN, out, rnd=2), run, 1)
