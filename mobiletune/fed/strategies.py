"""Server strategies on Flower 1.42's Message API (``flwr.serverapp.strategy``).

Every strategy here screens the train replies before aggregating (``Screened``): a reply
that is an error (a dropped or crashed client), lacks its arrays or ``num-examples``, has a
missing, extra or wrong-shaped array, a non-float32 array, or a NaN/Inf, is rejected with
one logged reason (``rejected`` in the round's record) and never aggregated. Replies are
aggregated in partition order, so a run does not depend on arrival order.

* ``fedavg``  — FedAvg: the example-weighted mean (float64 accumulation).
* ``fedprox`` — Flower's FedProx: FedAvg on the server; it sends ``proximal-mu`` and the
  phone adds μ·(w − w_global) to its gradients (``mobiletune.fed.local``).
* ``fedadam`` — Flower's FedAdam (server-side Adam on the averaged pseudo-gradient).
* ``flexlora`` — heterogeneous ranks: ΔW = Σ p_i s_i B_i A_i, each client gets the truncated
  SVD at its own rank (``mobiletune.fed.aggregate``; low-rank, never the dense matrix). One
  message per node; a node's rank comes from a QUERY the first time the node is seen.
* ``ffa``     — FFA-LoRA: A frozen at the bundle's shared-seed init, only B travels and is
  averaged (half the bytes; the aggregate is exact since ΔW = s·(ΣpB)·A).
* ``splitlora`` — SplitLoRA: the phones train the LoRA of layers < cut (FedAvg'd like
  ``fedavg``), this process holds layers ≥ cut with one shared adapter
  (``mobiletune.fed.split``) behind an HTTP endpoint the phones send their cut activations
  to; the clients train one after another in partition order (SplitFed-v2), and the round's
  bytes include the activations up and gradients down.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from mobiletune.errors import MobiletuneError
from mobiletune.fed import adapter as W
from mobiletune.fed import aggregate as G
from mobiletune.fed.records import from_record, to_record

METHODS = ("fedavg", "fedprox", "fedadam", "flexlora", "ffa", "splitlora")




def _bytes(msgs) -> int:
    return sum(r.count_bytes() for m in msgs if m.has_content()
               for r in m.content.array_records.values())


class Screened:
    """Mixin: validation, partition-ordered aggregation and per-round accounting.
    ``expected(node_rank)`` -> the wire shapes a reply must have."""

    def setup_screen(self, expected: dict, ffa: bool = False):
        self.expected_full = expected
        self.ffa = ffa
        self.round_log: dict = {}

    def expected(self, rank: int | None) -> dict:
        shp = self.expected_full if rank is None else W.with_rank(self.expected_full, rank)
        return {k: s for k, s in shp.items() if k.endswith(W.B_SUFFIX)} if self.ffa else shp

    def rank_of_reply(self, m: Message) -> int | None:
        return None

    def query_nodes(self, grid, node_ids, timeout=120.0) -> None:
        """QUERY the nodes not seen before for their properties (``self.props``: node ->
        {"lora-rank", "partition-id"})."""
        self.props = getattr(self, "props", {})
        unknown = [n for n in node_ids if n not in self.props]
        if not unknown:
            return
        qs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                      message_type=MessageType.QUERY) for n in unknown]
        for rep in grid.send_and_receive(qs, timeout=timeout):
            if not rep.has_error():
                self.props[rep.metadata.src_node_id] = dict(rep.content["props"])
        log(INFO, "%s: nodes %s", type(self).__name__, self.props)

    def send(self, grid, msgs, timeout):
        """The round's train messages out, the replies back (all at once)."""
        return grid.send_and_receive(messages=msgs, timeout=timeout)

    def screen(self, server_round: int, replies) -> list[tuple[Message, dict, float]]:
        """(message, validated wire dict, examples) of the accepted replies, by partition."""
        ok, rejected, failed = [], [], []
        for m in replies:
            src = m.metadata.src_node_id
            if m.has_error():
                failed.append({"node": src, "reason": f"error {m.error.code}: {m.error.reason}"[-600:]})
                log(WARNING, "round %s: node %s failed: %s", server_round, src, m.error.reason[:200])
                continue
            try:
                c = m.content
                if "metrics" not in c.metric_records or "num-examples" not in c["metrics"]:
                    raise W.UpdateRejected("the reply has no metrics 'num-examples'")
                n = float(c["metrics"]["num-examples"])
                if not n > 0:
                    raise W.UpdateRejected(f"num-examples={n}: must be positive")
                if "arrays" not in c.array_records:
                    raise W.UpdateRejected("the reply has no ArrayRecord 'arrays'")
                wire = W.validate(from_record(c["arrays"]), self.expected(self.rank_of_reply(m)),
                                  f"node {src}")
            except (W.UpdateRejected, ValueError, TypeError, KeyError) as e:
                rejected.append({"node": src, "reason": str(e)})
                log(WARNING, "round %s: rejected update of node %s: %s", server_round, src, e)
                continue
            ok.append((m, wire, n))
        ok.sort(key=lambda t: (int(t[0].content["metrics"].get("partition-id", 0)),
                               t[0].metadata.src_node_id))
        self.round_log = {"rejected": rejected, "failed": failed,
                          "clients": [dict(m.content["metrics"]) for m, _, _ in ok],
                          "bytes-up": _bytes([m for m, _, _ in ok])}
        return ok

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        t0 = time.perf_counter()
        ok = self.screen(server_round, replies)
        if not ok:
            self.round_log["aggregation-s"] = time.perf_counter() - t0
            return None, None
        arrays = self.combine(server_round, ok)
        self.round_log["aggregation-s"] = time.perf_counter() - t0
        n = sum(x for _, _, x in ok)
        loss = sum(float(m.content["metrics"].get("train-loss", 0.0)) * x for m, _, x in ok) / n
        return arrays, MetricRecord({"num-examples": n, "train-loss": loss, "clients": len(ok)})

    def combine(self, server_round, ok):
        return to_record(G.weighted_mean([w for _, w, _ in ok], [x for _, _, x in ok]))

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.bytes_down = _bytes(msgs)
        return msgs


