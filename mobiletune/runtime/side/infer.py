"""Generation on the phone with side weights: the backbone's block chain, then the side
network's ``side_in`` / ``side_layer`` / ``side_out`` signatures over the tapped hidden
states, then the backbone's final norm and head (``mobiletune.models.side`` is the math).
With ``side.cut`` = c: the block chain with the trained LoRA adapter folded into layers
c … L-1's weights (W + s·B·A, as PEFT's merge), then the final norm and head."""

from __future__ import annotations

import numpy as np

from mobiletune import families
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
        self.merged = None

    def infer(self, tokens, last: int) -> np.ndarray:
        if self.scfg.cut is not None:
            return self._infer_cut(tokens, last)
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

    def _infer_cut(self, tokens, last: int) -> np.ndarray:
        r = self.runner
        if self.merged is None:   # once: generation calls infer for every token
            self.merged = merged_top_weights(self.w, r.weight, self.scfg, self.m.model["family"])
        hs = r.hidden_states(padded_tokens(self.m, tokens), weights=self.merged)
        return r.logits_at(r.final_norm(hs[-1])[0, last])


def merged_top_weights(side: dict, weight, scfg: SideConfig, family: str) -> dict:
    """{base weight name: W + scale * B @ A} for every adapted module of a ``cut`` side
    network (``(B @ A).T`` for Conv1D modules, stored (in, out)); ``weight(name)`` reads a
    frozen weight. PEFT's merge, in numpy."""
    spec, scale = families.spec(family), np.float32(scfg.alpha / scfg.rank)
    out = {}
    for a_name in sorted(k for k in side if k.endswith(".lora_A.weight")):
        mod = a_name[len(B.SIDE): -len(".lora_A.weight")]
        delta = scale * (side[B.SIDE + mod + ".lora_B.weight"] @ side[a_name])
        w = np.asarray(weight(mod + ".weight"), np.float32)
        out[mod + ".weight"] = w + (delta.T if spec.is_conv1d(mod) else delta)
    return out
