"""The streamed state store of sharded bundles (``runtime.sharded.state_store``): which
store the rule picks, that released pages leave the resident set with their contents
kept, and that a safetensors file streams into the store and back out unchanged."""

import numpy as np
import pytest

from mobiletune.errors import MobiletuneError
from mobiletune.io import safetensors as st
from mobiletune.runtime.sharded import state_store as S

MB = 2**20


def test_the_rule_streams_large_states_and_keeps_small_ones_in_ram(tmp_path):
    assert not S.choose(4 * MB, directory=tmp_path)                     # LoRA
    assert S.choose(2200 * MB, directory=tmp_path)                      # SmolLM2 full FT
    assert not S.choose(2200 * MB)                                      # no run directory
    assert S.choose(300 * MB, memory_budget_mb=500, directory=tmp_path)
    assert not S.choose(300 * MB, memory_budget_mb=4000, directory=tmp_path)
    assert S.choose(1, "disk", directory=tmp_path)
    assert not S.choose(2200 * MB, "ram", directory=tmp_path)
    with pytest.raises(MobiletuneError, match="needs a run directory"):
        S.choose(1, "disk")
    with pytest.raises(MobiletuneError, match="'tape'"):
        S.choose(1, "tape", directory=tmp_path)


def mapping_rss_mb(arr) -> float:
    """Resident MB of the memory mapping holding ``arr`` (/proc/self/smaps): the store's
    own pages, whatever else the test process allocates or frees meanwhile."""
    addr, lines, hit = arr.__array_interface__["data"][0], open("/proc/self/smaps").read().splitlines(), False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            hit = lo <= addr < hi
        elif hit and line.startswith("Rss:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no mapping holds the array")


def test_released_pages_leave_the_resident_set_and_keep_their_contents(tmp_path):
    n = 64 * MB // 4
    store = S.FileStore(tmp_path, S.nbytes([((n,), np.float32)] * 2))
    a, b = store.alloc((n,), np.float32), store.alloc((n,), np.float32)
    assert not (tmp_path / S.FILE).exists()             # unlinked once mapped
    assert mapping_rss_mb(a) < 1
    a[:] = np.arange(n, dtype=np.float32)
    b[:] = 2
    assert mapping_rss_mb(a) > 120                      # both 64 MB vectors resident
    store.release(a, b[: n // 2])
    assert 30 < mapping_rss_mb(a) < 34                  # b's second half only
    np.testing.assert_array_equal(a[-3:], np.arange(n - 3, n, dtype=np.float32))
    assert float(b.sum(dtype=np.float64)) == 2.0 * n
    store.release(np.zeros(3))                          # not the store's: nothing happens


def test_a_state_file_streams_into_the_store_and_back(tmp_path):
    rng = np.random.default_rng(0)
    src = {"a": rng.standard_normal((5, 7)).astype(np.float32), "n": np.int32(3)}
    st.save(tmp_path / "s.safetensors", src)
    store = S.FileStore(tmp_path, S.nbytes([((5, 7), np.float32), ((), np.int32)]))
    out = {"a": store.alloc((5, 7), np.float32), "n": store.alloc((), np.int32)}
    seen = []
    st.read_into(tmp_path / "s.safetensors", out, after=seen.append)
    assert [id(x) for x in seen] == [id(out["a"]), id(out["n"])]
    np.testing.assert_array_equal(out["a"], src["a"])
    st.save(tmp_path / "t.safetensors", out, after=store.release)
    assert (tmp_path / "t.safetensors").read_bytes() == (tmp_path / "s.safetensors").read_bytes()
    with pytest.raises(st.SafetensorsError, match="'a' is F32\\[5, 7\\], expected float32\\[7, 5\\]"):
        st.read_into(tmp_path / "s.safetensors", {"a": np.zeros((7, 5), np.float32)})
