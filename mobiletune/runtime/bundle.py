"""The training bundle: the one written contract between the exporter and the phone.

A bundle is a directory::

    manifest.json           this module's ``Manifest`` (JSON, versioned)
    program.tflite          builtin-ops-only LiteRT program with the signatures below
    base.safetensors        frozen base weights (LoRA) — set once through ``set_frozen``
    state.safetensors       initial trainable state (params, optimizer state, counters)
    tokenizer.json, tokenizer_config.json

Every signature reads and writes one shared set of resource variables (the *state*), so
micro-batch variants can be switched at any step. State tensor names are grouped by prefix:
``frozen/<hf name>``, ``trainable/<hf name>``, ``opt/<optax path>``, ``acc/<hf name>``
(summed gradients), ``acc_nll``, ``acc_count`` (accumulated summed NLL and token count).

Signatures (``k`` = a micro-batch variant, ``T`` = ``seq_len``):
  ``train_step_b{k}(inputs, targets, loss_mask) -> loss``        one optimizer step
  ``accumulate_b{k}(inputs, targets, loss_mask) -> nll, count``  add grads to acc/*
  ``apply() -> loss, step``              optimizer on acc/count, then zero acc/*
  ``eval_b{k}(inputs, targets, loss_mask) -> nll, count``        no update
  ``infer(tokens[1,T], last[]) -> logits[V]``                    next-token logits at ``last``
  ``get_state() -> {name: tensor}`` / ``set_state({name: tensor})``  trainable + opt + acc
  ``set_frozen({name: tensor})``         load the base weights (LoRA)
inputs/targets are int32 (k, T); loss_mask float32 (k, T). The loss of an optimizer step is
the summed NLL over counted tokens of the effective batch / their number, as on the desktop.

A *sharded* bundle (``Manifest.sharded`` set; schema 2) has no variables and no frozen
section: its program holds per-block signatures that take the weights as inputs
(``block_fwd_<kind>_b{k}``, ``block_bwd_<kind>_b{k}``, ``norm_fwd/_bwd_b{k}``,
``head_fwd_b{k}``, ``head_wgrad_b{k}``, ``opt_decay`` / ``opt_nodecay``; see
``mobiletune.programs.sharded``), the base weights are in ``weights.safetensors`` (float32 or float16,
memory-mapped by the phone), and ``state`` names ``trainable/…``, ``acc/…``,
``opt/<group>/<leaf>`` (flattened per optimizer group), ``acc_nll``, ``acc_count``. The
``sharded`` section gives the layers (HF prefix, block kind, attention inputs), the kinds'
frozen and trainable tensor names, the embedding / norm / head names, the vocabulary and
optimizer chunk sizes, the optimizer groups and their state leaves, and ``clip_norm``.

Scalars never cross a signature boundary as 0-d tensors (schema 3). A scalar input
(``infer``'s ``last``, the optimizer step ``count``, ``acc_nll``/``acc_count`` in
``set_state``, the sharded block's ``rope_theta``/``rope_factor``/``window``) is declared
with shape ``(1,)`` in the program and reshaped to ``()`` inside it; the state itself keeps
its logical shapes (``state`` specs, ``state.safetensors`` and checkpoints hold 0-d
tensors), and the runner widens a 0-d value to ``(1,)`` when it calls a signature. Why:
every call through LiteRT's Python ``SignatureRunner`` resizes each input to the given
array's shape, and ai-edge-litert 2.3.0's aarch64 build of
``InterpreterWrapper::ResizeInputTensor`` fills a 0-length shape vector with
``memset(p + 4, 0, 4·n - 4)``, i.e. ~2^64 bytes for n = 0: a segfault on every arm64 phone,
while the x86-64 build happens to tolerate it. A contract that holds on one architecture's
build only is no contract, so no shape in it is 0-d at a boundary
(``signature_shape``), the manifest is refused if one is (``Manifest.from_dict``), and the
runner refuses a program that declares one. Bundles of schema 1 and 2 had 0-d inputs: they
are refused with the command that re-exports them.

This module imports only the standard library (it runs on the phone and in the exporter).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mobiletune.errors import MobiletuneError

SCHEMA_VERSION = 3    # 2: the optional ``sharded`` section; 3: no 0-d signature inputs
OLDEST_SCHEMA = 3     # 1 and 2 pass scalars as 0-d inputs, which crash LiteRT on arm64
REEXPORT = "mobiletune export RECIPE.py --out BUNDLE [--sharded]"
FORMAT = "mobiletune-training-bundle"
MANIFEST = "manifest.json"
PROGRAM = "program.tflite"
BASE = "base.safetensors"
STATE = "state.safetensors"


class BundleError(MobiletuneError):
    """A bundle that is incomplete, corrupt, from a newer schema, or not for this use."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str            # numpy dtype name: float32, int32

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        return cls(d["name"], tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
                   tuple(TensorSpec.from_dict(x) for x in d["outputs"]))


