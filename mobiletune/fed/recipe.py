"""Federated recipes: a short Python file with ``recipe = Recipe(...)`` (what each phone
trains: model, LoRA, optimizer, sequence length, batch; exported to a bundle) and
``fed = FedConfig(...)`` (the federation). ``--set key=value`` sets a ``FedConfig`` field
when it names one and a ``Recipe`` field otherwise (``--set rounds=3 --set lora.r=4``)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from mobiletune.errors import MobiletuneError
from mobiletune.train.recipe import Recipe, apply_overrides, parse_value, run_recipe_file

PARTITIONS = ("shakespeare-roles", "wordnet-dirichlet")


@dataclass(frozen=True)
class FedConfig:
    method: str = "fedavg"              # fedavg | fedprox | fedadam | flexlora | ffa | splitlora
    #                                     (baselines: local-only | centralized)
    clients: int = 8
    rounds: int = 5
    local_steps: int = 10
    partition: str = "shakespeare-roles"
    alpha: float = 0.5                  # wordnet-dirichlet: Dirichlet concentration
    per_client: int = 200               # wordnet-dirichlet: records per client
    mu: float = 0.0                     # FedProx
    optimizer_state: str = "carry"      # carry | reset
    seed: int = 0
    deadline_s: float | None = None     # round deadline in phone seconds
    ranks: tuple[int, ...] = ()         # FlexLoRA: LoRA rank per client (cycled)
    speeds: tuple[float, ...] = (1.0,)  # phone seconds per measured second, per client (cycled)
    dropout: float = 0.0                # probability a client drops out of a round
    sharded: bool = False               # export sharded bundles
    variants: tuple[int, ...] = (1, 2)
    eval_max_examples: int = 64         # global held-out examples the server scores
    mc_items: int = 0                   # WordNet multiple-choice items the server scores
    fraction_evaluate: float = 0.0      # client-side evaluation each round
    eta: float = 0.01                   # FedAdam's server learning rate
    cut: int | None = None              # SplitLoRA: the phone runs layers < cut (None: half)
    split_host: str = "127.0.0.1"       # SplitLoRA: where the server's cut endpoint listens
    split_port: int = 0                 # (0: any free port; the phones get its URL each round)
    split_tls_cert: str | None = None   # SplitLoRA: TLS for the endpoint (certificate, key);
    split_tls_key: str | None = None    # the phones trust that certificate

    def __post_init__(self):
        methods = ("fedavg", "fedprox", "fedadam", "flexlora", "ffa", "splitlora", "local-only",
                   "centralized")
        if self.method not in methods:
            raise MobiletuneError(f"fed.method={self.method!r}: expected one of {', '.join(methods)}")
        if self.partition not in PARTITIONS:
            raise MobiletuneError(f"fed.partition={self.partition!r}: expected one of {PARTITIONS}")
        if self.cut is not None and (type(self.cut) is not int or self.cut < 1):
            raise MobiletuneError(f"fed.cut={self.cut!r}: must be a positive integer (the phone "
                                  f"runs layers 0 … cut-1) or None (half the layers)")
        for k in ("clients", "rounds", "local_steps"):
            if type(getattr(self, k)) is not int or getattr(self, k) < 1:
                raise MobiletuneError(f"fed.{k}={getattr(self, k)!r}: must be a positive integer")


def load(path) -> tuple[Recipe, FedConfig]:
    mod = run_recipe_file(path, "federated recipe")
    r, f = getattr(mod, "recipe", None), getattr(mod, "fed", None)
    if not isinstance(r, Recipe) or not isinstance(f, FedConfig):
        raise MobiletuneError(f"{path}: defines no `recipe = Recipe(...)` and `fed = FedConfig(...)`")
    return r, f


def override(r: Recipe, f: FedConfig, sets: list[str]) -> tuple[Recipe, FedConfig]:
    hints = typing.get_type_hints(FedConfig)
    for s in sets:
        key, eq, value = s.partition("=")
        key = key.strip().removeprefix("fed.")
        if eq and key in hints:
            try:
                f = dataclasses.replace(f, **{key: parse_value(hints[key], value, key)})
            except MobiletuneError as e:
                raise MobiletuneError(f"--set {s}: {e}") from None
        else:
            top = key.split(".")[0]
            if eq and top not in typing.get_type_hints(Recipe):
                raise MobiletuneError(f"--set {key}: unknown key {top!r}; federation keys: "
                                      f"{', '.join(sorted(hints))}; recipe keys: "
                                      f"{', '.join(sorted(typing.get_type_hints(Recipe)))}")
            r = apply_overrides(r, [s])
    return r, f
