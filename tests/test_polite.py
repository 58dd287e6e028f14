"""Polite crawling: robots.txt groups and rules (--respect-robots-txt), a per-host request rate
(--per-host-rps) and a host's Retry-After holding back all our requests to it."""

from __future__ import annotations

import time
from pathlib import Path

from aiohttp import web

from tests.conftest import LoopbackServer, make_image, read_mds, run_fetch
from tests.test_fetch_urls import stats_of, write_list

NET = ("--allow-private-networks", "--workers", "1")
ROBOTS = b"""\xef\xbb\xbf# groups: ours by name (a byte-order mark first, as some servers send), everyone else's
User-agent: image
Disallow: /

User-agent: fastfetch
Disallow: /private/
Allow: /private/ok
Disallow: /*.png$

User-agent: *
Allow: /public/
Disallow: /
"""
PATHS = ["/public/a.jpg", "/private/x.jpg", "/private/ok.jpg", "/other/b.jpg", "/other/c.png", "/other/c.png?v=2"]


def _serve(server: LoopbackServer, robots: bytes | int) -> list[dict[str, str]]:
    image = make_image(300, 300, seed=1)
    for path in PATHS:
        server.routes[path.split("?")[0]] = image
    if isinstance(robots, int):
        server.routes["/robots.txt"] = lambda request: _status(robots)  # type: ignore[assignment,return-value]
    else:
        server.routes["/robots.txt"] = robots
    return [{"url": server.url(p), "caption": p} for p in PATHS]


async def _status(status: int) -> web.Response:
    return web.Response(status=status)


def _fetch(tmp_path: Path, name: str, rows: list[dict[str, str]], *extra: str) -> tuple[dict, list[str]]:
    listing = write_list(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / name
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, *NET, *extra)
    assert proc.returncode == 0, proc.stderr
    return stats_of(out), sorted(r["caption"] for r in read_mds(out / "mds"))


def test_robots_txt_groups_and_rules(tmp_path: Path, server: LoopbackServer) -> None:
    rows = _serve(server, ROBOTS)
    stats, kept = _fetch(tmp_path, "ours", rows, "--respect-robots-txt")
    assert kept == [
        "/other/b.jpg",
        "/other/c.png?v=2",
        "/private/ok.jpg",
        "/public/a.jpg",
    ]  # the longest rule wins; $ ends a path; the group "image" (a word of our agent's comment) is not ours
    assert stats["rejected"] == {"robots_txt": 2}
    assert server.hits["/private/x.jpg"] == 0 and server.hits["/robots.txt"] == 1  # never asked; the file once

    stats, kept = _fetch(tmp_path, "theirs", rows, "--respect-robots-txt", "--user-agent", "acme-bot/1.0 (+mailto:a@b.example)")
    assert kept == ["/public/a.jpg"] and stats["rejected"] == {"robots_txt": 5}  # the * group

    server.hits.clear()
    stats, kept = _fetch(tmp_path, "ignored", rows)  # off by default: robots.txt is not even read
    assert len(kept) == 6 and server.hits["/robots.txt"] == 0


def test_robots_txt_that_cannot_be_read(tmp_path: Path, server: LoopbackServer) -> None:
    stats, kept = _fetch(tmp_path, "missing", _serve(server, 404), "--respect-robots-txt")
    assert len(kept) == 6 and stats["rejected"] == {}  # no file: no rules
    server.hits.clear()
    stats, kept = _fetch(tmp_path, "down", _serve(server, 503), "--respect-robots-txt", "--retries", "1")
    assert kept == [] and stats["rejected"] == {"robots_txt_unavailable": 6}  # a server error: all disallowed, for now
    assert server.hits["/robots.txt"] == 2 and not any(server.hits[p.split("?")[0]] for p in PATHS)


def _timed(
    server: LoopbackServer, prefix: str, n: int, first_status: int | None = None
) -> tuple[list[dict[str, str]], list[float]]:
    image, times = make_image(300, 300, seed=2), []

    async def handle(request: web.Request) -> web.Response:
        times.append(time.monotonic())
        if first_status is not None and len(times) == 1:
            return web.Response(status=first_status, headers={"Retry-After": "2"})
        return web.Response(body=image, content_type="image/jpeg")

    for i in range(n):
        server.routes[f"{prefix}/{i}.jpg"] = handle  # type: ignore[assignment]
    return [{"url": server.url(f"{prefix}/{i}.jpg"), "caption": f"c{i}"} for i in range(n)], times


def test_per_host_request_rate(tmp_path: Path, server: LoopbackServer) -> None:
    rows, times = _timed(server, "/rate", 12)
    stats, kept = _fetch(tmp_path, "rate", rows, "--per-host-rps", "5")
    assert len(kept) == 12 and len(times) == 12
    times.sort()
    # spaced at least 1/5 s apart (a slow machine only spaces them more): never more than 5 a second
    assert times[-1] - times[0] >= 11 / 5 * 0.95
    assert all(sum(1 for t in times if start <= t < start + 1.0) <= 6 for start in times)


def test_retry_after_holds_back_every_request_to_the_host(tmp_path: Path, server: LoopbackServer) -> None:
    rows, times = _timed(server, "/busy", 6, first_status=429)
    stats, kept = _fetch(tmp_path, "busy", rows, "--per-host-rps", "2")
    assert len(kept) == 6 and len(times) == 7  # one 429, then each image once
    times.sort()
    assert times[1] - times[0] >= 1.9  # after "Retry-After: 2", no request of ours to the host for 2 s
    assert all(b - a >= 0.45 for a, b in zip(times[1:], times[2:], strict=False))  # then spaced again, not a burst
