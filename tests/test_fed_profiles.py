"""Device profiles: the link model, memory budget -> bundle, seeded draws (the same seed
gives the same availability and dropouts), and bad profile files refused with one line
naming the file and key."""

import json

import pytest

from mobiletune.errors import MobiletuneError
from mobiletune.fed import profiles as P


def test_link_model_and_bundle_choice():
    p = P.DeviceProfile(up_mbps=8.0, down_mbps=80.0, latency_ms=100.0, memory_budget_mb=700,
                        bundles={"0": "sharded-small", "600": "sharded", "2500": "mono"})
    assert p.transfer_s(1_000_000, up=True) == pytest.approx(0.1 + 1.0)
    assert p.transfer_s(1_000_000, up=False) == pytest.approx(0.1 + 0.1)
    assert p.bundle_for("x") == "sharded"
    assert P.DeviceProfile(memory_budget_mb=3000, bundles=p.bundles).bundle_for("x") == "mono"
    assert P.DeviceProfile().bundle_for("default") == "default"


def test_draws_are_a_function_of_the_seed():
    a = P.Profiles(5, {"d": P.DeviceProfile(dropout=0.5, availability=0.5)}, ["d"])
    b = P.Profiles(5, {"d": P.DeviceProfile(dropout=0.5, availability=0.5)}, ["d"])
    c = P.Profiles(6, {"d": P.DeviceProfile(dropout=0.5, availability=0.5)}, ["d"])
    grid = [(r, k) for r in range(1, 20) for k in range(8)]
    da = [(a.drops_out(r, k), a.available(r, k)) for r, k in grid]
    assert da == [(b.drops_out(r, k), b.available(r, k)) for r, k in grid]
    assert da != [(c.drops_out(r, k), c.available(r, k)) for r, k in grid]
    assert 0.35 < sum(x for x, _ in da) / len(da) < 0.65


@pytest.mark.parametrize("doc, says", [
    ({"profiles": {}}, "key 'profiles' must be a non-empty object"),
    ({"profiles": {"a": {"speed": 0}}}, "profiles.a: profile: speed=0"),
    ({"profiles": {"a": {"sped": 1}}}, "profiles.a: unknown key 'sped'"),
    ({"profiles": {"a": {}}, "clients": ["b"]}, "profile 'b'"),
    ({"profiles": {"a": {"dropout": 2}}}, "dropout=2"),
])
def test_bad_profile_files_are_refused_by_key(tmp_path, doc, says):
    f = tmp_path / "profiles.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(MobiletuneError, match=str(f)) as e:
        P.read(f)
    assert says in str(e.value)