@dataclass(frozen=True)
class Manifest:
    model: dict                      # ModelConfig.to_dict()
    lora: dict | None                # LoraConfig.to_dict() (resolved), None: full FT
    optim: dict                      # OptimConfig.to_dict()
    data: dict                       # DataConfig.to_dict(): seq_len, seed, masking ...
    recipe: dict                     # the whole resolved recipe
    seq_len: int
    variants: tuple[int, ...]        # micro-batch sizes with train/accumulate/eval signatures
    effective_batch: int             # examples per optimizer step
    state: tuple[TensorSpec, ...]    # everything get_state returns / set_state takes
    frozen: tuple[TensorSpec, ...]   # what set_frozen takes
    signatures: tuple[Signature, ...]
    files: dict                      # role -> {"path", "sha256", "bytes"}
    tokenizer: dict                  # bos_id, eos_id, pad_id, adds_bos
    tools: dict                      # versions of what made it
    sharded: dict | None = None      # sharded bundles: layout (see below); None: monolithic
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def signature(self, name: str) -> Signature:
        for s in self.signatures:
            if s.name == name:
                return s
        raise BundleError(f"manifest has no signature {name!r}; it has: "
                          f"{', '.join(s.name for s in self.signatures)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        if d.get("format") != FORMAT:
            raise BundleError(f"{source}: not a mobiletune training bundle (format "
                              f"{d.get('format')!r})")
        v = d.get("schema_version")
        if not isinstance(v, int) or v > SCHEMA_VERSION:
            raise BundleError(f"{source}: schema_version {v!r} is newer than this mobiletune "
                              f"understands ({SCHEMA_VERSION}); upgrade mobiletune on this device")
        if v < 1:
            raise BundleError(f"{source}: invalid schema_version {v!r}")
        if v < OLDEST_SCHEMA:
            raise BundleError(f"{source}: schema_version {v} bundles pass scalars as 0-d signature "
                              f"inputs, which crash ai-edge-litert 2.3.0 on arm64 (every phone); "
                              f"re-export it with this mobiletune: {REEXPORT}")
        try:
            m = cls(
                model=d["model"], lora=d["lora"], optim=d["optim"], data=d["data"],
                recipe=d["recipe"], seq_len=int(d["seq_len"]), variants=tuple(d["variants"]),
                effective_batch=int(d["effective_batch"]),
                state=tuple(TensorSpec.from_dict(x) for x in d["state"]),
                frozen=tuple(TensorSpec.from_dict(x) for x in d["frozen"]),
                signatures=tuple(Signature.from_dict(x) for x in d["signatures"]),
                files=d["files"], tokenizer=d["tokenizer"], tools=d["tools"],
                sharded=d.get("sharded"), schema_version=v, format=d["format"],
                extra=d.get("extra", {}))
        except KeyError as e:
            raise BundleError(f"{source}: missing key {e.args[0]!r}") from None
        m.check_no_scalar_inputs(source)
        return m

    def check_no_scalar_inputs(self, source: str = "manifest") -> None:
        for sig in self.signatures:
            for s in sig.inputs:
                if tuple(s.shape) == ():
                    raise BundleError(f"{source}: signature {sig.name!r} input {s.name!r} is 0-d; "
                                      f"scalars must travel as shape (1,) (see the bundle "
                                      f"contract); re-export: {REEXPORT}")


def signature_shape(shape) -> tuple[int, ...]:
    """The shape a tensor of logical ``shape`` has at a signature boundary: a scalar
    travels as ``(1,)`` (see the module docstring), anything else as it is."""
    return tuple(shape) or (1,)


def input_name(name: str) -> str:
    """The signature input name of a state tensor (TF input names cannot contain '/')."""
    return name.replace("/", "__")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(bundle_dir: Path, name: str) -> dict:
    p = Path(bundle_dir) / name
    return {"path": name, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def train_signatures(k: int) -> tuple[str, str, str]:
    return f"train_step_b{k}", f"accumulate_b{k}", f"eval_b{k}"


def read_manifest(bundle_dir: str | Path) -> Manifest:
    d = Path(bundle_dir)
    p = d / MANIFEST
    if not d.is_dir():
        raise BundleError(f"{d}: no such bundle directory")
    if not p.is_file():
        raise BundleError(f"{d}: no {MANIFEST} (not a training bundle)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{p}: not valid JSON ({e})") from None
    return Manifest.from_dict(raw, str(p))


def verify_files(bundle_dir: str | Path, m: Manifest) -> None:
    """Every file the manifest names exists with its recorded size and sha256."""
    d = Path(bundle_dir)
    for role, e in m.files.items():
        p = d / e["path"]
        if not p.is_file():
            raise BundleError(f"{p}: missing ({role} file of the bundle)")
        size = p.stat().st_size
        if size != e["bytes"]:
            raise BundleError(f"{p}: {size} bytes, the manifest says {e['bytes']} "
                              f"(truncated or replaced {role} file)")
        if sha256_file(p) != e["sha256"]:
            raise BundleError(f"{p}: sha256 does not match the manifest ({role} file changed)")
