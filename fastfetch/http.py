"""One aiohttp session for the whole run: limits, retries, timeouts and guards.

Every request fastfetch makes goes through ``Fetcher.request``: images of a URL list, archives,
ranged reads of zips, caption side files and remote URL lists alike. It checks the scheme
(http/https only) and the address (the SSRF guard: an address literal is judged here, a name by
``GuardedResolver`` on every connection) of the URL and of every redirect hop, which it follows
by hand, dropping credentials when a hop leaves the origin. ``Fetcher.fetch`` builds on it for
images: a URL becomes bytes or a named rejection reason, never an exception, because bad input
must never stop a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import itertools
import random
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urljoin

import aiohttp
from aiohttp import http_exceptions
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from fastfetch import __version__
from fastfetch.errors import Reason as R
from fastfetch.errors import http_status
from fastfetch.robots import HostPacer, RobotsTxt

USER_AGENT = f"fastfetch/{__version__} (image-caption dataset builder; honours X-Robots-Tag noai/noimageai)"
_OPTOUT_TOKENS = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Network settings of a run (the CLI's flags)."""

    concurrency: int = 256
    per_host: int = 16
    timeout: float = 20.0  # total seconds per attempt
    connect_timeout: float = 10.0
    read_timeout: float = 10.0  # seconds without a byte
    retries: int = 2
    backoff: float = 0.5  # first retry waits ~backoff s, doubling, with jitter
    max_retry_after: float = 60.0
    max_bytes: int = 32 * 1024 * 1024
    max_inflight_bytes: int = 1024 * 1024 * 1024  # bodies held at once, downloading or waiting to be resized
    max_redirects: int = 5
    respect_robots: bool = True
    robots_txt: bool = False  # --respect-robots-txt: each image URL checked against its origin's robots.txt
    per_host_rps: float | None = None  # --per-host-rps: image requests a second to one host
    allow_private_networks: bool = False
    user_agent: str = USER_AGENT


class MemoryBudget:
    """Bounds the bytes of response bodies held at once, whatever the concurrency.

    A download reserves its body chunk by chunk and the pipeline gives the reservation back
    once the image is written or rejected. When the budget runs out, the largest body still
    downloading is evicted (counted as ``memory_limit``): ordinary images keep flowing while
    the huge or endless bodies that exhausted the budget are the ones dropped, and bodies
    waiting for each other cannot deadlock. A body may always proceed when nothing is held.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._tickets = itertools.count(1)
        self._downloading: dict[int, int] = {}  # ticket → bytes held so far
        self._evicted: set[int] = set()
        self._cond = asyncio.Condition()
        self._waiting = 0  # takers blocked on the budget (no wake-up to schedule when none)

    async def take(self, ticket: int, n: int) -> None:
        async with self._cond:
            while True:
                if ticket in self._evicted:
                    raise _Reject(R.MEMORY_LIMIT)
                if self.used + n <= self.limit or self.used == 0:
                    break
                victim = max(self._downloading, key=self._downloading.__getitem__, default=None)
                if victim == ticket:
                    raise _Reject(R.MEMORY_LIMIT)
                if victim is not None:
                    self._evicted.add(victim)
                    self._cond.notify_all()
                # else: everything held is waiting for the resizer, and comes back soon
                self._waiting += 1
                try:
                    await self._cond.wait()
                finally:
                    self._waiting -= 1
            self.used += n
            self._downloading[ticket] = self._downloading.get(ticket, 0) + n

    def ticket(self) -> int:
        """A new reservation's number."""
        return next(self._tickets)

    async def hold(self, n: int) -> int:
        """Reserve ``n`` bytes of a body that is already complete (an archive member waiting
        for the resize pool): waits while the budget is spent, and is never evicted. Returns
        the ticket to ``give`` back."""
        ticket = self.ticket()
        await self.take(ticket, n)
        self.downloaded(ticket)
        return ticket

    def downloaded(self, ticket: int) -> None:
        """The body is complete: it is no longer a candidate for eviction."""
        self._downloading.pop(ticket, None)

    def give(self, ticket: int, n: int) -> None:
        self._downloading.pop(ticket, None)
        self._evicted.discard(ticket)
        if n:
            self.used -= n
            if self._waiting:
                asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()


