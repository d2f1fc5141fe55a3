"""Generation on the phone with side weights: the backbone's block chain, then the side
network's ``side_in`` / ``side_layer`` / ``side_out`` signatures over the tapped hidden
states, then the backbone's final norm and head (``mobiletune.models.side`` is the math)."""

from __future__ import annotations

import numpy as np

from mobiletune.io import safetensors as st
from mobiletune.runtime import bundle as B
from mobiletune.runtime.runner import padded_tokens
from mobiletune.runtime.side.config import SideConfig
from mobiletune.runtime.side.quantize import pool
from mobiletune.runtime.side.trainer import check_side_weights


def load_side_weights(path, m: B.Manifest) -> dict[str, np.ndarray]:
    if m.side is None:
        raise B.BundleError("--side-weights: the bundle is not a side-tuning bundle")
    try:
        w = st.load(path, mmap=False)
    except st.SafetensorsError as e:
        raise B.BundleError(str(e)) from None
    return check_side_weights(w, m, str(path))


class SideInfer:
    """``infer(tokens, last)`` of a side-tuning bundle with trained side weights."""

    def __init__(self, runner, weights: dict):
        self.runner, self.w, self.m = runner, weights, runner.manifest
        self.manifest = self.m
        self.scfg = SideConfig.from_dict(self.m.side.config)
        self.norm = sorted(n for n in weights if n.startswith(B.SIDE_NORM))

    def infer(self, tokens, last: int) -> np.ndarray:
        r, lay, call = self.runner, self.m.side, self.runner.call
        hs = r.hidden_states(padded_tokens(self.m, tokens))
        s = call(B.side_in_sig(1), {"emb": hs[0], B.W + B.SIDE_EMBED_DOWN:
                                    self.w[B.SIDE_EMBED_DOWN]})["s"]
        for j, i in enumerate(lay.tapped):
            p = B.side_layer_prefix(j)
            tap = hs[i + 1] if self.scfg.width == "full" else pool(hs[i + 1], self.scfg.reduction)
            ins = {"s": s, "tap": tap,
                   **{B.W + k[len(p):]: v for k, v in self.w.items() if k.startswith(p)}}
            if lay.attn is not None:
                theta, factor, window = lay.attn[j]
                ins.update(rope_theta=np.float32(theta), rope_factor=np.float32(factor),
                           window=np.int32(window))
            s = call(B.side_layer_sig(1), ins)["s"]
        hn = call(B.side_out_sig(1), {"hn": r.final_norm(hs[-1]), "s": s,
                                      B.W + B.SIDE_UP: self.w[B.SIDE_UP],
                                      **{B.W + n: self.w[n] for n in self.norm}})["hn"]
        return r.logits_at(hn[0, last])
