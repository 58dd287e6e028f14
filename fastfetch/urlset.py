"""Which URLs of a list were already seen: first-occurrence dedup over a whole list.

A list of billions of rows cannot keep its URLs in a Python set (~100 bytes a URL). Each URL
is reduced to a 128-bit hash (xxh3-128: a false "seen" is as likely as two of 10^19 URLs
colliding), and the hashes are kept in numpy runs sorted by their high 64 bits and merged like
a log-structured tree: 16 bytes a URL, a batch checked with one binary search per run, runs
merged by a stable sort of two sorted halves (linear). The URLs are hashed straight from the
Arrow column's buffers, without a Python string per row. No library offers this (pyarrow's
hashing kernels are not public, and a disk key-value store is 10× slower).
"""

from __future__ import annotations

import numpy as np
import xxhash

from fastfetch.arrow import pa, pc


def url_hashes(urls: pa.Array) -> np.ndarray:
    """(n, 2) uint64 (low, high 64 bits): the xxh3-128 of each URL (a string array) as stored."""
    urls = urls.cast(pa.large_string())  # 64-bit offsets, whatever the list's size
    n = len(urls)
    offsets = np.frombuffer(urls.buffers()[1], dtype=np.int64, count=n + 1, offset=urls.offset * 8).tolist()
    data = urls.buffers()[2]
    view = memoryview(data) if data is not None else memoryview(b"")
    digest = xxhash.xxh3_128_digest
    joined = b"".join([digest(view[offsets[i] : offsets[i + 1]]) for i in range(n)])
    return np.frombuffer(joined, dtype="<u8").reshape(-1, 2)


class SeenUrls:
    """A growing set of URL hashes; ``first_seen`` marks which of a batch are new."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (high, low), sorted by high

    def __len__(self) -> int:
        return sum(len(hi) for hi, _ in self._runs)

    def first_seen(self, urls: pa.Array) -> np.ndarray:
        """Boolean mask over ``urls`` (strings, already trimmed): True where a URL appears for
        the first time, in this batch and every batch before it; the new ones are added."""
        n = len(urls)
        if n == 0:
            return np.zeros(0, dtype=bool)
        h = url_hashes(urls)
        hi, lo = h[:, 1].copy(), h[:, 0].copy()
        order = np.argsort(hi, kind="stable")  # equal hashes keep their row order: the first wins
        shi, slo = hi[order], lo[order]
        first = np.ones(n, dtype=bool)
        first[1:] = shi[1:] != shi[:-1]
        for i in np.flatnonzero(~first):  # equal high words: duplicates (or, rarely, a near-collision)
            group = slice(np.searchsorted(shi, shi[i]), i)
            first[i] = not np.any(slo[group][first[group]] == slo[i])
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
            del h1, l1, h2, l2  # the halves go before the sort: at the largest merge, memory is the peak
            order = np.argsort(hi, kind="stable")  # two sorted halves: a linear merge
            hi = hi[order]
            lo = lo[order]
            del order
            self._runs.append((hi, lo))


def _contains(rhi: np.ndarray, rlo: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Which (hi, lo) pairs are in the run (rhi sorted, rlo alongside)."""
    start = np.searchsorted(rhi, hi, side="left")
    end = np.searchsorted(rhi, hi, side="right")
    found = np.zeros(len(hi), dtype=bool)
    single = end - start == 1
    found[single] = rlo[start[single]] == lo[single]
    for i in np.flatnonzero(end - start > 1):  # equal high words in the run: checked one by one
        found[i] = bool(np.any(rlo[start[i] : end[i]] == lo[i]))
    return found


def trimmed(urls: pa.Array) -> pa.Array:
    """URLs as compared for dedup: surrounding whitespace removed, null as empty."""
    return pc.fill_null(pc.utf8_trim_whitespace(urls), "")
