"""``SideConfig``: the recipe's ``side=`` section — how the side network is shaped and what
the phone sends. Standard library only (the phone reads it from the bundle's manifest).

The side network (``mobiletune.models.side``) is a ladder beside the frozen backbone, built
from the family's own block on a reduced config: ``reduction`` r divides the head width
(side width = heads × head_dim // r) and the FFN width. It reads the backbone's hidden state
after each tapped layer, and its output is added to the backbone's final-normed last hidden
state, just before the head, through a zero-initialised projection — so at
initialisation the model is exactly the backbone (as LoRA's B = 0).

With ``cut`` = c set, the side network is instead a copy of the backbone's top layers
c … L-1 on the server with a LoRA adapter (``rank``, ``alpha``, ``targets``; B = 0 at
init, so again exactly the backbone): the phone runs layers 0 … c-1 forward only and
sends their output h_c; the server trains the adapter through its copy of the top layers,
the final norm and the head. For generation the phone runs its top layers with the adapter
folded in. The ladder leaves every backbone layer as it is and misses on-device LoRA's
quality by ~12 % on Shakespeare; the top-layer copy reaches it (README, "Measured").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mobiletune.errors import MobiletuneError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
WIDTHS = ("full", "pooled")


@dataclass(frozen=True)
class SideConfig:
    reduction: int = 8                   # r: side head_dim = head_dim // r, FFN = I // r
    every: int = 1                       # tap the output of every `every`-th layer ...
    layers: tuple[int, ...] | None = None  # ... or exactly these layers (0-based)
    precision: str = "int8"              # on the link: fp32 | fp16 | int8 | int4 (per token)
    last_precision: str = "fp32"         # the last hidden state's: the loss reads it directly
    # (Gemma 3's int8 copy costs +0.49 nats/token at step 0, and fp16 overflows on it)
    width: str = "full"                  # full | pooled (the phone averages groups of r channels)
    window: int = 4                      # micro-batches in flight between phone and server
    cut: int | None = None               # None: the ladder; c: LoRA on a server copy of layers c…L-1
    rank: int = 8                        # cut only: the LoRA adapter's r, alpha and target
    alpha: float = 16.0                  # modules (None: the family's PEFT defaults)
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("layers", "targets"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, ok, what in (
                ("reduction", type(self.reduction) is int and self.reduction >= 1, "an integer >= 1"),
                ("every", type(self.every) is int and self.every >= 1, "an integer >= 1"),
                ("layers", self.layers is None or (len(self.layers) > 0 and all(
                    type(i) is int and i >= 0 for i in self.layers)), "null or layer indices"),
                ("precision", self.precision in PRECISIONS, " | ".join(PRECISIONS)),
                ("last_precision", self.last_precision in PRECISIONS, " | ".join(PRECISIONS)),
                ("width", self.width in WIDTHS, " | ".join(WIDTHS)),
                ("window", type(self.window) is int and self.window >= 1, "an integer >= 1"),
                ("cut", self.cut is None or (type(self.cut) is int and self.cut >= 1),
                 "null or a layer index >= 1"),
                ("rank", type(self.rank) is int and self.rank >= 1, "an integer >= 1"),
                ("alpha", isinstance(self.alpha, (int, float)) and self.alpha > 0, "positive"),
                ("targets", self.targets is None or (len(self.targets) > 0 and all(
                    isinstance(t, str) for t in self.targets)), "null or module names")):
            if not ok:
                raise MobiletuneError(f"side.{name}={getattr(self, name)!r}: must be {what}")

    def tapped(self, num_layers: int) -> tuple[int, ...]:
        """The layers whose output the phone sends (the last layer's output always goes,
        at full width, as the base of the side network's sum; with ``cut``, h_cut alone)."""
        if self.cut is not None:
            if self.cut >= num_layers:
                raise MobiletuneError(f"side.cut={self.cut}: need 1 <= cut < {num_layers} "
                                      f"(the model's layers)")
            return ()
        got = tuple(sorted(set(self.layers))) if self.layers is not None else tuple(
            range(self.every - 1, num_layers - 1, self.every))
        bad = [i for i in got if i >= num_layers - 1]
        if bad or not got:
            raise MobiletuneError(f"side.layers={list(got)}: need taps among layers 0..{num_layers - 2} "
                                  f"(the last layer's output is sent anyway)")
        return got

    def tap_width(self, hidden: int) -> int:
        if self.width == "full":
            return hidden
        if hidden % self.reduction:
            raise MobiletuneError(f"side.width='pooled': hidden size {hidden} is not a multiple of "
                                  f"side.reduction={self.reduction}")
        return hidden // self.reduction

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("layers", "targets"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SideConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise MobiletuneError(f"side: unknown key(s) {unknown}")
        return cls(**d)