class FedAvgM(Screened, FedAvg):
    """FedAvg (mobiletune: screened, float64 example-weighted mean)."""


class FedProxM(Screened, FedProx):
    """FedProx: the server side is FedAvg plus ``proximal-mu`` in the train config."""


class FedAdamM(Screened, FedAdam):
    """Flower's FedAdam on the screened replies (its own aggregation and Adam update)."""

    def combine(self, server_round, ok):
        arrays, _ = FedAdam.aggregate_train(self, server_round, [m for m, _, _ in ok])
        return arrays

    def state(self) -> dict:
        out = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(self, name) or {}).items():
                out[f"{name}/{k}"] = np.asarray(v)
        return out

    def load_state(self, d: dict) -> None:
        for name in ("m_t", "v_t"):
            got = {k[len(name) + 1:]: v for k, v in d.items() if k.startswith(name + "/")}
            setattr(self, name, got or None)


class FlexLoRAM(Screened, FedAvg):
    """FlexLoRA: per-node messages at each node's rank; the global state is the truncated
    SVD of the aggregate (kept at the largest rank)."""

    def __init__(self, lora: dict, **kw):
        super().__init__(**kw)
        self.lora = lora
        self.rank_of: dict[int, int] = {}
        self.svds: dict = {}

    def rank_of_reply(self, m):
        return int(m.content["metrics"]["lora-rank"]) if "lora-rank" in m.content["metrics"] \
            else self.rank_of.get(m.metadata.src_node_id)

    def _learn_ranks(self, grid, node_ids, timeout=120.0):
        self.query_nodes(grid, node_ids, timeout)
        self.rank_of.update({n: int(p["lora-rank"]) for n, p in self.props.items()})

    def configure_train(self, server_round, arrays, config, grid):
        n_all = len(list(grid.get_node_ids()))
        size = max(int(n_all * self.fraction_train), self.min_train_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, size)
        self._learn_ranks(grid, node_ids)
        config["server-round"] = server_round
        msgs = []
        for n in node_ids:
            r = self.rank_of.get(n)
            wire = (G.flexlora_adapter(self.svds, r, W.lora_scale(self.lora, r))
                    if self.svds and r else {})
            msgs.append(Message(RecordDict({"arrays": to_record(wire), "config": ConfigRecord(dict(config))}),
                                dst_node_id=n, message_type=MessageType.TRAIN))
        self.bytes_down = _bytes(msgs)
        return msgs

    def combine(self, server_round, ok):
        ranks = [int(np.shape(next(v for k, v in w.items() if k.endswith(W.A_SUFFIX)))[0])
                 for _, w, _ in ok]
        keep = max([*ranks, *self.rank_of.values()])
        self.svds = G.flexlora_aggregate([w for _, w, _ in ok], [x for _, _, x in ok],
                                         [W.lora_scale(self.lora, r) for r in ranks], keep)
        return to_record(self.global_adapter(int(self.lora["r"])))

    def global_adapter(self, rank: int) -> dict:
        return G.flexlora_adapter(self.svds, rank, W.lora_scale(self.lora, rank))

    def state(self) -> dict:
        out = {}
        for m, (u, s, vt) in self.svds.items():
            out[f"svd/{m}/u"], out[f"svd/{m}/s"], out[f"svd/{m}/vt"] = u, s, vt
        return out

    def load_state(self, d: dict) -> None:
        mods = sorted({k[4:].rsplit("/", 1)[0] for k in d if k.startswith("svd/")})
        self.svds = {m: (d[f"svd/{m}/u"], d[f"svd/{m}/s"], d[f"svd/{m}/vt"]) for m in mods}