class FetchResult(NamedTuple):
    """Bytes of a successful download, or the reason it failed (``data`` is then ``None``)."""

    data: bytes | None
    reason: str | None
    attempts: int = 1
    ticket: int = 0  # the body's reservation in the memory budget


class _Retry(Exception):
    """A failure worth another attempt; ``reason`` is what is counted if attempts run out."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class _Reject(Exception):
    """A final failure for this URL."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BlockedAddress(Exception):
    """A host that resolves only to addresses a public crawler must not reach (SSRF guard).

    Deliberately not an ``OSError``: aiohttp would wrap that into a retryable connection error.
    """


class Refused(Exception):
    """A request fastfetch will not make; ``reason`` is its stats name (``private_address``,
    ``bad_scheme``, ``invalid_url``, ``too_many_redirects``)."""

    def __init__(self, reason: str, url: str) -> None:
        super().__init__(f"{reason.replace('_', ' ')}: {url}")
        self.reason = reason


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215, local use
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 (SIIT)
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated, still routed inside some networks


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses. An IPv6 address that carries an IPv4 one
    (IPv4-mapped, -compatible and -translated, NAT64, 6to4, Teredo) is judged by the IPv4
    address it reaches, so ``[64:ff9b::a00:1]`` is 10.0.0.1 and refused."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL or ip in _SITE_LOCAL:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and (ip in _NAT64 or ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves through aiohttp's default resolver and drops non-public answers.

    Every connection resolves through here (redirect targets included), and cached answers
    were checked when they were resolved, so a DNS answer that changes to a private address
    is caught like any other.
    """

    def __init__(self, trusted: frozenset[str] = frozenset()) -> None:
        self._inner = DefaultResolver()
        self._trusted = trusted  # the operator's proxies: often on a private address, and chosen by them

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if host.lower() in self._trusted:
            return answers
        public = [a for a in answers if is_public_address(a["host"])]
        if not public:
            raise BlockedAddress(host)
        return public

    async def close(self) -> None:
        await self._inner.close()


def robots_optout(values: list[str], agent: str = "fastfetch") -> bool:
    """Does an ``X-Robots-Tag`` header opt this image out of AI training or indexing?

    Directives may be global (``noai``) or addressed to a user agent (``otherbot: noindex``);
    only the global ones and those addressed to us count.
    """
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            if ":" in part:
                bot, _, part = part.partition(":")
                if bot.strip() not in (agent, "*"):
                    continue
            if any(tok.strip() in _OPTOUT_TOKENS for tok in part.split()):
                return True
    return False


def parse_retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), cap)


class Fetcher:
    """The run's one HTTP client (``request``) and its image downloads with bounded concurrency
    (``fetch``); use as an async context manager."""

    def __init__(self, cfg: FetchConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._proxied = False
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self.budget = MemoryBudget(cfg.max_inflight_bytes)
        self.bytes_in = 0
        self.robots = RobotsTxt(self, cfg.user_agent, cfg.retries) if cfg.robots_txt else None
        self.pacer = HostPacer(cfg.per_host_rps) if cfg.per_host_rps else None

    async def __aenter__(self) -> Fetcher:
        # With trust_env aiohttp looks up the proxy environment and ~/.netrc in a thread for
        # every request (~10% of the event loop's CPU): only pay that where a proxy is set.
        self._proxied = any(k in ("http", "https") for k in urllib.request.getproxies())  # NO_PROXY alone: no
        proxies = (
            frozenset((info.proxy.host or "").lower() for info in aiohttp.helpers.proxies_from_env().values())
            if self._proxied
            else frozenset()
        )
        self._resolver = None if self.cfg.allow_private_networks else GuardedResolver(proxies)
        connector = aiohttp.TCPConnector(
            limit=self.cfg.concurrency,
            limit_per_host=self.cfg.per_host,
            ttl_dns_cache=300,
            use_dns_cache=True,
            enable_cleanup_closed=True,
            resolver=self._resolver,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": self.cfg.user_agent},
            timeout=aiohttp.ClientTimeout(
                total=self.cfg.timeout,
                sock_connect=self.cfg.connect_timeout,
                sock_read=self.cfg.read_timeout,
            ),
            auto_decompress=True,
            trust_env=self._proxied,
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.robots is not None:
            self.robots.close()
        if self._session is not None:
            await self._session.close()

    @contextlib.asynccontextmanager
    async def request(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        read_bufsize: int | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET ``url`` through the guard, following redirects by hand (each hop checked, at
        most ``max_redirects``); yields the final answer, whatever its status. Raises
        ``Refused`` for a URL or hop the guard refuses; network errors propagate as aiohttp's.
        Authorization and cookies are not sent on to another origin (a hub's CDN redirect)."""
        assert self._session is not None, "Fetcher used outside 'async with'"
        current, sent = url, dict(headers or {})
        options: dict[str, object] = {"allow_redirects": False}
        if timeout is not None:
            options["timeout"] = timeout
        if read_bufsize is not None:
            options["read_bufsize"] = read_bufsize
        for _ in range(self.cfg.max_redirects + 1):
            target = _checked_url(current, self.cfg.allow_private_networks)
            if self._proxied and _through_proxy(target):
                await self.check(current)  # the proxy resolves the name: judge its address here first
            try:
                async with self._session.get(target, headers=sent, **options) as resp:  # type: ignore[arg-type]
                    location = resp.headers.get("Location") if resp.status in _REDIRECTS else None
                    if location is None:
                        yield resp
                        return
                    following = urljoin(str(resp.url), location)
            except BlockedAddress as exc:
                raise Refused(R.PRIVATE_ADDRESS, current) from exc
            if _origin(following) != _origin(current):
                sent = {k: v for k, v in sent.items() if k.lower() not in _CREDENTIAL_HEADERS}
            current = following
        raise Refused(R.TOO_MANY_REDIRECTS, url)

    async def check(self, url: str) -> None:
        """Raise ``Refused`` unless the guard lets requests to ``url`` through: for requests
        another library makes for us (huggingface_hub's file listings)."""
        target = _checked_url(url, self.cfg.allow_private_networks)
        host = target.raw_host or ""
        if self._resolver is not None and not _is_address(host):
            try:
                await self._resolver.resolve(host, target.port or 0)
            except BlockedAddress as exc:
                raise Refused(R.PRIVATE_ADDRESS, url) from exc

    async def fetch(self, url: str) -> FetchResult:
        """GET ``url`` with retries; never raises for network or server trouble.

        The body's bytes stay reserved in ``self.budget`` until the caller calls ``release``.
        """
        # robots.txt and the host's pace are waited for before a request slot is taken: a host
        # that answers slowly, or is asked slowly, must not hold up the others' requests
        if self.robots is not None and (refused := await self.robots.refusal(url)) is not None:
            return FetchResult(None, refused, 0)
        if self.pacer is not None:
            await self.pacer.wait(url)
        attempt = 0
        async with self._slots:
            while True:
                attempt += 1
                ticket = self.budget.ticket()
                try:
                    if attempt > 1 and self.pacer is not None:
                        await self.pacer.wait(url)  # a retry is a request to the host too
                    data = await self._attempt(url, ticket)
                    return FetchResult(data, None, attempt, ticket)
                except _Reject as exc:
                    return FetchResult(None, exc.reason, attempt)
                except _Retry as exc:
                    if exc.delay is not None and self.pacer is not None:
                        self.pacer.hold(url, exc.delay)  # the host asked every request of ours to wait
                    if attempt > self.cfg.retries:
                        return FetchResult(None, exc.reason, attempt)
                    delay = exc.delay
                    if delay is None:
                        delay = self.cfg.backoff * 2 ** (attempt - 1) * (0.5 + random.random())
                    await asyncio.sleep(delay)

    async def _attempt(self, url: str, ticket: int) -> bytes:
        try:
            async with self.request(url) as resp:
                if resp.status in _REDIRECTS:  # a redirect without a Location
                    raise _Reject(http_status(resp.status))
                self._check_status(resp)
                if self.cfg.respect_robots and robots_optout(resp.headers.getall("X-Robots-Tag", [])):
                    raise _Reject(R.ROBOTS_OPTOUT)
                return await self._read_body(resp, ticket)
        except (_Retry, _Reject):
            raise
        except Refused as exc:
            raise _Reject(exc.reason) from exc
        except asyncio.TimeoutError as exc:
            raise _Retry(R.TIMEOUT) from exc
        except aiohttp.ClientPayloadError as exc:
            raise _payload_failure(exc) from exc
        except aiohttp.ClientResponseError as exc:  # a status line or headers that do not parse
            raise _Reject(R.BAD_RESPONSE) from exc
        except (aiohttp.InvalidURL, ValueError, UnicodeError) as exc:
            raise _Reject(R.INVALID_URL) from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise _Retry(R.CONNECTION) from exc

    def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        if status == 429:
            delay = parse_retry_after(resp.headers.get("Retry-After"), self.cfg.max_retry_after)
            raise _Retry(R.HTTP_429, delay)
        if status >= 500:
            raise _Retry(R.HTTP_5XX)
        if status != 200:
            raise _Reject(http_status(status))

    async def _read_body(self, resp: aiohttp.ClientResponse, ticket: int) -> bytes:
        """The body, reserved in the memory budget as it arrives, copied once."""
        limit = self.cfg.max_bytes
        declared = resp.content_length
        if declared is not None and declared > limit:
            raise _Reject(R.TOO_LARGE)
        held = 0
        try:
            if declared is not None and not resp.headers.get("Content-Encoding"):
                # The size is known and cannot grow (aiohttp stops at Content-Length): reserve
                # it at once and let aiohttp join the body in one copy.
                await self.budget.take(ticket, declared)
                held = declared
                body = await resp.read()
            else:  # chunked or compressed: the size is only known as it arrives
                chunks: list[bytes] = []
                async for chunk in resp.content.iter_chunked(1 << 16):
                    await self.budget.take(ticket, len(chunk))
                    held += len(chunk)
                    if held > limit:
                        raise _Reject(R.TOO_LARGE)
                    chunks.append(chunk)
                body = b"".join(chunks)
        except BaseException:
            self.budget.give(ticket, held)
            raise
        if held != len(body):  # the reservation must match what the pipeline gives back
            self.budget.give(ticket, held - len(body))
        self.budget.downloaded(ticket)
        self.bytes_in += len(body)
        return body

    def release(self, result: FetchResult) -> None:
        """Give back the memory reserved for a body once it has been processed."""
        if result.data is not None:
            self.budget.give(result.ticket, len(result.data))


