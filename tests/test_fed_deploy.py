"""A real multi-process deployment on loopback: ``flower-superlink`` (TLS, SuperNode
authentication) + three ``flower-supernode`` processes running the phone's ClientApp on
tiny LiteRT bundles + ``flwr run``. A node with an unregistered key, or without the CA that
signed the SuperLink's certificate, cannot join; a SuperNode killed mid-round leaves the
round to complete with the others and rejoins once restarted. 127.0.0.1 only; every process
is started in its own session and stopped by its process group id."""

import shutil
import signal

import pytest

pytest.importorskip("flwr")
pytest.importorskip("tensorflow")
if shutil.which("openssl") is None or shutil.which("ssh-keygen") is None:
    pytest.skip("needs openssl and ssh-keygen", allow_module_level=True)

from mobiletune.fed import deploy as D  # noqa: E402
from tests.fed_helpers import Procs, deploy_env, free_port, log_rows, make_run, registered, wait_for  # noqa: E402


def test_loopback_deployment_tls_auth_and_a_killed_supernode(tmp_path):
    run = make_run(tmp_path / "run", "fedavg", clients=3, rounds=4, local_steps=20)
    d = tmp_path / "deploy"
    d.mkdir()
    c = D.certs(d)
    other = D.certs(d / "other", name="other-ca")          # a CA the SuperLink never saw
    keys = [D.node_key(d, f"node{i}") for i in range(4)]    # node3 is never registered
    app = D.write_app(d / "app")
    port = free_port()
    env = deploy_env(d, port, c["ca"])
    P = Procs(d, env)
    try:
        P.start("superlink", D.superlink_cmd(c, port, d / "state.db"))
        for i in range(3):
            wait_for(lambda: registered(d, env, keys[i]), 60, f"registering node{i}")
        link = f"127.0.0.1:{port}"
        node_ports = [free_port() for _ in range(5)]
        for i in range(3):
            P.start(f"node{i}", D.supernode_cmd(c["ca"], link, node_ports[i], keys[i], i, run))
        rogue = P.start("unregistered", D.supernode_cmd(c["ca"], link, node_ports[3], keys[3], 0, run))
        wrong_ca = P.start("wrong-ca", D.supernode_cmd(other["ca"], link, node_ports[4], keys[0], 0, run))
        flwr = P.start("flwr-run", D.run_cmd(app, run))

        # node 2 is killed once it has started its round-2 training (its reply not yet in)
        started = run / "clients" / "client-002" / "round-starts" / "step-0000002"
        wait_for(started.exists, 180, "node 2 starting round 2")
        P.stop("node2", signal.SIGTERM)
        wait_for(lambda: (run / "metrics.jsonl").exists() and any(r["round"] == 2 for r in log_rows(run)),
                 180, "round 2 to complete without node 2")
        P.start("node2-again", D.supernode_cmd(c["ca"], link, free_port(), keys[2], 2, run))
        flwr.wait(timeout=240)
        assert flwr.returncode == 0, (d / "flwr-run.log").read_text()[-3000:]

        rows = log_rows(run)
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
        pids = {r["round"]: sorted(int(x["partition-id"]) for x in r["clients"]) for r in rows[1:]}
        assert pids[1] == [0, 1, 2] and pids[2] == [0, 1], pids       # round 2 completed with the others
        assert any(2 in pids[r] for r in (3, 4)), pids                 # node 2 rejoined
        assert rows[-1]["val-loss"] < rows[0]["val-loss"]
        # the node with an unregistered key is refused activation and exits; the one that
        # does not trust the SuperLink's certificate fails the TLS handshake and exits; neither
        # took part (partition 0 would show twice above)
        assert rogue.wait(timeout=120) != 0 and wrong_ca.wait(timeout=120) != 0
        assert "[code: 2004] Failed to activate SuperNode" in (d / "unregistered.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in (d / "wrong-ca.log").read_text()
    finally:
        P.stop_all()