class SplitLoRAM(Screened, FedAvg):
    """SplitLoRA: FedAvg of the phones' layers (< cut) + the server's shared adapter of the
    other layers, trained by the phones' cut activations through the split endpoint."""

    sequential = True

    def __init__(self, bundle, cut=None, host: str = "127.0.0.1", port: int = 0,
                 tls=(None, None), **kw):
        import secrets

        from mobiletune.fed import split as SP
        super().__init__(**kw)
        self.server = SP.SplitServer(bundle, cut)
        self.service = SP.SplitService(self.server, secrets.token_hex(16),
                                       log=lambda m: log(WARNING, "%s", m))
        self.host, self.port, self.tls, self.httpd, self.url = host, port, tls, None, None
        if bool(tls[0]) != bool(tls[1]):
            raise MobiletuneError("split_tls_cert and split_tls_key go together")

    def setup_screen(self, expected: dict, ffa: bool = False):
        mine = {W.PREFIX + n for n in self.server.client}
        super().setup_screen({k: s for k, s in expected.items() if k in mine}, ffa)

    def client_part(self, wire: dict) -> dict:
        return {k: v for k, v in wire.items() if k in self.expected_full}

    def complete(self, wire: dict) -> dict:
        """The whole model's adapter: the phones' layers from ``wire``, the server's own."""
        return {**wire, **self.server.wire()}

    def _endpoint(self) -> str:
        if self.httpd is None:
            from mobiletune.fed import split as SP
            self.httpd, self.url = SP.start(self.service, self.host, self.port, *self.tls)
            log(INFO, "splitlora: cut at layer %s, endpoint %s", self.server.cut, self.url)
        return self.url

    def configure_train(self, server_round, arrays, config, grid):
        n_all = len(list(grid.get_node_ids()))
        size = max(int(n_all * self.fraction_train), self.min_train_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, size)
        self.query_nodes(grid, node_ids)
        order = sorted(node_ids, key=lambda n: (int(self.props.get(n, {}).get("partition-id", 1 << 30)), n))
        from mobiletune.runtime.split.protocol import device_name

        def config_of(n):   # each phone gets the token of its own device name
            pid = int(self.props.get(n, {}).get("partition-id", -1))
            return ConfigRecord({**dict(config), "server-round": server_round,
                                 "split-url": self._endpoint(), "split-cut": self.server.cut,
                                 "split-token": self.service.token_for(device_name(pid))})
        msgs = [Message(RecordDict({"arrays": arrays, "config": config_of(n)}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in order]
        self.bytes_down = _bytes(msgs)
        self.service.take_bytes()
        return msgs

    def send(self, grid, msgs, timeout):
        """One client at a time (SplitFed-v2: the server adapter trains on each in turn); a
        step a client left open (it failed mid-step) is dropped before the next one."""
        replies = []
        for m in msgs:
            replies.extend(grid.send_and_receive(messages=[m], timeout=timeout))
            self.service.discard_open()
        return replies

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        up, down = self.service.take_bytes()
        rl = self.round_log
        rl["cut-bytes-up"], rl["cut-bytes-down"] = sum(up.values()), sum(down.values())
        rl["bytes-up"] += rl["cut-bytes-up"]
        self.bytes_down += rl["cut-bytes-down"]
        return out

    def configure_evaluate(self, server_round, arrays, config, grid):
        return super().configure_evaluate(server_round, to_record(self.complete(from_record(arrays))),
                                          config, grid)

    def state(self) -> dict:
        return {f"split/{k}": v for k, v in self.server.state().items()}

    def load_state(self, d: dict) -> None:
        self.server.load_state({k[len("split/"):]: v for k, v in d.items() if k.startswith("split/")})

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def make(method: str, expected: dict, lora: dict, *, mu: float = 0.0, fraction_train: float = 1.0,
         fraction_evaluate: float = 0.0, min_nodes: int = 1, eta: float = 1e-2, tau: float = 1e-3,
         bundle=None, cut: int | None = None, split_host: str = "127.0.0.1", split_port: int = 0,
         split_tls=(None, None)):
    """The strategy ``method`` over adapters of ``expected`` shapes (wire names); SplitLoRA
    also takes the (sharded) ``bundle`` its server half computes with, the ``cut`` and the
    endpoint's address."""
    common = dict(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                  min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                  min_available_nodes=min_nodes)
    if method in ("fedavg", "ffa"):
        s = FedAvgM(**common)
    elif method == "fedprox":
        s = FedProxM(proximal_mu=float(mu), **common)
    elif method == "fedadam":
        s = FedAdamM(eta=eta, eta_l=eta, tau=tau, **common)
    elif method == "flexlora":
        s = FlexLoRAM(lora, **common)
    elif method == "splitlora":
        s = SplitLoRAM(bundle, cut, split_host, split_port, split_tls, **common)
    else:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    s.setup_screen(expected, ffa=method == "ffa")
    return s
