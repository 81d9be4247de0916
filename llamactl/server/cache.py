"""An in-process LRU cache of inference results, bounded by entry count and by bytes; thread-safe.

The server consults it only for deterministic requests (greedy decoding) unless configured otherwise; the key
covers everything that can change an answer: the image bytes, the question and the generation parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping

_KEY_VERSION = b"llamactl-result-cache-v1\x00"


def _canonical(value: object, where: str) -> object:
    """A JSON-ready value in which equal parameters encode equally (1 == 1.0, key order irrelevant)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return repr(value)  # JSON has no NaN/inf; a string keeps them distinct from every number
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cache key parameter {where}: mapping keys must be strings")
        return {k: _canonical(v, f"{where}.{k}") for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"cache key parameter {where}: unsupported type {type(value).__name__}")


class ResultCache:
    """LRU of ``key -> value`` holding at most ``max_entries`` entries and ``max_bytes`` (sizes as declared).

    A limit of 0 disables the cache (every ``get`` misses, ``put`` stores nothing). A value larger than
    ``max_bytes`` is not stored.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache limits must not be negative")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @staticmethod
    def key(image_bytes: bytes, question: str, params: Mapping[str, object]) -> str:
        """sha256 hex over the image digest, the question and the canonical JSON of the parameters."""
        payload = json.dumps(
            [question, _canonical(params, "params")],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        digest = hashlib.sha256(_KEY_VERSION)
        digest.update(hashlib.sha256(image_bytes).digest())  # fixed length: no ambiguity with what follows
        digest.update(payload)
        return digest.hexdigest()

    def get(self, key: str) -> object | None:
        """The cached value (now most recently used), or None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: str, value: object, size_bytes: int) -> None:
        """Store (or replace) ``key``; evicts least recently used entries to stay within both limits."""
        if value is None:
            raise ValueError("None cannot be cached: get() uses it for a miss")
        if size_bytes < 0:
            raise ValueError("size_bytes must not be negative")
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if self.max_entries == 0 or self.max_bytes == 0 or size_bytes > self.max_bytes:
                return  # too large to keep (any stale value for the key is gone too)
            self._entries[key] = (value, size_bytes)
            self._bytes += size_bytes
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self._bytes -= evicted_size
                self._evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    @property
    def evictions(self) -> int:
        return self._evictions

    @property
    def len(self) -> int:
        """Number of entries (also ``len(cache)``)."""
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Sum of the declared sizes of the stored entries."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency or counters."""
        with self._lock:
            return key in self._entries
