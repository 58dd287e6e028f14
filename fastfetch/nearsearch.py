"""Is any stored 64-bit code within ``radius`` bits of this one? (``--dedup near``'s question.)

Comparing a query with every stored code costs ~1.8 ms per query at a million codes and grows
with the index; ``HammingIndex`` answers the same question exactly in a small fraction of that by
multi-index hashing (Norouzi et al., 2012): the 64 bits are cut into four 16-bit substrings, and
two codes within ``radius`` bits agree within ``radius // 4`` bits on at least one of them
(pigeonhole). Each substring has a table of the codes sorted by its value; a query looks up the
16-bit values within ``radius // 4`` of its own in each table (137 of them for radius 10) and
compares only the codes found there. Codes added since the tables were built sit in a small
array compared in full, folded into the tables once it is large. numpy does the work; FAISS's
binary indexes do this too, but would add a large native dependency to every fetch for one
lookup. ``tests/test_dedup.py`` checks the answers against the exhaustive comparison.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

SUBSTRINGS, BITS = 4, 16
BUCKETS = 1 << BITS
FOLD_AT = 1 << 16  # codes compared in full before they are folded into the tables


def _masks(radius: int) -> Any:
    """Every 16-bit value with at most ``radius`` bits set."""
    values = [0] + [sum(1 << b for b in bits) for r in range(1, radius + 1) for bits in combinations(range(BITS), r)]
    return np.array(values, dtype=np.int64)


class HammingIndex:
    """64-bit codes (added, never removed) and the question whether any is near a query."""

    def __init__(self, radius: int) -> None:
        self.radius = radius
        self._masks = _masks(radius // SUBSTRINGS)
        self._tabled = np.empty(0, dtype=np.uint64)  # the codes in the tables
        self._order = np.empty(0, dtype=np.uint32)  # per substring: positions in _tabled, sorted by its value
        self._starts = np.zeros(SUBSTRINGS * (BUCKETS + 1), dtype=np.int64)  # per substring and value: where in _order
        self._recent = np.empty(1024, dtype=np.uint64)  # codes not in the tables yet
        self._recent_n = 0

    def __len__(self) -> int:
        return len(self._tabled) + self._recent_n

    def add(self, codes: Any) -> None:
        codes = np.asarray(codes, dtype=np.uint64).ravel()
        need = self._recent_n + len(codes)
        if need > len(self._recent):
            grown = np.empty(max(need, 2 * len(self._recent)), dtype=np.uint64)
            grown[: self._recent_n] = self._recent[: self._recent_n]
            self._recent = grown
        self._recent[self._recent_n : need] = codes
        self._recent_n = need

    def settle(self) -> None:
        """Fold the recent codes into the tables if there are many (searching does it too)."""
        if self._recent_n >= FOLD_AT:
            self._fold()

    def near(self, code: int) -> bool:
        """Whether a stored code is within ``radius`` bits of ``code``."""
        return len(self.within(code)) > 0

    def within(self, code: int) -> Any:
        """The stored codes within ``radius`` bits of ``code``: their places in the order added
        (a place may repeat: a code can be found through more than one substring)."""
        self.settle()  # folded when asked, so that loading in chunks folds once
        q = np.uint64(code)
        recent = self._recent[: self._recent_n]
        hits = [np.flatnonzero(np.bitwise_count(recent ^ q) <= self.radius) + len(self._tabled)]
        if len(self._tabled):
            subs = np.array([(code >> (BITS * j)) & (BUCKETS - 1) for j in range(SUBSTRINGS)], dtype=np.int64)
            buckets = ((subs[:, None] ^ self._masks[None, :]) + (np.arange(SUBSTRINGS) * (BUCKETS + 1))[:, None]).ravel()
            lo, hi = self._starts[buckets], self._starts[buckets + 1]
            sizes = hi - lo
            total = int(sizes.sum())
            if total:
                # the concatenation of the ranges lo[i]:hi[i], without a Python loop
                found = self._order[np.repeat(lo - (np.cumsum(sizes) - sizes), sizes) + np.arange(total)]
                hits.insert(0, found[np.bitwise_count(self._tabled[found] ^ q) <= self.radius].astype(np.int64))
        return np.concatenate(hits)

    def _fold(self) -> None:
        """Rebuild the tables over every code (a sort per substring, radix: linear)."""
        codes = np.concatenate([self._tabled, self._recent[: self._recent_n]])
        n = len(codes)
        orders = []
        for j in range(SUBSTRINGS):
            sub = ((codes >> np.uint64(BITS * j)) & np.uint64(BUCKETS - 1)).astype(np.uint16)
            orders.append(np.argsort(sub, kind="stable").astype(np.uint32))
            first = j * (BUCKETS + 1)
            self._starts[first] = j * n
            self._starts[first + 1 : first + BUCKETS + 1] = j * n + np.cumsum(np.bincount(sub, minlength=BUCKETS))
        self._tabled, self._order = codes, np.concatenate(orders)
        self._recent_n = 0
