"""Training data shared by the desktop and the phone trainers (standard library + numpy only).

Contract: the same DataConfig, files, tokenizer and seeds give bit-identical arrays and batches
on both sides. The tokenizer is duck-typed: ``encode(text, add_special_tokens=False)``,
``apply_chat_template(messages, add_generation_prompt)``, ``bos_id``, ``eos_id``, ``pad_id``,
``adds_bos``. Errors are DataError naming the file, the line and the field or value.

Example: ``seq_len + 1`` tokens x; ``inputs = x[:-1]``, ``targets = x[1:]`` ((N, seq_len) int32),
``loss_mask[t]`` (float32) = whether target t (token x[t+1]) is trained; ``num_tokens`` counts
the trained targets. "Longer than seq_len" means more than seq_len + 1 tokens.

Text (kind "auto": any extension but .jsonl/.ndjson; .json is refused): one file = one
document, strict UTF-8, a leading BOM dropped, bytes otherwise as they are (no newline
translation; ``read_text_file`` is the one reader desktop and phone share); tokens
``encode(text)``, with bos_id first when adds_bos. ``pack`` (default for text): documents
concatenated in the given order, eos_id between consecutive ones when add_eos_between_docs, cut
into non-overlapping chunks: example i = stream[i(L+1) : (i+1)(L+1)].
Each stream token is in exactly one example; the last ``len % (L+1)`` are dropped
(``dropped_tokens``); the pair joining two chunks is never a target (1/(L+1) of the pairs).
All targets trained. ``bos_each_example`` (packed text, a tokenizer that adds BOS): the stream
is built without the documents' BOS, cut into chunks of L, and every example is bos_id +
chunk — each window starts as the perplexity definition feeds it (Gemma needs its BOS: without
it the base model's loss on Shakespeare is ~1.8 nats/token higher); all L targets trained,
the chunk's first token predicted from BOS. With a tokenizer that adds no BOS it changes
nothing. ``pack=False``: one document = one example (+ EOS if add_eos_between_docs).

JSONL, one object a line (blank lines skipped): ``{"prompt": str, "response": str}`` (= messages
[user: prompt, assistant: response]) or ``{"messages": [{"role", "content"}, ...]}`` ending with
the assistant's. ``full = apply_chat_template(messages, False)``, tokenized, bos_id prepended
when adds_bos and not already first. ``mask_prompt``: the loss covers the final assistant turn
only (earlier turns are context; one record per turn trains each): characters from the end of
``apply_chat_template(messages[:-1], True)`` (which must be a prefix of full) to the end of full
less trailing whitespace = the response and the end-of-turn marker after it. Character boundary
c is token boundary ``len(encode(full[:c]))`` when that encoding is a prefix of encode(full);
else (a BPE merge across the boundary) character-offset masking: a token holding a response
character is trained (the straddling one too), and a warning is recorded. Record = example,
padded with pad_id (eos_id if None, else 0), loss 0 on padding and prompt. Too long:
truncate="error" raises naming the record; "truncate" keeps the first seq_len + 1 tokens and
warns. An example left with no trained target is dropped with a warning.

Split: val_fraction f puts ``max(1, round(N*f))`` examples chosen by seed in validation (both
parts keep file order); or ``val_paths`` are whole validation files.

Batches: BatchIterator state ``{"epoch", "index"}``. Epoch e's example stream is
``argsort(PCG64(SeedSequence([seed, e])).random_raw(N), stable)`` (the bit generator of
``np.random.default_rng([seed, e])``) cut to a multiple of batch_size (examples an optimizer
step, default the micro-batch). ``next(k)`` takes the next k examples, going to the next epoch
when fewer than k are left: micro-batches dividing batch_size see the same stream. Resume with
the same dataset, seed and batch_size. Raw PCG64 output is used because numpy guarantees that
"a fixed seed will always produce the same random integer stream" for PCG64 (SeedSequence is
fixed too), while Generator methods (permutation) are reproducible only on one numpy build
(numpy.random's compatibility policy, NEP 19).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from mobiletune.errors import DataError

_SPLIT_KEY = 0x5EED5917  # 3rd SeedSequence word: [seed, 0, key] is no [seed, epoch] (= [.., 0, 0])
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


@dataclass(frozen=True)
class DataConfig:
    seq_len: int
    kind: str = "auto"            # "text" | "jsonl" | "auto" (by extension)
    val_fraction: float = 0.0
    seed: int = 0                 # the validation split
    pack: bool | None = None      # None: True for text, False for JSONL
    add_eos_between_docs: bool = True
    truncate: str = "error"       # "error" | "truncate"
    mask_prompt: bool = True
    bos_each_example: bool = False  # packed text: every example starts with BOS

    def __post_init__(self):
        vf = self.val_fraction
        for name, ok, what in (
                ("seq_len", type(self.seq_len) is int and self.seq_len >= 1, "a positive integer"),
                ("kind", self.kind in ("auto", "text", "jsonl"), "'text', 'jsonl' or 'auto'"),
                ("val_fraction", type(vf) in (int, float) and 0 <= vf < 1, "a number in [0, 1)"),
                ("seed", type(self.seed) is int and self.seed >= 0, "a non-negative integer"),
                ("pack", self.pack is None or type(self.pack) is bool, "true, false or null"),
                ("add_eos_between_docs", type(self.add_eos_between_docs) is bool, "true or false"),
                ("truncate", self.truncate in ("error", "truncate"), "'error' or 'truncate'"),
                ("mask_prompt", type(self.mask_prompt) is bool, "true or false"),
                ("bos_each_example", type(self.bos_each_example) is bool, "true or false")):
            if not ok:
                raise DataError(f"data config: {name}={getattr(self, name)!r}: must be {what}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"data config: unknown key(s) {unknown}")
        if "seq_len" not in d:
            raise DataError("data config: missing key 'seq_len'")
        return cls(**d)


@dataclass
class Dataset:
    inputs: np.ndarray     # (N, seq_len) int32
    targets: np.ndarray    # (N, seq_len) int32
    loss_mask: np.ndarray  # (N, seq_len) float32

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(np.count_nonzero(self.loss_mask))

    def take(self, idx) -> "Dataset":
        return Dataset(self.inputs[idx], self.targets[idx], self.loss_mask[idx])

    def batch(self, idx) -> dict:
        return {"inputs": self.inputs[idx], "targets": self.targets[idx],
                "loss_mask": self.loss_mask[idx]}


@dataclass
class Prepared:
    train: Dataset
    val: Dataset | None
    warnings: list[str]
    dropped_tokens: int = 0  # packing remainders, summed over train and val


def prepare(paths, tokenizer, config: DataConfig, val_paths=None) -> Prepared:
    """Read, tokenize, pack or pad, and split the data (see the module docstring)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    val_paths = [val_paths] if isinstance(val_paths, (str, Path)) else list(val_paths or [])
    if not paths:
        raise DataError("no data files given")
    warnings: list[str] = []
    data, dropped = _build(paths, tokenizer, config, warnings)
    if val_paths:
        if config.val_fraction:
            raise DataError(f"val_fraction={config.val_fraction} and validation files "
                            f"{[str(p) for p in val_paths]}: give one or the other")
        val, vdropped = _build(val_paths, tokenizer, config, warnings)
        return Prepared(data, val, warnings, dropped + vdropped)
    train, val = split(data, config.val_fraction, config.seed)
    return Prepared(train, val, warnings, dropped)


