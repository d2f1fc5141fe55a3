"""Recipes: a short Python file that builds ``recipe = Recipe(...)``.

A recipe is plain frozen data (nested dataclasses), so it can be printed, written to JSON
next to every run and bundle, and overridden from the command line:
``--set steps=200 --set optim.lr=3e-4 --set lora.r=16 --set data=a.txt,b.txt``.
Values are parsed by the field's declared type; an unknown key or a value of the wrong type
is an error that names it. The file is imported as a module (no exec into globals).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mobiletune.errors import MobiletuneError
from mobiletune.models.lora import LoraConfig
from mobiletune.runtime.energy.scheduler import Thresholds
from mobiletune.runtime.side.config import SideConfig
from mobiletune.train.optim import OptimConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str                            # HF dir, .gguf, asset name, or "preset:<name>" (random init)
    data: tuple[str, ...]                 # training files or text asset specs
    val_data: tuple[str, ...] = ()        # validation files; empty: hold out val_fraction
    val_fraction: float = 0.05
    seq_len: int = 128
    micro_batch: int = 4
    accumulation: int = 1                 # effective batch = micro_batch * accumulation
    steps: int = 100                      # optimizer steps
    seed: int = 0
    lora: LoraConfig | None = field(default_factory=LoraConfig)   # None: full fine-tuning
    optim: OptimConfig = field(default_factory=OptimConfig)
    mask_prompt: bool = True              # JSONL: train on the response only
    truncate: str = "error"               # JSONL records longer than seq_len: error | truncate
    bos_each_example: bool = False        # packed text: every example starts with BOS (Gemma)
    eval_every: int = 50                  # validation every N steps (0: only at the end)
    eval_batches: int = 8                 # validation batches of micro_batch examples
    checkpoint_every: int = 50
    loss_chunk: int = 64                  # positions per chunk of the chunked cross-entropy
    save_merged: bool = True              # LoRA: also write the merged HF checkpoint
    thresholds: Thresholds = field(default_factory=Thresholds)  # the phone's energy scheduler
    side: SideConfig | None = None        # server-assisted side-tuning (None: not used)

    def __post_init__(self):
        for k in ("seq_len", "micro_batch", "accumulation", "steps", "loss_chunk"):
            if getattr(self, k) <= 0:
                raise MobiletuneError(f"{k}={getattr(self, k)}: must be positive")
        if isinstance(self.data, str):
            object.__setattr__(self, "data", (self.data,))
        if isinstance(self.val_data, str):
            object.__setattr__(self, "val_data", (self.val_data,) if self.val_data else ())
        if not self.data:
            raise MobiletuneError("data: at least one training file is needed")

    @property
    def batch_size(self) -> int:
        return self.micro_batch * self.accumulation

    def optim_config(self) -> OptimConfig:
        """The optimizer with its schedule's horizon set to the recipe's ``steps``."""
        return dataclasses.replace(self.optim, total_steps=self.steps)

    def data_config(self):
        """The shared data pipeline's settings (desktop and phone build the same batches)."""
        from mobiletune.runtime.data import DataConfig
        return DataConfig(seq_len=self.seq_len, seed=self.seed,
                          val_fraction=0.0 if self.val_data else self.val_fraction,
                          mask_prompt=self.mask_prompt, truncate=self.truncate,
                          bos_each_example=self.bos_each_example)

    def to_dict(self) -> dict:
        return _to_jsonable(dataclasses.asdict(self))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _to_jsonable(x):
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def run_recipe_file(path: str | Path, what: str = "recipe"):
    """The module a recipe file defines (run once); a recipe's own errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MobiletuneError(f"{path}: no such {what} file")
    spec = importlib.util.spec_from_file_location(f"_mobiletune_recipe_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except MobiletuneError as e:
        raise MobiletuneError(f"{path}: {e}") from None
    return mod


def load_recipe(path: str | Path) -> Recipe:
    r = getattr(run_recipe_file(path), "recipe", None)
    if not isinstance(r, Recipe):
        raise MobiletuneError(f"{path}: defines no `recipe = Recipe(...)`")
    return r


def apply_overrides(r: Recipe, sets: list[str]) -> Recipe:
    """Apply ``key=value`` overrides (nested keys dotted) by the fields' declared types."""
    for s in sets:
        if "=" not in s:
            raise MobiletuneError(f"--set {s!r}: expected key=value")
        key, value = s.split("=", 1)
        r = _set(r, key.strip().split("."), value, key)
    return r


def _set(obj, path: list[str], value: str, full: str):
    hints = typing.get_type_hints(type(obj))
    name = path[0]
    if name not in hints:
        raise MobiletuneError(f"--set {full}: unknown key {name!r}; valid: "
                              f"{', '.join(sorted(hints))}")
    tp = hints[name]
    if len(path) > 1:
        sub = getattr(obj, name)
        if sub is None:  # e.g. lora=None (full fine-tuning) then --set lora.r=8
            sub = _dataclass_in(tp)()
        if not dataclasses.is_dataclass(sub):
            raise MobiletuneError(f"--set {full}: {name!r} has no sub-keys")
        new = _set(sub, path[1:], value, full)
    else:
        new = parse_value(tp, value, full)
    try:
        return dataclasses.replace(obj, **{name: new})
    except MobiletuneError as e:
        raise MobiletuneError(f"--set {full}: {e}") from None


def _dataclass_in(tp):
    for a in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(a):
            return a
    raise MobiletuneError(f"no dataclass in {tp}")


def parse_value(tp, value: str, key: str):
    """Parse a command-line string as type ``tp`` (int, float, bool, str, tuples of those,
    Optional[...], a LoRA/optim section set to 'none')."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        if str in args and any(typing.get_origin(a) is tuple for a in args):
            # LoRA target_modules: "a,b" or a plain name -> a list (exact-or-suffix match);
            # anything else ("all-linear", ".*q_proj") -> a string (a regex, as in PEFT)
            if "," in value or re.fullmatch(r"[\w.]+", value):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return value
        errors = []
        for a in args:
            if a is type(None) or dataclasses.is_dataclass(a):
                continue
            try:
                return parse_value(a, value, key)
            except MobiletuneError as e:
                errors.append(str(e))
        raise MobiletuneError(errors[0] if errors else f"--set {key}={value!r}: not a valid value")
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(parse_value(args[0], v, key) for v in items)
    try:
        if tp is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return value
    except ValueError:
        raise MobiletuneError(f"--set {key}={value!r}: expected {tp.__name__}") from None
    raise MobiletuneError(f"--set {key}: cannot set a value of type {tp}")
