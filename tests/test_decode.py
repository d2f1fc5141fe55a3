"""KV-cache decoding in the bundle (``prefill`` / ``decode``; sharded: ``block_prefill_*`` /
``block_decode_*`` / ``norm_decode``, per layer over its weights as constants:
``test_constant_decode.py``): greedy tokens equal
the desktop JAX generator's (``mobiletune generate``'s ``inference.generate``) on the same
weights and adapter, and the decode logits equal the old ``infer`` path's.

Tolerance: decode and ``infer`` logits agree to 2e-5 absolute (both float32 LiteRT over the
same weights; they differ only in the order of the attention sums: a cache of T slots with
the padding masked vs the padded window). Token equality with JAX is exact (greedy)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mobiletune.formats.loading import load_model  # noqa: E402
from mobiletune.inference.generate import generate  # noqa: E402
from mobiletune.runtime import bundle as B  # noqa: E402
from mobiletune.runtime.device_trainer import generate_ids  # noqa: E402
from mobiletune.runtime.runner import BundleError, HostCache, open_bundle  # noqa: E402

PROMPT = [5, 17, 3, 42]
LOGIT_ATOL = 2e-5


def adapted_state(runner, seed: int = 1) -> dict:
    """The bundle's state with every LoRA B (zero at export) drawn at random: a stand-in
    for a trained adapter that changes every adapted layer."""
    rng = np.random.default_rng(seed)
    s = {k: np.array(v) for k, v in runner.get_state().items()}
    for k, v in s.items():
        if k.startswith(B.TRAINABLE) and "lora_B" in k:
            s[k] = rng.normal(0.0, 0.3, v.shape).astype(np.float32)
    return s


def desktop_tokens(recipe, state, n_new: int) -> list[int]:
    """What ``mobiletune generate`` computes: the JAX generator with a KV cache, over the
    base weights plus the state's trainable tensors (the adapter, or all weights)."""
    m = load_model(recipe.model)
    lora = recipe.lora.resolved(m.cfg).ctx() if recipe.lora else None
    params = {**{k: jnp.asarray(v) for k, v in m.params.items()},
              **{k: jnp.asarray(v) for k, v in B.trainable_part(state).items()}}
    return generate(params, m.cfg, PROMPT, n_new, lora=lora)