def _payload_failure(exc: aiohttp.ClientPayloadError) -> Exception:
    """A body that broke off is worth another try; one that cannot be decoded or parsed is not
    (the same server sends it the same way again)."""
    cause = exc.__cause__
    if isinstance(cause, http_exceptions.DecompressSizeError):
        return _Reject(R.TOO_LARGE)
    if isinstance(cause, http_exceptions.ContentEncodingError):
        return _Reject(R.BAD_ENCODING)  # Content-Encoding says gzip/deflate/br, the body is not
    if isinstance(cause, http_exceptions.HttpProcessingError) and not isinstance(
        cause, (http_exceptions.ContentLengthError, http_exceptions.TransferEncodingError)
    ):
        return _Reject(R.BAD_RESPONSE)
    return _Retry(R.CONNECTION)


_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = URL(url)
    return parsed.scheme, (parsed.host or "").lower(), parsed.explicit_port or parsed.port


def _through_proxy(url: URL) -> bool:
    """Whether aiohttp sends this request through a proxy from the environment."""
    try:
        aiohttp.helpers.get_env_proxy_for_url(url)
    except LookupError:
        return False
    return True


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def _checked_url(url: str, allow_private: bool) -> URL:
    """Parse and check a URL before anything is sent to it (http and https only; an address
    literal must be public unless private networks are allowed: literals skip the resolver)."""
    try:
        parsed = URL(url, encoded=False)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise Refused(R.INVALID_URL, url) from exc
    if parsed.scheme and parsed.scheme not in ("http", "https"):
        raise Refused(R.BAD_SCHEME, url)
    host = parsed.raw_host
    if not parsed.scheme or not host:
        raise Refused(R.INVALID_URL, url)
    if not allow_private:
        if not _is_address(host):
            if host.rstrip(".").lower() == "localhost" or host.rstrip(".").lower().endswith(".localhost"):
                raise Refused(R.PRIVATE_ADDRESS, url)
        elif not is_public_address(host.strip("[]")):
            raise Refused(R.PRIVATE_ADDRESS, url)
    return parsed
