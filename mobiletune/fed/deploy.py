"""A real multi-process deployment of a federated run (SuperLink + one SuperNode per phone
+ ``flwr run``), with TLS and SuperNode authentication: the files and command lines.
Standard library + the ``openssl`` and ``ssh-keygen`` tools.

    certs(d)            CA, the SuperLink's certificate (SAN IP:127.0.0.1 or the host's)
    node_key(d, name)   an ECDSA P-384 key pair in OpenSSH format (Flower's node auth)
    write_app(d)        the Flower app directory ``flwr run`` packs: pyproject.toml only; the
                        components are ``mobiletune.fed.server_app:app`` and
                        ``mobiletune.fed.client_app:app`` (installed on every machine)
    superlink_cmd / supernode_cmd / register_cmd / run_cmd   the command lines

For a fleet of phones (a Debian userland in Termux's proot-distro with
``pip install 'mobiletune[runtime]' flwr==1.42.0``, or offline from the phone kit built with
``mobiletune device kit BUNDLE --out KIT --fed``):
each phone holds its bundle and partition under a run directory and runs
``flower-supernode --root-certificates ca.crt --superlink HOST:9190 --auth-supernode-
private-key node.key --node-config "partition-id=I run-dir='RUN'"``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
       "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "mobiletune-fed"
version = "0.1.0"
description = "mobiletune's federated app: the components live in the installed package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mobiletune"

[tool.flwr.app.components]
serverapp = "mobiletune.fed.server_app:app"
clientapp = "mobiletune.fed.client_app:app"

[tool.flwr.app.config]
run-dir = ""
"""


def _run(cmd, cwd) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def certs(d, host: str = "127.0.0.1", name: str = "ca") -> dict:
    """A CA (``<name>.crt``) and a server certificate signed by it for ``host``."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
          f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt"], d)
    _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
          "-keyout", "server.key", "-out", "server.csr"], d)
    (d / "ext.cnf").write_text(f"subjectAltName=IP:{host},DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", f"{name}.crt", "-CAkey",
          f"{name}.key", "-CAcreateserial", "-out", "server.pem", "-days", "2",
          "-extfile", "ext.cnf"], d)
    return {"ca": d / f"{name}.crt", "cert": d / "server.pem", "key": d / "server.key"}


def node_key(d, name: str) -> Path:
    """``d/name`` (private) and ``d/name.pub``: ECDSA P-384, OpenSSH format."""
    _run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", name], Path(d))
    return Path(d) / name


def write_app(d) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(PYPROJECT)
    return d


def write_flwr_config(flwr_home, address: str, ca) -> Path:
    """``$FLWR_HOME/config.toml`` with one connection, ``deploy``, over TLS."""
    p = Path(flwr_home) / "config.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "{address}"\n'
                 f'root-certificates = "{Path(ca).resolve()}"\n')
    return p


def superlink_cmd(c: dict, port: int, db, host: str = "127.0.0.1") -> list[str]:
    return ["flower-superlink", "--ssl-certfile", str(c["cert"]), "--ssl-keyfile", str(c["key"]),
            "--ssl-ca-certfile", str(c["ca"]), "--enable-supernode-auth", "--host", host,
            "--port", str(port), "--database", str(db)]


def supernode_cmd(ca, superlink: str, port: int, key, pid: int, run) -> list[str]:
    return ["flower-supernode", "--root-certificates", str(ca), "--superlink", superlink,
            "--port", str(port), "--auth-supernode-private-key", str(key), "--max-retries", "3",
            "--node-config", f"partition-id={pid} run-dir='{Path(run).absolute()}'"]


def register_cmd(pub) -> list[str]:
    return ["flwr", "supernode", "register", str(pub), "deploy"]


def run_cmd(app, run) -> list[str]:
    return ["flwr", "run", str(app), "deploy", "--stream", "--run-config",
            f"run-dir='{Path(run).resolve()}'"]