@pytest.mark.parametrize("kind", ["mono", "sharded"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_cached_greedy_equals_desktop_and_infer(exported, kind, family):
    """Without and with an adapter: the cached tokens equal the JAX generator's and the
    ``infer`` path's; every decode step's logits equal ``infer``'s at that prefix; the
    adapter changes the logits (so the comparison sees it)."""
    recipe, bundle = exported(kind, family)
    r = open_bundle(bundle)
    n_new = r.manifest.seq_len - len(PROMPT)            # to the end of the window
    base_logits = None
    for state in (None, "adapted"):
        if state == "adapted":
            r.set_state(adapted_state(r))
        s = r.get_state()
        cached, _ = generate_ids(r, PROMPT, n_new)
        plain, _ = generate_ids(r, PROMPT, n_new, cache=False)
        assert cached == plain == desktop_tokens(recipe, s, n_new), state
        assert len(cached) == n_new
        logits, kv = r.prefill(PROMPT)
        ids = list(PROMPT)
        for t in cached:
            np.testing.assert_allclose(logits, r.infer(ids, len(ids) - 1), atol=LOGIT_ATOL,
                                       rtol=0)
            ids.append(t)
            if len(ids) < r.manifest.seq_len:
                logits = r.decode(t, len(ids) - 1, kv)
        if base_logits is None:
            base_logits = r.prefill(PROMPT)[0]
        else:
            assert np.abs(r.prefill(PROMPT)[0] - base_logits).max() > 1e-2


def test_full_finetuning_state_decodes_as_desktop(exported):
    """Full fine-tuning, sharded: every weight (the tied embedding/head too) comes from the
    state; after a new state the pinned weights are rebuilt and the tokens follow it."""
    recipe, bundle = exported("sharded", "llama", mode="full")
    r = open_bundle(bundle)
    n_new = r.manifest.seq_len - len(PROMPT)
    before, _ = generate_ids(r, PROMPT, n_new)
    rng = np.random.default_rng(2)
    s = {k: (v + rng.normal(0.0, 0.05, v.shape).astype(np.float32)
             if k.startswith(B.TRAINABLE) else v) for k, v in r.get_state().items()}
    r.set_state(s)
    after, _ = generate_ids(r, PROMPT, n_new)
    assert after == generate_ids(r, PROMPT, n_new, cache=False)[0]
    assert after == desktop_tokens(recipe, s, n_new)
    assert after != before


@pytest.mark.parametrize("kind", ["mono", "sharded"])
def test_an_optimizer_step_after_decoding_rebuilds_the_decoder(exported, kind):
    """The decoder holds the weights it was built with (constants, pinned inputs): after an
    optimizer step it must decode with the new ones. Cached logits equal ``infer``'s (which
    reads the state each call) before and after the step, and the step changed them."""
    _, bundle = exported(kind, "llama")
    r = open_bundle(bundle)
    t = r.manifest.seq_len
    rng = np.random.default_rng(3)
    batch = {"inputs": rng.integers(0, 60, (1, t)).astype(np.int32),
             "targets": rng.integers(0, 60, (1, t)).astype(np.int32),
             "loss_mask": np.ones((1, t), np.float32)}
    before = r.prefill(PROMPT)[0]
    np.testing.assert_allclose(before, r.infer(PROMPT, len(PROMPT) - 1), atol=LOGIT_ATOL, rtol=0)
    for _ in range(3):
        r.accumulate(batch)
        r.apply()
    after = r.prefill(PROMPT)[0]
    np.testing.assert_allclose(after, r.infer(PROMPT, len(PROMPT) - 1), atol=LOGIT_ATOL, rtol=0)
    assert np.abs(after - before).max() > 1e-3


def test_decode_refuses_a_position_outside_the_window(exported):
    recipe, bundle = exported("sharded", "llama")
    r = open_bundle(bundle)
    _, kv = r.prefill(PROMPT)
    with pytest.raises(BundleError, match="outside the bundle's window"):
        r.decode(1, r.manifest.seq_len, kv)
    with pytest.raises(BundleError, match="KV cache of shape"):
        HostCache(r.manifest, np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)))


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_sharded_prefill_paths_agree(exported, family):
    """A 10-token prompt through ``block_prefill`` (the padded window) and through
    ``block_decode`` token by token (the short-prompt path): logits equal ``infer``'s, and
    the cache rows agree to 1e-5 + 1e-4 relative (the window pass writes its products as
    batched matmuls, decoding as FULLY_CONNECTED: float32 sums in another order)."""
    recipe, bundle = exported("sharded", family)
    r = open_bundle(bundle)
    r.set_state(adapted_state(r))
    prompt = [7, 1, 30, 2, 9, 11, 4, 60, 8, 3]
    dec, n = r.decoder(), len(prompt)
    got = {}
    for prefill_min in (0, n):                 # 0: block_prefill; n: block_decode per token
        dec.prefill_min = prefill_min
        logits, kv = r.prefill(prompt)
        np.testing.assert_allclose(logits, r.infer(prompt, n - 1), atol=LOGIT_ATOL, rtol=0)
        got[prefill_min] = kv
    for a, b in ((got[0].k, got[n].k), (got[0].v, got[n].v)):
        np.testing.assert_allclose(a[:, :n], b[:, :n], atol=1e-5, rtol=1e-4)


def test_schema_4_bundles_are_refused_with_the_reexport_command(exported, tmp_path):
    """A bundle from before the decoding signatures (schema 4) is refused on load, saying
    why and how to re-export it (no fallback to ``infer``: every schema-5 bundle decodes)."""
    import json
    import shutil

    from mobiletune.runtime.bundle import read_manifest
    _, bundle = exported("sharded", "llama")
    d = tmp_path / "old"
    shutil.copytree(bundle, d)
    man = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**man, "schema_version": 4}))
    with pytest.raises(BundleError, match=r"4 lacked the KV-cache decoding signatures.*"
                                          r"re-export it: mobiletune export"):
        read_manifest(d)


@pytest.mark.parametrize("constants", [True, False])
def test_pinning_hands_back_each_layers_store_pages_before_the_next(exported, monkeypatch,
                                                                     constants):
    """Each layer's decode interpreter copies that layer's weights (packed constants, or
    pinned inputs), so the weight store's pages of the layer go back (``release_pending``)
    before the next layer's: while the decoder is built, the mapping holds about one layer,
    not the model (SmolLM2-135M, pinned: the process's peak RSS 1308 MB with every layer
    released after the last, 810 MB layer by layer). The order of the calls is the
    contract tested here: on a tiny model the kernel's fault-around (64 KB) maps more than
    one layer anyway. With constants the pages go once the layer's program file is
    written, before its interpreter exists."""
    from mobiletune.runtime.sharded import decode
    recipe, bundle = exported("sharded", "llama")
    r = open_bundle(bundle)
    r.decode_constants = constants
    events, pin, release = [], decode.PinnedCall, r.store.release_pending

    def pinned(*a, **kw):
        events.append("pin")
        return pin(*a, **kw)

    def released():
        events.append("release")
        release()
    monkeypatch.setattr(decode, "PinnedCall", pinned)
    monkeypatch.setattr(r.store, "release_pending", released)
    r.decoder()
    assert len(r.lay.layers) >= 3
    pair = ["release", "pin"] if constants else ["pin", "release"]
    assert events == pair * len(r.lay.layers), events