def split(data: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, validation); validation is None when ``val_fraction`` is 0."""
    if not val_fraction:
        return data, None
    n = len(data)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise DataError(f"val_fraction={val_fraction} leaves no training example ({n} examples)")
    order = _order(n, [seed, 0, _SPLIT_KEY])
    return data.take(np.sort(order[n_val:])), data.take(np.sort(order[:n_val]))


def _order(n: int, entropy) -> np.ndarray:
    raw = np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(n)
    return np.argsort(raw, kind="stable")


class BatchIterator:
    """Shuffled micro-batches with the data position as explicit, JSON-able state."""

    def __init__(self, dataset: Dataset, micro_batch: int, seed: int, *,
                 batch_size: int | None = None, state: dict | None = None):
        for name, v, low in (("micro_batch", micro_batch, 1), ("seed", seed, 0),
                             ("batch_size", 1 if batch_size is None else batch_size, 1)):
            if type(v) is not int or v < low:
                raise DataError(f"BatchIterator: {name}={v!r}: must be an integer >= {low}")
        self.dataset, self.seed, self.micro_batch = dataset, seed, micro_batch
        self.batch_size = batch_size or micro_batch
        n = len(dataset)
        self.epoch_len = n - n % self.batch_size
        if self.epoch_len == 0:
            raise DataError(f"{n} examples: fewer than one batch of {self.batch_size}")
        self.epoch, self.index, self._cache = 0, 0, (None, None)
        if state is not None:
            self._load(state)

    @classmethod
    def from_state(cls, dataset: Dataset, micro_batch: int, seed: int, state: dict, *,
                   batch_size: int | None = None) -> "BatchIterator":
        return cls(dataset, micro_batch, seed, batch_size=batch_size, state=state)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def _load(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "index"} or any(
                type(state[k]) is not int or state[k] < 0 for k in state):
            raise DataError(f"data state {state!r}: expected {{'epoch': int >= 0, 'index': int >= 0}}")
        if state["index"] > self.epoch_len:
            raise DataError(f"data state {state!r}: index past the epoch of this dataset "
                            f"({self.epoch_len} examples an epoch): not the same data?")
        self.epoch, self.index = state["epoch"], state["index"]

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of ``epoch``'s stream (length ``epoch_len``)."""
        if self._cache[0] != epoch:
            self._cache = (epoch, _order(len(self.dataset), [self.seed, epoch])[:self.epoch_len])
        return self._cache[1]

    def next(self, k: int | None = None) -> dict:
        """The next ``k`` (default ``micro_batch``) examples as ``inputs``/``targets``/``loss_mask``."""
        k = self.micro_batch if k is None else k
        if type(k) is not int or not 1 <= k <= self.epoch_len:
            raise DataError(f"micro-batch {k!r}: must be an integer in [1, {self.epoch_len}]")
        if self.index + k > self.epoch_len:
            self.epoch, self.index = self.epoch + 1, 0
        idx = self.order(self.epoch)[self.index:self.index + k]
        self.index += k
        if self.index == self.epoch_len:
            self.epoch, self.index = self.epoch + 1, 0
        return self.dataset.batch(idx)

    __next__ = next

    def __iter__(self):
        return self


