"""The side network of server-assisted side-tuning, as pure JAX functions over a flat dict.

A ladder beside the frozen backbone (LST / QST style), built from the family's own
``block`` on a reduced config (``side_config``: head_dim // r, FFN // r, the same heads):

  s = side.embed_down(embed(tokens))                     (B, T, Ds)
  for the j-th tapped layer i (h_{i+1}: the backbone's output after layer i):
      g = sigmoid(side.layers.j.gate)                    (Ds,), starts at 0.5
      s = g * s + (1 - g) * side.layers.j.down(tap_j)    tap_j: h_{i+1}, or pooled
      s = block_j(s)                                     the family's block, reduced
  hn = final_norm(h_L) + side.up(side_norm(s))          side.up starts at zero
  logits = head(hn)                                      the frozen backbone's norm and head

Because ``side.up`` starts at zero the model with a fresh side network equals the backbone
exactly (as LoRA's B = 0). The sum is taken after the backbone's final norm (as QST's
output mix): before it, the side's small contribution would be divided by the last hidden
state's large norm and learn far more slowly. Names: ``side.embed_down.weight``, ``side.layers.{j}.gate``,
``side.layers.{j}.down.weight``, ``side.layers.{j}.<the family's layer names>``,
``side.norm.<the family's final-norm names>``, ``side.up.weight``.

With ``SideConfig.cut`` = c the side network is a copy of the backbone's layers c … L-1
with a LoRA adapter (``top_lora``): ``hn = final_norm(blocks_{c..L-1}(h_c; W + s·B·A))``,
B = 0 at init. Its params are the adapter's, PEFT-named under ``side.``
(``side.model.layers.{i}.self_attn.q_proj.lora_A.weight``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune import families, models
from mobiletune.families.config import ModelConfig
from mobiletune.models import layers as L
from mobiletune.runtime import bundle as B
from mobiletune.runtime.side.config import SideConfig


def top_lora(cfg: ModelConfig, scfg: SideConfig):
    """The LoRA config of the ``cut`` side network (on layers cut … L-1)."""
    from mobiletune.models.lora import LoraConfig
    scfg.tapped(cfg.num_layers)   # checks cut < L
    return LoraConfig(r=scfg.rank, alpha=float(scfg.alpha), target_modules=scfg.targets,
                      layers_to_transform=tuple(range(scfg.cut, cfg.num_layers))).resolved(cfg)


def side_config(cfg: ModelConfig, scfg: SideConfig) -> ModelConfig:
    """The reduced config the side blocks are built on (one layer per tap); the head width
    is kept even (RoPE rotates halves)."""
    tapped = scfg.tapped(cfg.num_layers)
    if scfg.cut is not None:
        return cfg
    hd = max(2, cfg.head_dim // scfg.reduction // 2 * 2)
    return cfg.replace(hidden_size=cfg.num_heads * hd, head_dim=hd,
                       intermediate_size=max(1, cfg.intermediate_size // scfg.reduction),
                       num_layers=len(tapped), tie_embeddings=True,
                       layer_types=tuple(cfg.layer_types[i] for i in tapped) if cfg.layer_types
                       else ())


def side_shapes(cfg: ModelConfig, scfg: SideConfig) -> dict[str, tuple]:
    if scfg.cut is not None:
        from mobiletune.models.lora import targets
        out = {}
        for mod, (fan_in, fan_out) in targets(cfg, top_lora(cfg, scfg)).items():
            out[B.SIDE + mod + ".lora_A.weight"] = (scfg.rank, fan_in)
            out[B.SIDE + mod + ".lora_B.weight"] = (fan_out, scfg.rank)
        return out
    sc = side_config(cfg, scfg)
    spec = families.spec(cfg.family)
    ds, d, din = sc.hidden_size, cfg.hidden_size, scfg.tap_width(cfg.hidden_size)
    out = {B.SIDE_EMBED_DOWN: (ds, d), B.SIDE_UP: (d, ds)}
    for j in range(sc.num_layers):
        p = B.side_layer_prefix(j)
        out[p + "gate"] = (ds,)
        out[p + "down.weight"] = (ds, din)
        out.update({p + k: v for k, v in spec.layer_shapes(sc).items()})
    full = spec.param_shapes(sc)
    out.update({B.SIDE_NORM + n: full[n] for n in spec.final_norm})
    return out


def init_side(cfg: ModelConfig, scfg: SideConfig, key) -> dict[str, np.ndarray]:
    """Fresh side params: the family's own init for blocks and norm, down-projections
    uniform(±1/sqrt(in)) (as LoRA's A), gates at 0 (sigmoid 0.5), ``side.up`` zero; with
    ``cut``, LoRA's own init (A uniform, B zero)."""
    if scfg.cut is not None:
        from mobiletune.models.lora import init_lora
        return {B.SIDE + k: np.asarray(v) for k, v in init_lora(cfg, top_lora(cfg, scfg), key).items()}
    sc = side_config(cfg, scfg)
    fam = models.family(sc)
    shapes = side_shapes(cfg, scfg)
    keys = jax.random.split(key, len(shapes))
    out = {}
    for (name, shape), k in zip(sorted(shapes.items()), keys):
        if name == B.SIDE_UP or name.endswith(".gate"):
            v = jnp.zeros(shape, jnp.float32)
        elif name.endswith("down.weight"):
            b = 1.0 / math.sqrt(shape[1])
            v = jax.random.uniform(k, shape, jnp.float32, -b, b)
        elif name.startswith(B.SIDE_NORM):
            v = fam.init_layer(sc, name[len(B.SIDE_NORM):], shape, k)
        else:  # side.layers.{j}.<the family's layer-relative name>
            v = fam.init_layer(sc, name.split(".", 3)[3], shape, k)
        out[name] = np.asarray(v)
    return out


def layer_params(side: dict, j: int) -> dict:
    """The j-th side layer's params (gate, down and the block's), names relative to it."""
    p = B.side_layer_prefix(j)
    return {k[len(p):]: v for k, v in side.items() if k.startswith(p)}


def norm_params(side: dict, cfg: ModelConfig) -> dict:
    return {n: side[B.SIDE_NORM + n] for n in families.spec(cfg.family).final_norm}


def side_in(w_embed_down, emb, form: str = "einsum"):
    """(B, T, D) embeddings -> the side state (B, T, Ds)."""
    return L.linear(emb, w_embed_down, form=form)


def side_layer(lp: dict, sc: ModelConfig, j: int, s, tap, positions, attn=None):
    """Mix the tap into the side state through the gate, then the side block."""
    g = jax.nn.sigmoid(lp["gate"])
    s = g * s + (1.0 - g) * L.linear(tap, lp["down.weight"], form=sc.matmul)
    kw = {} if attn is None else {"attn": attn}
    return models.family(sc).block(lp, sc, j, s, positions, **kw)[0]


def side_out(norm: dict, w_up, sc: ModelConfig, hn, s):
    """The backbone's final-normed hidden state plus the side network's contribution."""
    return hn + L.linear(models.family(sc).final_norm(norm, sc, s), w_up, form=sc.matmul)


def side_hidden(side: dict, base: dict, cfg: ModelConfig, scfg: SideConfig, tokens, taps,
                h_last):
    """What the head reads (B, T, D): the backbone's final-normed last hidden state with
    the side network's sum added. ``taps``: a sequence of (B, T, tap width), one per tapped
    layer; ``h_last`` (B, T, D): the backbone's output before its final norm (with ``cut``:
    h_cut, the phone's last layer's output, and no taps)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    if scfg.cut is not None:
        from mobiletune.models.lora import merge
        fam, lcfg = models.family(cfg), top_lora(cfg, scfg)
        merged = merge(base, {k[len(B.SIDE):]: v for k, v in side.items()}, cfg, lcfg)
        h = h_last
        for i in range(scfg.cut, cfg.num_layers):
            h, _ = fam.block(models.layer_params(merged, cfg, i), cfg, i, h, positions)
        return fam.final_norm(base, cfg, h)
    sc = side_config(cfg, scfg)
    emb = models.family(cfg).embed(base, cfg, tokens, positions)                # (B, T, D)
    s = side_in(side[B.SIDE_EMBED_DOWN], emb, cfg.matmul)                       # (B, T, Ds)
    for j, tap in enumerate(taps):
        s = side_layer(layer_params(side, j), sc, j, s, tap, positions)
    hn = models.family(cfg).final_norm(base, cfg, h_last)
    return side_out(norm_params(side, cfg), side[B.SIDE_UP], sc, hn, s)


def backbone_taps(base: dict, cfg: ModelConfig, scfg: SideConfig, tokens, pooled: bool = True):
    """(taps, h_last) of the frozen backbone in JAX: what the phone computes and sends
    (before quantization); ``pooled`` applies ``width="pooled"`` when the config asks."""
    fam = models.family(cfg)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    h = fam.embed(base, cfg, tokens, positions)
    want, taps = set(scfg.tapped(cfg.num_layers)), []
    for i in range(cfg.num_layers if scfg.cut is None else scfg.cut):
        h, _ = fam.block(models.layer_params(base, cfg, i), cfg, i, h, positions)
        if i in want:
            taps.append(h)
    if pooled and scfg.width == "pooled":
        r = scfg.reduction
        taps = [t.reshape(*t.shape[:-1], t.shape[-1] // r, r).mean(-1) for t in taps]
    return taps, h


def side_logits(side: dict, base: dict, cfg: ModelConfig, scfg: SideConfig, tokens):
    """(B, T, V) logits of backbone + side network from tokens (desktop generation and the
    reference the phone's side-aware ``infer`` is checked against)."""
    taps, h_last = backbone_taps(base, cfg, scfg, tokens)
    return models.unembed(base, cfg, side_hidden(side, base, cfg, scfg, tokens, taps, h_last))
