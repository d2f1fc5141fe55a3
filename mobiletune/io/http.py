"""The transport that side-tuning and SplitLoRA share (standard library only, so the phone
imports it): HTTP/1.1 over one keep-alive connection, TLS through ``ssl``, a bearer token
on every request, safetensors bodies with their sha256 in a header.

Client (``HttpClient``): ``http.client`` with the retry policy — a refused or dropped
connection and a 429 are retried with exponential backoff and jitter, with one line saying
why; after ``max_offline_s`` without an answer it gives up with ``ServerUnavailable``. 401 is
final (``MobiletuneError``). It counts the bytes of the bodies it sends and receives.

Server: ``Refused`` (an HTTP error answer with a reason), ``check_bearer``,
``JsonHandler`` (bodies with their Content-Length; JSON or bytes answers; a ``Refused``
becomes its status and ``{"error": ...}``) and ``make_server`` (``ThreadingHTTPServer``,
TLS when a certificate is given).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import random
import ssl
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from mobiletune.errors import MobiletuneError

SHA_HEADER = "X-Content-SHA256"
MAX_BODY = 512 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ServerUnavailable(MobiletuneError):
    """The server did not answer for longer than the client waits."""


class HttpClient:
    def __init__(self, url: str, token: str, cafile=None, timeout_s: float = 60,
                 max_offline_s: float = 600, log=print, sleep=time.sleep, seed: int = 0,
                 what: str = "server"):
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise MobiletuneError(f"--server {url!r}: expected http(s)://host:port")
        self.url, self.host, self.https = url, u.hostname, u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        self.token, self.timeout_s, self.what = token, timeout_s, what
        self.max_offline_s, self.log, self.sleep = max_offline_s, log, sleep
        self.ctx = ssl.create_default_context(cafile=cafile) if self.https else None
        self.conn = None
        self.rng = random.Random(seed)
        self.bytes_sent = self.bytes_received = 0

    def _connection(self):
        if self.conn is None:
            if self.https:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                                        timeout=self.timeout_s)
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port,
                                                       timeout=self.timeout_s)
        return self.conn

    def _once(self, method: str, path: str, body: bytes | None, headers: dict):
        conn = self._connection()
        h = {"Authorization": f"Bearer {self.token}", **headers}
        if body is not None:
            h["Content-Length"] = str(len(body))
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        if r.getheader("Connection", "").lower() == "close":
            self.close()
        self.bytes_sent += len(body or b"")
        self.bytes_received += len(data)
        return r.status, r, data

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        """(status, response, body) — retried on connection failures and 429."""
        t_first_fail, attempt = None, 0
        while True:
            try:
                status, r, data = self._once(method, path, body, headers or {})
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise MobiletuneError(f"{self.url}: the server's TLS certificate does not "
                                          f"verify ({e.reason})") from None
                why = f"{type(e).__name__}: {e}"
            else:
                if status == 401:
                    raise MobiletuneError(f"{self.url}: unauthorized (401): "
                                          f"{error_text(data)} — check the token")
                if status != 429:
                    return status, r, data
                why = f"the server is busy (429: {error_text(data)})"
                wait = float(r.getheader("Retry-After") or 1)
                self.sleep(wait)
                continue
            now = time.monotonic()
            t_first_fail = t_first_fail or now
            if now - t_first_fail > self.max_offline_s:
                raise ServerUnavailable(f"{self.url}: no answer for {now - t_first_fail:.0f} s "
                                        f"({why})")
            wait = min(30.0, 0.5 * 2 ** attempt) * (0.5 + self.rng.random())
            attempt += 1
            self.log(f"{self.what}: {self.url} unreachable ({why}); retrying in {wait:.1f} s")
            self.sleep(wait)

    def json(self, method: str, path: str, obj=None) -> dict:
        body = None if obj is None else json.dumps(obj).encode()
        status, _, data = self.request(method, path, body,
                                       {"Content-Type": "application/json"} if body else {})
        if status == 409:
            raise MobiletuneError(f"{self.url}: refused (409): {error_text(data)}")
        if status != 200:
            raise MobiletuneError(f"{self.url}: {method} {path} answered {status}: "
                                  f"{error_text(data)}")
        return json.loads(data)

    def put_bytes(self, path: str, payload: bytes):
        """PUT a safetensors body with its sha256: (status, response body)."""
        status, _, data = self.request("PUT", path, payload,
                                       {SHA_HEADER: sha256(payload),
                                        "Content-Type": "application/octet-stream"})
        return status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class PayloadError(MobiletuneError):
    """A payload whose tensors are not the ones the contract names (the message says which)."""


def check_payload(tensors: dict, want: dict, where: str) -> None:
    """``PayloadError`` naming the first tensor of ``tensors`` that is missing, not expected,
    of another dtype or shape than ``want`` (name -> (dtype, shape)), or not finite."""
    import numpy as np
    for name in sorted(set(want) | set(tensors)):
        if name not in tensors or name not in want:
            raise PayloadError(f"{where}: tensor {name!r} is "
                               f"{'missing' if name not in tensors else 'not expected'}")
        dt, shape = want[name]
        a = tensors[name]
        if a.dtype != dt or tuple(a.shape) != tuple(shape):
            raise PayloadError(f"{where}: tensor {name!r} is {a.dtype}{list(a.shape)}, "
                               f"expected {np.dtype(dt)}{list(shape)}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise PayloadError(f"{where}: tensor {name!r} has non-finite values")


def error_text(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error"))
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace")


# --- the server side ----------------------------------------------------------------------------
class Refused(Exception):
    def __init__(self, code: int, msg: str, **extra):
        super().__init__(msg)
        self.code, self.extra = code, extra


def check_bearer(header: str | None, token: str) -> None:
    """401 unless ``header`` is ``Bearer <token>`` (compared in constant time)."""
    want = f"Bearer {token}"
    if header is None or not hmac.compare_digest(header.encode(), want.encode()):
        raise Refused(401, "unauthorized: a valid Authorization: Bearer token is needed")


def check_sha(body: bytes, sha: str | None, what: str) -> None:
    if sha is None or sha != sha256(body):
        raise Refused(400, f"{what}: the body's sha256 does not match {SHA_HEADER} (cut or "
                           f"changed in transit)")


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet handler: subclasses implement ``route(method, path)`` returning
    ``(code, body: bytes | dict[, content type[, headers]])`` or raising ``Refused``;
    ``service`` (bound by ``make_server``) is the state behind it, and its ``log(msg)``
    hears of every refusal but 429."""

    protocol_version = "HTTP/1.1"
    service = None

    def log_message(self, fmt, *args):  # quiet: the service logs what matters
        pass

    def log_refusal(self, msg: str) -> None:
        log = getattr(self.service, "log", None)
        if log is not None:
            log(msg)

    def send(self, code: int, body: bytes | dict, ctype="application/json", headers=None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> bytes:
        n = self.headers.get("Content-Length")
        if n is None or not n.isdigit() or int(n) > MAX_BODY:
            raise Refused(413 if n and n.isdigit() else 411,
                          f"a body of at most {MAX_BODY} bytes with its Content-Length is needed")
        data = self.rfile.read(int(n))
        if len(data) != int(n):
            self.close_connection = True
            raise Refused(400, f"the body ended after {len(data)} of {n} bytes")
        return data

    def route(self, method: str, path: str):
        raise NotImplementedError

    def _handle(self, method: str) -> None:
        try:
            out = self.route(method, self.path.split("?")[0])
            self.send(*out)
        except Refused as e:
            headers = {"Retry-After": "1"} if e.code == 429 else {}
            if e.code >= 400 and e.code != 429:
                self.log_refusal(f"refused {method} {self.path}: {e.code} {e}")
            self.send(e.code, {"error": str(e), **e.extra}, headers=headers)
        except Exception as e:  # a server bug is an answer with its reason, not a dropped line
            self.log_refusal(f"failed {method} {self.path}: {type(e).__name__}: {e}")
            self.send(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")


def make_server(handler: type, service, host: str, port: int, tls_cert=None, tls_key=None):
    """A ``ThreadingHTTPServer`` of ``handler`` bound to ``service`` (TLS with a cert)."""
    handler = type(handler.__name__, (handler,), {"service": service})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    if tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert, tls_key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    return httpd


def url_of(httpd, host: str, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{host}:{httpd.server_address[1]}"
