"""ResultCache: LRU by entries and bytes, key canonicalisation, counters, thread safety."""

from __future__ import annotations

import threading

import pytest

from llamactl.server.cache import ResultCache

PARAMS = {"max_tokens": 256, "temperature": 0.6, "top_p": 0.9, "do_sample": False}


def test_get_put_and_counters() -> None:
    cache = ResultCache(max_entries=10, max_bytes=1000)
    assert cache.get("a") is None
    cache.put("a", {"answer": 1}, 10)
    assert cache.get("a") == {"answer": 1}
    assert cache.get("b") is None
    assert (cache.hits, cache.misses, cache.len, len(cache), cache.bytes) == (1, 2, 1, 1, 10)


def test_evicts_least_recently_used_by_entry_count() -> None:
    cache = ResultCache(max_entries=2, max_bytes=1000)
    cache.put("a", "A", 1)
    cache.put("b", "B", 1)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 1)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.evictions == 1


def test_evicts_by_bytes_until_it_fits() -> None:
    cache = ResultCache(max_entries=100, max_bytes=100)
    for name in "abcd":
        cache.put(name, name, 30)
    assert cache.bytes == 90 and len(cache) == 3 and "a" not in cache
    cache.put("big", "B", 70)  # needs two evictions: b then c
    assert [k for k in "abcd" if k in cache] == ["d"]
    assert cache.bytes == 100 and "big" in cache


def test_entry_larger_than_max_bytes_is_not_stored_and_evicts_nothing() -> None:
    cache = ResultCache(max_entries=10, max_bytes=100)
    cache.put("small", "s", 50)
    cache.put("huge", "h", 101)
    assert "huge" not in cache and "small" in cache and cache.bytes == 50
    cache.put("exact", "e", 50)  # exactly at the limit is fine
    assert cache.bytes == 100 and len(cache) == 2


def test_replacing_a_key_updates_bytes() -> None:
    cache = ResultCache(max_entries=10, max_bytes=100)
    cache.put("k", "v1", 40)
    cache.put("k", "v2", 10)
    assert cache.get("k") == "v2" and cache.bytes == 10 and len(cache) == 1
    cache.put("k", "v3", 500)  # too large: the stale value must not survive either
    assert cache.get("k") is None and cache.bytes == 0


def test_zero_limits_disable_the_cache() -> None:
    for cache in (ResultCache(0, 1000), ResultCache(10, 0)):
        cache.put("k", "v", 0)
        assert cache.get("k") is None and len(cache) == 0 and cache.misses == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        ResultCache(-1, 10)
    cache = ResultCache(1, 10)
    with pytest.raises(ValueError):
        cache.put("k", None, 1)
    with pytest.raises(ValueError):
        cache.put("k", "v", -1)


def test_clear() -> None:
    cache = ResultCache(5, 100)
    cache.put("a", 1, 5)
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


# --- keys ---------------------------------------------------------------------------------------------------


def test_key_is_sha256_hex_and_stable() -> None:
    k = ResultCache.key(b"img", "What?", PARAMS)
    assert len(k) == 64 and int(k, 16) >= 0
    assert k == ResultCache.key(b"img", "What?", dict(reversed(list(PARAMS.items()))))  # order irrelevant


def test_key_changes_with_every_input() -> None:
    base = ResultCache.key(b"img", "What?", PARAMS)
    variants = [
        ResultCache.key(b"img2", "What?", PARAMS),
        ResultCache.key(b"img", "What? ", PARAMS),
        ResultCache.key(b"img", "What?", {**PARAMS, "max_tokens": 257}),
        ResultCache.key(b"img", "What?", {**PARAMS, "temperature": 0.7}),
        ResultCache.key(b"img", "What?", {**PARAMS, "do_sample": True}),
        ResultCache.key(b"img", "What?", {**PARAMS, "seed": 1}),
        ResultCache.key(b"img", "What?", {k: v for k, v in PARAMS.items() if k != "top_p"}),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_key_has_no_boundary_ambiguity() -> None:
    # Moving bytes between the image and the question must change the key.
    assert ResultCache.key(b"ab", "c", {}) != ResultCache.key(b"a", "bc", {})
    assert ResultCache.key(b"", "x", {"q": "y"}) != ResultCache.key(b"", "x", {"q": "", "y": ""})


def test_key_equal_numbers_are_equal_but_bool_is_not_int() -> None:
    assert ResultCache.key(b"i", "q", {"t": 1}) == ResultCache.key(b"i", "q", {"t": 1.0})
    assert ResultCache.key(b"i", "q", {"f": True}) != ResultCache.key(b"i", "q", {"f": 1})
    assert ResultCache.key(b"i", "q", {"t": float("nan")}) != ResultCache.key(b"i", "q", {"t": "x"})
    assert ResultCache.key(b"i", "q", {"stop": ["a", "b"]}) == ResultCache.key(
        b"i", "q", {"stop": ("a", "b")}
    )


def test_key_rejects_unencodable_params() -> None:
    with pytest.raises(TypeError, match="params.bad"):
        ResultCache.key(b"i", "q", {"bad": object()})


# --- threads ------------------------------------------------------------------------------------------------


def test_concurrent_use_keeps_invariants() -> None:
    cache = ResultCache(max_entries=50, max_bytes=2000)
    errors: list[BaseException] = []
    rounds = 2000

    def worker(seed: int) -> None:
        try:
            for i in range(rounds):
                key = f"k{(i * 7 + seed) % 120}"
                if cache.get(key) is None:
                    cache.put(key, (seed, i), 1 + (i % 90))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.hits + cache.misses == 8 * rounds
    assert len(cache) <= 50 and cache.bytes <= 2000
    # The byte total still equals the sum of what is stored (no lost updates).
    assert cache.bytes == sum(size for _, size in cache._entries.values())
    stored = [k for k in (f"k{i}" for i in range(120)) if k in cache]
    assert len(stored) == len(cache)