def eval_batches(dataset: Dataset, batch_size: int):
    """Batches in dataset order, the last one possibly smaller (for validation)."""
    for s in range(0, len(dataset), batch_size):
        yield dataset.batch(slice(s, s + batch_size))


# ---- reading ------------------------------------------------------------------------------
def read_text_file(path) -> str:
    """A text file as str: strict UTF-8 (an error names the file, byte offset and line), a
    leading BOM dropped, nothing else changed (CRLF stays CRLF); an empty file is an
    error. Desktop and phone read every text through this one function."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                        f"(line {line})") from None
    text = text[1:] if text.startswith("\ufeff") else text
    if not text:
        raise DataError(f"{path}: empty file")
    return text


def _records(path):
    """(line number, messages) for each record of a JSONL file."""
    n = 0
    for lineno, line in enumerate(read_text_file(path).split("\n"), 1):
        line = line.strip(" \t\r")
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: bad JSON: {e.msg} (column {e.colno})") from None
        n += 1
        yield lineno, _messages(rec, f"{path}:{lineno}")
    if not n:
        raise DataError(f"{path}: no records")


def _messages(rec, where: str) -> list[dict]:
    def typed(obj, key, label, kind=str):
        if key not in obj:
            raise DataError(f"{where}: missing field {label!r}")
        if not isinstance(obj[key], kind):
            raise DataError(f"{where}: field {label!r} must be {'a string' if kind is str else 'a list'}, "
                            f"got {_JSON_TYPES.get(type(obj[key]), type(obj[key]).__name__)}")
        return obj[key]
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {_JSON_TYPES.get(type(rec), '?')}")
    if "messages" not in rec:
        return [{"role": "user", "content": typed(rec, "prompt", "prompt")},
                {"role": "assistant", "content": typed(rec, "response", "response")}]
    msgs = typed(rec, "messages", "messages", list)
    if not msgs:
        raise DataError(f"{where}: field 'messages' is empty")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object")
        typed(m, "role", f"messages[{i}].role")
        typed(m, "content", f"messages[{i}].content")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages[{len(msgs) - 1}].role' is {msgs[-1]['role']!r}: "
                        "the last message must be the assistant's (it is what is trained)")
    return [dict(m) for m in msgs]


# ---- tokenizing ---------------------------------------------------------------------------
def _build(paths, tok, cfg: DataConfig, warnings: list) -> tuple[Dataset, int]:
    kind = cfg.kind if cfg.kind != "auto" else _kind(paths)
    pack = cfg.pack if cfg.pack is not None else kind == "text"
    if kind == "jsonl" and pack:
        raise DataError("data config: pack=True is for text; each JSONL record is one example")
    if cfg.add_eos_between_docs and kind == "text" and tok.eos_id is None and (len(paths) > 1 or not pack):
        raise DataError("the tokenizer has no EOS token: set add_eos_between_docs=False")
    seqs = []  # (token ids, loss mask over ids, where)
    if kind == "jsonl":
        for p in paths:
            for lineno, msgs in _records(p):
                where = f"{p}:{lineno}"
                seqs.append((*_encode_chat(tok, msgs, cfg.mask_prompt, where, warnings), where))
    else:
        docs = []
        window_bos = pack and cfg.bos_each_example and tok.adds_bos
        for p in paths:
            ids = tok.encode(read_text_file(p), add_special_tokens=False)
            ids = ids if window_bos else _with_bos(tok, ids)
            if not ids:
                raise DataError(f"{p}: no tokens")
            docs.append(ids)
        if pack:
            return _pack(docs, cfg.seq_len + 1, tok.eos_id if cfg.add_eos_between_docs else None,
                         paths, tok.bos_id if window_bos else None)
        for p, ids in zip(paths, docs):
            ids = ids + [tok.eos_id] if cfg.add_eos_between_docs else ids
            seqs.append((ids, [1] * len(ids), str(p)))
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id if tok.eos_id is not None else 0
    return _pad(seqs, cfg.seq_len + 1, pad, cfg.truncate, warnings), 0


def _kind(paths) -> str:
    kinds = set()
    for p in paths:
        ext = Path(p).suffix.lower()
        if ext == ".json":
            raise DataError(f"{p}: a .json file: name it .jsonl (one JSON object a line) or set kind")
        kinds.add("jsonl" if ext in (".jsonl", ".ndjson") else "text")
    if len(kinds) > 1:
        raise DataError(f"mixed text and JSONL files {[str(p) for p in paths]}: one kind at a time")
    return kinds.pop()


def _with_bos(tok, ids: list) -> list:
    return [tok.bos_id, *ids] if tok.adds_bos and (not ids or ids[0] != tok.bos_id) else list(ids)


def _pack(docs, n1: int, eos, paths, bos=None) -> tuple[Dataset, int]:
    """Examples of n1 tokens from the documents' stream; with ``bos``, bos + n1 - 1 tokens."""
    parts = []
    for i, ids in enumerate(docs):
        if i and eos is not None:
            parts.append([eos])
        parts.append(ids)
    stream = np.concatenate([np.asarray(p, np.int64) for p in parts])
    c = n1 - (bos is not None)              # stream tokens per example
    n = len(stream) // c
    if n == 0:
        raise DataError(f"{', '.join(map(str, paths))}: {len(stream)} tokens, fewer than "
                        f"{'seq_len' if bos is not None else 'seq_len + 1'} = {c}: not one example")
    x = stream[:n * c].reshape(n, c)
    if bos is not None:
        x = np.concatenate([np.full((n, 1), bos, np.int64), x], axis=1)
    x = x.astype(np.int32)
    return Dataset(x[:, :-1].copy(), x[:, 1:].copy(), np.ones((n, n1 - 1), np.float32)), len(stream) - n * c


