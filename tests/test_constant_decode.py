"""Decoding over constant weights (bundle schema 6; monolithic, 7): the exporter's skeleton of
``block_decode_<kind>`` with the weights cut out, the phone's program file per layer, and the
manifest's contract for both.

References: numpy's product for a round trip through a skeleton (1e-5 relative); the
program's ``block_decode`` over pinned weight inputs for whole layers (2e-5 absolute on the
logits: two float32 kernels, sums in another order). The JAX generator's tokens are
compared in ``test_decode.py``, which runs this path by default."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from export.common import ExportError  # noqa: E402
from export.constant_decode import skeleton  # noqa: E402
from mobiletune.runtime import bundle as B  # noqa: E402
from mobiletune.runtime.runner import BundleError, open_bundle  # noqa: E402
from mobiletune.runtime.sharded.constant_decode import write_program  # noqa: E402
from tests.test_decode import PROMPT, adapted_state  # noqa: E402

F32 = "float32"


def _decode_logits(r, n: int = 4) -> list[np.ndarray]:
    """The prompt's logits and then ``n`` greedy decode steps' logits."""
    logits, kv = r.prefill(PROMPT)
    out, pos = [logits], len(PROMPT)
    for _ in range(n):
        logits = r.decode(int(np.argmax(logits)), pos, kv)
        out.append(logits)
        pos += 1
    return out


def test_a_skeleton_takes_any_weights_back(tmp_path):
    """Products in both layouts (x @ w.T, stored as is; x @ w, stored transposed): the
    skeleton assembled with other weights computes numpy's product with those weights."""
    from ai_edge_litert.interpreter import Interpreter

    def fn(kw):
        y = jnp.einsum("...q,pq->...p", kw["x"], kw["w__a"])        # w__a: (p, q)
        return {"y": jnp.einsum("...p,pr->...r", y + kw["b"], kw["w__c"])}   # w__c: (p, r)
    specs = [B.TensorSpec("x", (1, 3, 8), F32), B.TensorSpec("b", (16,), F32),
             B.TensorSpec("w__a", (16, 8), F32), B.TensorSpec("w__c", (16, 5), F32)]
    skel, regions, rest = skeleton(fn, specs, "sig")
    assert [s.name for s in rest] == ["x", "b"]
    assert {(x.name, x.transposed) for x in regions} == {("w__a", False), ("w__c", True)}
    assert len(skel) + sum(x.nbytes for x in regions) > max(x.offset + x.nbytes for x in regions)
    rng = np.random.default_rng(5)
    w = {"w__a": rng.normal(size=(16, 8)).astype(np.float32),
         "w__c": rng.normal(size=(16, 5)).astype(np.float32)}
    x, b = rng.normal(size=(1, 3, 8)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    path = tmp_path / "p.tflite"
    write_program(skel, regions, w, path)
    got = Interpreter(model_path=str(path)).get_signature_runner("sig")(x=x, b=b)["y"]
    np.testing.assert_allclose(got, (x @ w["w__a"].T + b) @ w["w__c"], rtol=1e-5, atol=1e-5)
    with pytest.raises(BundleError, match=r"needs weight 'w__c'"):
        write_program(skel, regions, {"w__a": w["w__a"]}, path)
    with pytest.raises(BundleError, match=r"'w__a' \(16, 7\) has 448 bytes; the decode "
                                          r"program holds 512"):
        write_program(skel, regions, {**w, "w__a": w["w__a"][:, :7]}, path)
    with pytest.raises(BundleError, match=r"the skeleton ends before weight"):
        write_program(skel[:regions[0].offset - 1], regions, w, path)


def test_the_exporter_refuses_a_weight_the_converter_folds():
    """A weight the converter folds into another constant (here, times 2) is not in the
    program verbatim, so another layer's weights could not replace it: the export fails."""
    def fn(kw):
        return {"y": jnp.einsum("...q,pq->...p", kw["x"], kw["w__a"] * 2.0)}
    specs = [B.TensorSpec("x", (1, 8), F32), B.TensorSpec("w__a", (16, 8), F32)]
    with pytest.raises(ExportError, match=r"weight 'w__a' \(16, 8\) is not stored once, "
                                          r"verbatim"):
        skeleton(fn, specs, "sig")


@pytest.mark.parametrize("kind", ["sharded", "mono"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_constant_weight_decoding_equals_pinned_weights(exported, kind, family):
    """With an adapter (LoRA factors stay inputs, the base products are constants): the
    decoder's interpreters take none of the constant weights as inputs, and their logits
    equal the program's ``block_decode`` over the pinned weights (that one on one thread, so
    the head's matvec runs unsplit there and split over the cores here). A monolithic bundle
    (schema 7) decodes with the same per-layer programs; its reference is the program's
    own ``decode`` over its resource variables, the whole model in one signature."""
    _, bundle = exported(kind, family)
    r = open_bundle(bundle)
    r.set_state(adapted_state(r))
    lay = r.manifest.decode_layout
    consts = lay.decode_consts
    assert set(consts) == set(lay.kinds)
    for call, ly in zip(r.decoder().layers, lay.layers):
        names = {x.name for x in consts[ly.kind]}
        inputs = set(call.it.get_signature_list()[B.block_decode_sig(ly.kind)]["inputs"])
        assert names and not names & inputs
        assert any(".lora_" in n for n in inputs)
    got = _decode_logits(r)
    pinned = open_bundle(bundle, threads=1)        # and the head's rows on one thread, not a pool
    pinned.decode_constants = False
    pinned.set_state(r.get_state())
    for a, b in zip(got, _decode_logits(pinned)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def _decode_file_mappings() -> tuple[list[str], int]:
    """(the mappings of the decoder's program files, their resident kB) from smaps."""
    maps, rss, cur = [], 0, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head[0].endswith(":"):
                if head[0] == "Rss:" and "mobiletune-decode-" in cur:
                    rss += int(head[1])
            else:
                cur = line.rstrip("\n")
                if "mobiletune-decode-" in cur:
                    maps.append(cur)
    return maps, rss


def test_the_program_files_leave_the_resident_set(exported):
    """Each layer's program file is unlinked once mapped, and its mapped pages are handed
    back once XNNPACK has packed the weights (``drop_mapped_pages``): the mappings stay,
    marked deleted, with nothing resident. (Later calls fault back the few pages that the
    kernels LiteRT runs itself read: small constants; SmolLM2-135M, benchmarks/README.md.)"""
    _, bundle = exported("sharded", "llama")
    r = open_bundle(bundle)
    r.decoder()
    maps, rss = _decode_file_mappings()
    assert len(maps) >= len(r.lay.layers)
    assert all(m.endswith("(deleted)") for m in maps), maps
    assert rss == 0, rss


def test_dropping_the_runner_unmaps_the_decoder_at_once(exported):
    """The decoder refers to its runner weakly: no cycle keeps its interpreters (and their
    program files' mappings, and the packed model) alive until a garbage collection."""
    _, bundle = exported("sharded", "llama")
    r = open_bundle(bundle)
    r.decoder()
    assert _decode_file_mappings()[0]
    del r
    assert _decode_file_mappings()[0] == []


def test_the_monolithic_decoder_keeps_no_view_of_the_base_file(exported):
    """A monolithic bundle's decoder reads the frozen weights from the base file's memory
    map; once built it holds copies only (the embedding, the norms: a view of either kept the
    whole map, and every page the build read, resident: SmolLM2-135M +513 MB)."""
    _, bundle = exported("mono", "llama")
    r = open_bundle(bundle)
    base = str((bundle / B.BASE).resolve())
    r.decoder()
    with open("/proc/self/maps") as f:
        assert not [line for line in f if line.rstrip("\n").endswith(base)]
    assert len(_decode_logits(r, 2)) == 3


def _edited(bundle, tmp_path, edit):
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    man = json.loads((d / B.MANIFEST).read_text())
    edit(man, d)
    (d / B.MANIFEST).write_text(json.dumps(man))
    return d


def test_a_schema_5_bundle_decodes_over_pinned_weights(exported, tmp_path):
    """Schema 5 (no skeletons) is still read; its decoder pins the weights as inputs and
    computes the same logits."""
    _, bundle = exported("sharded", "llama")

    def to_5(man, d):
        man["schema_version"] = 5
        del man["sharded"]["decode_consts"]
        for role in [k for k in man["files"] if k.startswith("decode_")]:
            (d / man["files"].pop(role)["path"]).unlink()
    r5 = open_bundle(_edited(bundle, tmp_path, to_5))
    assert r5.lay.decode_consts == {}
    w = {B.W + n for n in r5.lay.kinds["k0"].frozen}
    assert w <= set(r5.decoder().layers[0].it.get_signature_list()["block_decode_k0"]["inputs"])
    for a, b in zip(_decode_logits(r5), _decode_logits(open_bundle(bundle))):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_a_schema_6_monolithic_bundle_decodes_with_its_program(exported, tmp_path):
    """Before schema 7 a monolithic bundle had no per-layer decode programs: it is still
    read, and decodes with the program's ``decode`` to the same logits."""
    _, bundle = exported("mono", "llama")

    def to_6(man, d):
        man["schema_version"] = 6
        del man["decoding"]
        for role in [k for k in man["files"] if k.startswith("decode_")]:
            (d / man["files"].pop(role)["path"]).unlink()
    r6 = open_bundle(_edited(bundle, tmp_path, to_6))
    assert r6.manifest.decoding is None and r6.decoder() is None
    for a, b in zip(_decode_logits(r6), _decode_logits(open_bundle(bundle))):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["sharded"]["decode_consts"]["k0"][0].__setitem__(2, 12),
     r"decode_consts.k0' 'w__self_attn.q_proj.weight' \(60, 30\) is not 12 float32 bytes"),
    (lambda m: m["sharded"]["decode_consts"]["k0"].pop(2),
     r"decode_consts.k0' holds \[.*\]; the constant weights of block_decode_k0 are \[.*"
     r"'w__self_attn.k_proj.weight'"),
    (lambda m: m["sharded"]["decode_consts"]["k0"][1].__setitem__(1, 0),
     r"decode_consts.k0' \[1\] overlaps the region before it"),
    (lambda m: m["sharded"]["decode_consts"]["k0"][0].__setitem__(3, "yes"),
     r"decode_consts.k0' must be a list of \[input name, offset, bytes, transposed\]s"),
    (lambda m: m["files"].pop("decode_k0"), r"decode_consts.k0' has no 'decode_k0' file"),
    (lambda m: m["files"].__setitem__("decode_x", m["files"]["decode_k0"]),
     r"key 'files.decode_x' is not a file role"),
])
def test_the_manifest_refuses_bad_constant_regions(exported, tmp_path, edit, message):
    _, bundle = exported("sharded", "llama")
    d = _edited(bundle, tmp_path, lambda man, d: edit(man))
    with pytest.raises(BundleError, match=message):
        B.read_manifest(d)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["decoding"]["decode_consts"]["k0"].pop(0),
     r"decoding.decode_consts.k0' holds \[.*\]; the constant weights of block_decode_k0"),
    (lambda m: m["decoding"].update(groups=[{"name": "g", "tensors": [], "optimizer": "decay",
                                             "size": 1}], opt_leaves={"decay": []}),
     r"'decoding' is for monolithic bundles, and holds no optimizer groups"),
    (lambda m: m["decoding"].pop("layers"), r"decoding.layers"),
    (lambda m: m["signatures"].pop(next(i for i, s in enumerate(m["signatures"])
                                        if s["name"] == "norm_decode")),
     r"lacks the signature 'norm_decode'"),
    (lambda m: m["files"].pop("decode_k0"), r"decoding.decode_consts.k0' has no 'decode_k0'"),
])
def test_the_manifest_refuses_a_bad_monolithic_decoding_layout(exported, tmp_path, edit,
                                                                message):
    _, bundle = exported("mono", "llama")
    d = _edited(bundle, tmp_path, lambda man, d: edit(man))
    with pytest.raises(BundleError, match=message):
        B.read_manifest(d)
