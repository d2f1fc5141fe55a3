"""Device profiles: what a simulated phone is like, read from ``profiles.json`` in the run
directory (standard library only; the phone side reads it too).

A profile file is ``{"seed": int, "profiles": {name: {...}}, "clients": [name, ...]}``
(client i gets ``clients[i % len]``). Fields of a profile (``DeviceProfile``):
``speed`` (seconds on the phone per second measured here), ``memory_budget_mb`` (picks
the bundle variant: ``bundles`` maps a minimum budget to a bundle name, the largest that
fits wins; a sharded bundle takes the budget as its cache limit), ``lora_rank`` (FlexLoRA:
the rank the device can afford, a bundle per rank), ``battery`` ("none" or a trace file
beside the profile file, replayed on the client's simulated clock), ``power_w`` (the
energy model when the trace carries no current/voltage: joules = power × phone seconds),
``up_mbps`` / ``down_mbps`` / ``latency_ms`` (the transfer-time model: latency + 8·bytes /
bandwidth), ``availability`` (probability the device is online in a round), ``dropout``
(probability it drops out mid-round). Draws are a function of (seed, round, client), so
the same seed gives the same run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mobiletune.errors import MobiletuneError

FILE = "profiles.json"


@dataclass(frozen=True)
class DeviceProfile:
    speed: float = 1.0
    memory_budget_mb: float | None = None
    lora_rank: int | None = None
    battery: str = "none"
    power_w: float = 3.0
    up_mbps: float = 10.0
    down_mbps: float = 40.0
    latency_ms: float = 50.0
    availability: float = 1.0
    dropout: float = 0.0
    bundles: dict = field(default_factory=dict)   # {"min memory MB": bundle name}

    def __post_init__(self):
        for name in ("speed", "power_w", "up_mbps", "down_mbps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise MobiletuneError(f"profile: {name}={v!r}: must be a positive number")
        for name in ("availability", "dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise MobiletuneError(f"profile: {name}={v!r}: must be a number in [0, 1]")
        if not isinstance(self.latency_ms, (int, float)) or self.latency_ms < 0:
            raise MobiletuneError(f"profile: latency_ms={self.latency_ms!r}: must be >= 0")

    def transfer_s(self, nbytes: int, up: bool) -> float:
        """Seconds to move ``nbytes`` over this device's link (latency + size / bandwidth)."""
        mbps = self.up_mbps if up else self.down_mbps
        return self.latency_ms / 1000.0 + 8.0 * nbytes / (mbps * 1e6)

    def bundle_for(self, default: str) -> str:
        """The bundle name whose minimum memory fits ``memory_budget_mb`` (else ``default``)."""
        if self.memory_budget_mb is None or not self.bundles:
            return default
        fits = [(float(k), v) for k, v in self.bundles.items()
                if float(k) <= self.memory_budget_mb]
        return max(fits)[1] if fits else min((float(k), v) for k, v in self.bundles.items())[1]

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "DeviceProfile":
        if not isinstance(d, dict):
            raise MobiletuneError(f"{where}: expected a JSON object")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise MobiletuneError(f"{where}: unknown key {unknown[0]!r}")
        try:
            return cls(**d)
        except MobiletuneError as e:
            raise MobiletuneError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Profiles:
    seed: int
    profiles: dict
    clients: list
    path: Path | None = None

    def of(self, client: int) -> DeviceProfile:
        return self.profiles[self.clients[client % len(self.clients)]]

    def name_of(self, client: int) -> str:
        return self.clients[client % len(self.clients)]

    def battery_spec(self, client: int) -> str:
        b = self.of(client).battery
        if b == "none" or self.path is None:
            return b
        return f"trace:{(self.path.parent / b).resolve()}"

    def draw(self, what: str, rnd: int, client: int) -> float:
        """A uniform [0, 1) number fixed by (seed, what, round, client)."""
        h = hashlib.sha256(f"{self.seed}/{what}/{rnd}/{client}".encode()).digest()
        return int.from_bytes(h[:8], "little") / 2.0 ** 64

    def available(self, rnd: int, client: int) -> bool:
        return self.draw("available", rnd, client) < self.of(client).availability

    def drops_out(self, rnd: int, client: int) -> bool:
        return self.draw("dropout", rnd, client) < self.of(client).dropout

    def to_dict(self) -> dict:
        return {"seed": self.seed, "clients": list(self.clients),
                "profiles": {k: asdict(v) for k, v in self.profiles.items()}}


def uniform(seed: int = 0, **fields_) -> Profiles:
    """Every client the same profile (``fields_`` of ``DeviceProfile``)."""
    return Profiles(seed, {"default": DeviceProfile(**fields_)}, ["default"])


def read(path) -> Profiles:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MobiletuneError(f"{p}: cannot read a JSON profile file ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("profiles"), dict) or not d["profiles"]:
        raise MobiletuneError(f"{p}: key 'profiles' must be a non-empty object")
    profs = {k: DeviceProfile.from_dict(v, f"{p}: profiles.{k}") for k, v in d["profiles"].items()}
    clients = d.get("clients", sorted(profs))
    if not isinstance(clients, list) or not clients:
        raise MobiletuneError(f"{p}: key 'clients' must be a non-empty list of profile names")
    for c in clients:
        if c not in profs:
            raise MobiletuneError(f"{p}: clients names profile {c!r}, which is not in 'profiles'")
    seed = d.get("seed", 0)
    if type(seed) is not int:
        raise MobiletuneError(f"{p}: key 'seed' must be an integer, got {seed!r}")
    return Profiles(seed, profs, clients, p)


def write(path, profiles: Profiles) -> Path:
    from mobiletune.io import atomic
    atomic.write_text(path, json.dumps(profiles.to_dict(), indent=1) + "\n")
    return Path(path)