def _encode_chat(tok, msgs, mask_prompt: bool, where: str, warnings: list):
    def render(m, gen):
        try:
            return tok.apply_chat_template(m, add_generation_prompt=gen)
        except Exception as e:  # the template's own error, whatever its class
            raise DataError(f"{where}: chat template failed: {e}") from None
    full = render(msgs, False)
    ids = tok.encode(full, add_special_tokens=False)
    if not mask_prompt:
        ids = _with_bos(tok, ids)
        return ids, [1] * len(ids)
    head = render(msgs[:-1], True)
    if not full.startswith(head):
        raise DataError(f"{where}: the chat template renders the prompt with the generation prompt "
                        "differently from the start of the conversation: cannot find the response "
                        "(set mask_prompt=False)")
    a, exact_a = _boundary(tok, full, len(head), ids, straddler=False)
    b, exact_b = _boundary(tok, full, len(full.rstrip()), ids, straddler=True)
    if not (exact_a and exact_b):
        warnings.append(f"{where}: prompt/response boundary falls inside a token; "
                        "masked by character offsets (the straddling token is trained)")
    shift = len(_with_bos(tok, ids)) - len(ids)
    a, b, ids = a + shift, max(a, b) + shift, _with_bos(tok, ids)
    return ids, [0] * a + [1] * (b - a) + [0] * (len(ids) - b)


