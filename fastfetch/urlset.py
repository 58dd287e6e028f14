"""Which URLs of a list were already seen: first-occurrence dedup over a whole list.

A list of billions of rows cannot keep its URLs in a Python set (~100 bytes a URL). Each URL
is reduced to a 128-bit hash (xxh3-128; a false "seen" is as likely as two of 10^19 URLs
colliding), and the hashes are kept in sorted numpy runs merged like a log-structured tree:
16 bytes a URL, a batch checked with one binary search per run. No library offers this
(pyarrow's hashing kernels are not public, and a disk key-value store is 10× slower).
"""

from __future__ import annotations

import numpy as np
import xxhash


def url_hashes(urls: list[str]) -> np.ndarray:
    """(n, 2) uint64: the xxh3-128 of each URL (UTF-8, with surrogates escaped)."""
    digest = xxhash.xxh3_128_digest
    joined = b"".join(digest(u.encode("utf-8", "surrogatepass")) for u in urls)
    return np.frombuffer(joined, dtype="<u8").reshape(-1, 2)


class SeenUrls:
    """A growing set of URL hashes; ``first_seen`` marks which of a batch are new."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (hi, lo) sorted by (hi, lo)

    def __len__(self) -> int:
        return sum(len(hi) for hi, _ in self._runs)

    def first_seen(self, urls: list[str]) -> np.ndarray:
        """Boolean mask over ``urls``: True where a URL appears for the first time (in this
        batch and in every batch before it); the new URLs are added."""
        n = len(urls)
        if n == 0:
            return np.zeros(0, dtype=bool)
        h = url_hashes(urls)
        hi, lo = h[:, 1].copy(), h[:, 0].copy()
        order = np.lexsort((lo, hi))  # stable: among equal hashes the earliest row comes first
        shi, slo = hi[order], lo[order]
        first = np.ones(n, dtype=bool)
        first[1:] = (shi[1:] != shi[:-1]) | (slo[1:] != slo[:-1])
        for rhi, rlo in self._runs:
            first &= ~_contains(rhi, rlo, shi, slo)
        fresh = np.zeros(n, dtype=bool)
        fresh[order[first]] = True
        self._add(shi[first], slo[first])
        return fresh

    def _add(self, hi: np.ndarray, lo: np.ndarray) -> None:
        if not len(hi):
            return
        self._runs.append((hi, lo))
        # merge runs of similar size (a binary counter): log2(n) runs, amortised n log n work
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (h1, l1), (h2, l2) = self._runs.pop(), self._runs.pop()
            hi, lo = np.concatenate([h2, h1]), np.concatenate([l2, l1])
            order = np.lexsort((lo, hi))
            self._runs.append((hi[order], lo[order]))


def _contains(rhi: np.ndarray, rlo: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Which (hi, lo) pairs are in the sorted run (rhi, rlo)."""
    start = np.searchsorted(rhi, hi, side="left")
    end = np.searchsorted(rhi, hi, side="right")
    found = np.zeros(len(hi), dtype=bool)
    single = end - start == 1
    found[single] = rlo[start[single]] == lo[single]
    for i in np.flatnonzero(end - start > 1):  # equal high words: rare beyond belief, checked one by one
        found[i] = bool(np.any(rlo[start[i]:end[i]] == lo[i]))
    return found
