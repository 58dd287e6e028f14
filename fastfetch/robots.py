"""robots.txt for image requests (``--respect-robots-txt``), and a per-host request rate
(``--per-host-rps``): what a polite crawler does before it asks a host for an image.

Parsing and matching are protego's (RFC 9309: the longest matching ``Allow``/``Disallow`` wins,
``*`` and ``$`` patterns), asked with the product token of ``--user-agent`` only (the RFC's
rule: ``acme-bot/1.0 (+https://…)`` is ``acme-bot``, never a word of its comment). What is ours,
because no library does it for an asyncio client: each origin's file fetched once, through the
run's guarded client (the same SSRF guard, redirects checked hop by hop), with its own timeout
and size cap, shared by every request waiting for it, parsed in a thread, in a cache bounded by
count and by bytes; and the RFC's rules for a file that cannot be had: a 4xx status means no
rules (everything allowed), a 5xx or an unreachable server means everything disallowed for this
run (retried like an image first; counted as the transient ``robots_txt_unavailable``, so that
``--retry-failed`` asks again).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from fastfetch.errors import Reason as R

if TYPE_CHECKING:
    from fastfetch.http import Fetcher

MAX_BYTES = 512 * 1024  # the RFC asks crawlers to parse at least 500 KiB
TIMEOUT = 10.0  # seconds for one robots.txt, however slow the host
CACHED_ORIGINS = 100_000  # the least recently used origins' rules are dropped (and fetched again if needed)
CACHED_BYTES = 16 << 20  # … and so are they past this many bytes of robots.txt (parsed: up to ~35× more)
_ALLOW_ALL, _UNAVAILABLE = "allow", "unavailable"


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL (no user info; an IPv6 host keeps its brackets), or None
    when it has none (the request itself fails)."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        host = parts.netloc.rsplit("@", 1)[-1].lower()
    except ValueError:
        return None
    return f"{parts.scheme}://{host}"


def product_token(user_agent: str) -> str:
    """The name robots.txt groups are matched against: ``acme-bot/1.0 (+…)`` → ``acme-bot``."""
    words = user_agent.split()
    return words[0].split("/", 1)[0] if words else user_agent


class RobotsTxt:
    """Which URLs the run's user agent may fetch, by each origin's robots.txt."""

    def __init__(self, fetcher: Fetcher, user_agent: str, retries: int) -> None:
        self.fetcher = fetcher
        self.token = product_token(user_agent)
        self.retries = retries
        self._rules: OrderedDict[str, asyncio.Task[tuple[Any, int]]] = OrderedDict()
        self._bytes = 0

    async def refusal(self, url: str) -> str | None:
        """None when the URL may be fetched, else the reason it may not."""
        origin = origin_of(url)
        if origin is None:
            return None  # not a URL robots.txt speaks of: the request is refused on its own
        task = self._rules.get(origin)
        if task is None:
            # a task of its own: shared by every waiter, never cancelled by one of them
            task = self._rules[origin] = asyncio.ensure_future(self._fetch(origin))
            task.add_done_callback(self._account)
        else:
            self._rules.move_to_end(origin)
        rules, _ = await asyncio.shield(task)
        if rules == _ALLOW_ALL:
            return None
        if rules == _UNAVAILABLE:
            return R.ROBOTS_TXT_UNAVAILABLE
        return None if rules.can_fetch(url, self.token) else R.ROBOTS_TXT

    def close(self) -> None:
        """Stop the fetches still running (the client they use is closing)."""
        for task in self._rules.values():
            task.cancel()

    def _account(self, task: asyncio.Task[tuple[Any, int]]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self._bytes += task.result()[1]
        while len(self._rules) > 1 and (len(self._rules) > CACHED_ORIGINS or self._bytes > CACHED_BYTES):
            _, oldest = self._rules.popitem(last=False)
            if oldest.done() and not oldest.cancelled() and oldest.exception() is None:
                self._bytes -= oldest.result()[1]

    async def _fetch(self, origin: str) -> tuple[Any, int]:
        """The origin's rules (a parsed file, allow-all or unavailable) and the bytes they came from."""
        from fastfetch.http import Refused

        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            try:
                async with asyncio.timeout(TIMEOUT), self.fetcher.request(f"{origin}/robots.txt") as resp:
                    if 200 <= resp.status < 300:
                        body = await _read_capped(resp)
                        return await asyncio.to_thread(_parse, body), len(body)  # a long file takes long to parse
                    if 400 <= resp.status < 500 and resp.status != 429:
                        return _ALLOW_ALL, 0  # no robots.txt: no rules
            except Refused:
                return _ALLOW_ALL, 0  # the guard refuses the host: its images are refused for that reason
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                pass  # unreachable, this time
        return _UNAVAILABLE, 0  # a 5xx or unreachable throughout: the RFC's complete disallow


def _parse(body: bytes) -> Any:
    from protego import Protego  # imported only with --respect-robots-txt

    # utf-8-sig: a byte-order mark would otherwise hide the first User-agent line
    return Protego.parse(body.decode("utf-8-sig", "replace"))


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BYTES:
            # the rest is not read (the RFC allows the cap); a line cut at it is dropped, or
            # "Disallow: /private/" could become "Disallow: /"
            return b"".join(chunks)[:MAX_BYTES].rsplit(b"\n", 1)[0]
    return b"".join(chunks)


class HostPacer:
    """At most ``rps`` requests a second to one host, spaced evenly; a host's ``Retry-After``
    holds back every request to it, not only the one that got it, and the requests it held go
    out spaced again afterwards, not in a burst."""

    def __init__(self, rps: float) -> None:
        self.interval = 1.0 / rps
        self._next: dict[str, float] = {}  # host → when its next request may start
        self._held: dict[str, float] = {}  # host → until when its Retry-After holds every request

    async def wait(self, url: str) -> None:
        host = _host(url)
        while True:
            now = time.monotonic()
            start = max(now, self._next.get(host, now))
            self._next[host] = start + self.interval
            if len(self._next) > CACHED_ORIGINS:  # forget hosts whose turn is long past
                self._next = {h: t for h, t in self._next.items() if t > now}
                self._held = {h: t for h, t in self._held.items() if t > now}
            if start > now:
                await asyncio.sleep(start - now)
            if self._held.get(host, 0.0) <= time.monotonic():
                return
            await asyncio.sleep(self._held[host] - time.monotonic())  # held while it waited: a new turn after

    def hold(self, url: str, seconds: float) -> None:
        host, until = _host(url), time.monotonic() + seconds
        self._held[host] = max(self._held.get(host, 0.0), until)
        self._next[host] = max(self._next.get(host, 0.0), until)


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""