def _boundary(tok, full: str, c: int, ids: list, straddler: bool) -> tuple[int, bool]:
    """Token index of character boundary ``c`` of ``full`` (tokenized as ``ids``)."""
    pre = tok.encode(full[:c], add_special_tokens=False)
    if ids[:len(pre)] == pre:
        return len(pre), True
    k = 0
    while k < min(len(pre), len(ids)) and pre[k] == ids[k]:
        k += 1
    return min(k + straddler, len(ids)), False


def _pad(seqs, n1: int, pad: int, truncate: str, warnings: list) -> Dataset:
    rows = []
    for ids, mask, where in seqs:
        if len(ids) > n1:
            if truncate == "error":
                raise DataError(f"{where}: {len(ids)} tokens, longer than seq_len + 1 = {n1} "
                                "(raise seq_len or set truncate='truncate')")
            warnings.append(f"{where}: truncated from {len(ids)} to {n1} tokens")
            ids, mask = ids[:n1], mask[:n1]
        if not any(mask[1:]):
            warnings.append(f"{where}: dropped: no trained token (after truncation, if any)")
            continue
        rows.append((ids, mask))
    if not rows:
        raise DataError("no examples left to train on")
    x = np.full((len(rows), n1), pad, np.int32)
    m = np.zeros((len(rows), n1), np.float32)
    for i, (ids, mask) in enumerate(rows):
        x[i, :len(ids)] = ids
        m[i, :len(mask)] = mask
    return Dataset(x[:, :-1].copy(), x[:, 1:].copy(), m[:, 1:].copy())
