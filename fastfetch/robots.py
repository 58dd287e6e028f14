"""robots.txt for image requests (``--respect-robots-txt``), and a per-host request rate
(``--per-host-rps``): what a polite crawler does before it asks a host for an image.

Parsing and matching are protego's (RFC 9309: user-agent groups, the longest matching
``Allow``/``Disallow`` wins, ``*`` and ``$`` patterns). What is ours, because no library does
it for an asyncio client: each origin's file fetched once, through the run's guarded client
(the same SSRF guard, redirects checked hop by hop), with its own timeout and size cap, shared by
every request waiting for it, in a bounded cache; and the RFC's rules for a file that cannot be
had: a 4xx status means no rules (everything allowed), a 5xx or an unreachable server means
everything disallowed (retried like an image first).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

if TYPE_CHECKING:
    from fastfetch.http import Fetcher

MAX_BYTES = 512 * 1024  # the RFC asks crawlers to parse at least 500 KiB
TIMEOUT = 10.0  # seconds for one robots.txt, however slow the host
CACHED_ORIGINS = 100_000  # the least recently used origins' rules are dropped (and fetched again if needed)
_ALLOW_ALL, _DISALLOW_ALL = "allow", "disallow"


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL, or None when it has none (the request itself fails)."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return None
    return f"{parts.scheme}://{parts.hostname}{port}"


class RobotsTxt:
    """Which URLs the run's user agent may fetch, by each origin's robots.txt."""

    def __init__(self, fetcher: Fetcher, user_agent: str, retries: int) -> None:
        self.fetcher = fetcher
        self.user_agent = user_agent
        self.retries = retries
        self._rules: OrderedDict[str, asyncio.Task[Any]] = OrderedDict()

    async def allowed(self, url: str) -> bool:
        origin = origin_of(url)
        if origin is None:
            return True  # not a URL robots.txt speaks of: the request is refused on its own
        task = self._rules.get(origin)
        if task is None:
            task = self._rules[origin] = asyncio.ensure_future(
                self._fetch(origin)
            )  # its own task: shared, never cancelled by a waiter
            if len(self._rules) > CACHED_ORIGINS:
                self._rules.popitem(last=False)
        else:
            self._rules.move_to_end(origin)
        rules = await asyncio.shield(task)
        if rules in (_ALLOW_ALL, _DISALLOW_ALL):
            return rules == _ALLOW_ALL
        return bool(rules.can_fetch(url, self.user_agent))

    async def _fetch(self, origin: str) -> Any:
        from protego import Protego  # imported only with --respect-robots-txt

        from fastfetch.http import Refused

        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            try:
                async with asyncio.timeout(TIMEOUT), self.fetcher.request(f"{origin}/robots.txt") as resp:
                    if resp.status == 200:
                        body = await _read_capped(resp)
                        return Protego.parse(body.decode("utf-8", "replace"))
                    if 400 <= resp.status < 500 and resp.status != 429:
                        return _ALLOW_ALL  # no robots.txt: no rules
            except Refused:
                return _ALLOW_ALL  # the guard refuses the host: its images are refused for that reason
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                pass  # unreachable, this time
        return _DISALLOW_ALL  # a 5xx or unreachable throughout: the RFC's complete disallow


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BYTES:
            break  # the rest is not read: rules past the cap are ignored, as the RFC allows
    return b"".join(chunks)[:MAX_BYTES]


class HostPacer:
    """At most ``rps`` requests a second to one host, spaced evenly; a host's ``Retry-After``
    holds back every request to it, not only the one that got it."""

    def __init__(self, rps: float) -> None:
        self.interval = 1.0 / rps
        self._next: dict[str, float] = {}  # host → when its next request may start
        self._held: dict[str, float] = {}  # host → until when its Retry-After holds every request

    async def wait(self, url: str) -> None:
        host = _host(url)
        now = time.monotonic()
        start = max(now, self._next.get(host, now))
        self._next[host] = start + self.interval
        if len(self._next) > CACHED_ORIGINS:  # forget hosts whose turn is long past
            self._next = {h: t for h, t in self._next.items() if t > now}
            self._held = {h: t for h, t in self._held.items() if t > now}
        if start > now:
            await asyncio.sleep(start - now)
        while (until := self._held.get(host, 0.0)) > (now := time.monotonic()):  # held while it waited its turn
            await asyncio.sleep(until - now)

    def hold(self, url: str, seconds: float) -> None:
        host, until = _host(url), time.monotonic() + seconds
        self._held[host] = max(self._held.get(host, 0.0), until)
        self._next[host] = max(self._next.get(host, 0.0), until)


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""
