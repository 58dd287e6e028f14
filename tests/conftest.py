"""Shared test machinery: a loopback HTTP server with per-path behaviours, image factories,
a ``bin/fetch`` runner and an MDS reader. Every server listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
FETCH = ROOT / "bin" / "fetch"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- images ------------------------------------------------------------------------------------
def make_image(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0, **save: Any) -> bytes:
    """A smooth random picture (compresses like a photo, decodes to known sizes)."""
    rng = random.Random(seed)
    small = Image.new("RGB", (4, 4))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(16)])
    im = small.resize((width, height), Image.Resampling.BICUBIC)
    if mode != "RGB":
        im = im.convert(mode)
    out = io.BytesIO()
    im.save(out, fmt, **save)
    return out.getvalue()


# -- server ------------------------------------------------------------------------------------
@dataclass
class LoopbackServer:
    """An aiohttp server in a thread; ``routes`` maps a path to bytes or to a handler."""

    routes: dict[str, bytes | Handler] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        self.requests.append((request.path, dict(request.headers)))
        route = self.routes.get(request.path)
        if route is None:
            raise web.HTTPNotFound()
        if isinstance(route, bytes):
            return web.Response(body=route, content_type="image/jpeg")
        return await route(request)


def flaky(body: bytes) -> tuple[dict[str, bool], Handler]:
    """A handler answering 503 while ``state["down"]`` (True at first), then ``body``."""
    state = {"down": True}

    async def handle(request: web.Request) -> web.Response:
        if state["down"]:
            return web.Response(status=503)
        return web.Response(body=body, content_type="image/jpeg")

    return state, handle


def serve_numbered(server: LoopbackServer, prefix: str, n: int, delay: float = 0.0, variety: int = 8) -> list[dict[str, str]]:
    """``n`` images at ``<prefix>/<i>.jpg`` (``variety`` distinct sizes, each answer after
    ``delay`` seconds); returns the URL list rows, captioned ``c<i>``."""
    images = [make_image(280 + 60 * (i % 9), 260 + 70 * (i % 7), seed=i) for i in range(variety)]

    async def image(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        i = int(request.path.rsplit("/", 1)[1].split(".")[0])
        return web.Response(body=images[i % variety], content_type="image/jpeg")

    for i in range(n):
        server.routes[f"{prefix}/{i}.jpg"] = image
    return [{"url": server.url(f"{prefix}/{i}.jpg"), "caption": f"c{i}"} for i in range(n)]


SHM = Path("/dev/shm")
_STREAMING_SHM = re.compile(r"(\d{6})_(locals|barrier|cache_usage|next_epoch|shard_states|shard_access_times)$")


def _streaming_prefixes() -> dict[str, set[str]]:
    """Streaming's shared memory: prefix → its names."""
    found: dict[str, set[str]] = {}
    for name in os.listdir(SHM) if SHM.is_dir() else ():
        match = _STREAMING_SHM.match(name)
        if match:
            found.setdefault(match.group(1), set()).add(name)
    return found


def _dataset_dirs(prefix: str) -> list[str] | None:
    """The local folders of the dataset that registered ``prefix`` (None: not readable), as
    Streaming packs them: an int32 size, then the folders and the prefix joined by NUL."""
    try:
        data = (SHM / f"{prefix}_locals").read_bytes()[4:].rstrip(b"\0")  # after its int32 size
    except OSError:
        return None
    return [d.decode(errors="replace") for d in data.split(b"\0")[:-1]]


def _unlink(names: set[str]) -> None:
    for name in names:
        (SHM / name).unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _no_stale_streaming_shared_memory() -> None:
    """Shared memory of datasets whose folders are gone (SIGKILLed runs of earlier sessions)."""
    for prefix, names in _streaming_prefixes().items():
        dirs = _dataset_dirs(prefix)
        if dirs and not any(os.path.exists(d) for d in dirs):
            _unlink(names)


_OPENED: list[Any] = []  # every Streaming SharedMemory this process made (see below)


@pytest.fixture(scope="session", autouse=True)
def _track_streaming_shared_memory() -> Iterator[None]:
    from streaming.base.shared import memory

    original = memory.SharedMemory.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _OPENED.append(self)

    memory.SharedMemory.__init__ = init  # type: ignore[method-assign]
    yield
    memory.SharedMemory.__init__ = original  # type: ignore[method-assign]


def _close_streaming_shared_memory() -> None:
    """Close the descriptors of shared memory no dataset uses any more (Streaming keeps every
    one open until the process exits, through its exit handler)."""
    gc.collect()  # the finished test's datasets, and with them their views of the memory
    kept = []
    for opened in _OPENED:
        busy = False
        for shm in opened.created_shms + opened.opened_shms:
            try:
                shm.close()
            except BufferError:  # still viewed by a live dataset: next time
                busy = True
        if busy:
            kept.append(opened)
    _OPENED[:] = kept


@pytest.fixture(autouse=True)
def _release_streaming_shared_memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Unlink the shared memory Streaming's datasets made during a test, once it is over.

    Every StreamingDataset opens the shared memory of every prefix that exists (walking prefixes
    0, 1, … until one has neither a file lock nor shared memory) and keeps it open until the
    process exits: in one pytest process the open descriptors grow with the square of the
    datasets created, plus what the runs the kill tests SIGKILL leave, until none are left.
    Unlinked names are not opened again, and the descriptors of memory no dataset views any more
    are closed. (Streaming's clean_stale_shared_memory stops at the first prefix without shared
    memory, which its own file locks leave in front of the rest.)
    Only this session's datasets are touched (their folders are under its temporary roots): a
    suite running beside this one keeps its own."""
    before = set(_streaming_prefixes())
    yield
    roots = [str(tmp_path_factory.getbasetemp()), tempfile.gettempdir() + "/fastfetch-cache"]
    if "tests.encode_models" in sys.modules or "encode_models" in sys.modules:
        em = sys.modules.get("tests.encode_models") or sys.modules["encode_models"]
        roots.append(em.root())
    for prefix, names in _streaming_prefixes().items():
        dirs = _dataset_dirs(prefix)
        if prefix not in before and dirs is not None and all(d.startswith(tuple(roots)) for d in dirs):
            _unlink(names)
    _close_streaming_shared_memory()


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with loopback_server() as srv:
        yield srv


@contextlib.contextmanager
def loopback_server() -> Iterator[LoopbackServer]:
    """A LoopbackServer running in a thread while the context lasts (the ``server`` fixture;
    also used outside pytest, by the Ray scenarios)."""
    srv = LoopbackServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner_box: dict[str, web.AppRunner] = {}

    async def start() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", srv._handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        srv.port = runner.addresses[0][1]
        runner_box["r"] = runner

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield srv
    asyncio.run_coroutine_threadsafe(runner_box["r"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of another local port: its link can be cut and
    restored (an object store's outage, without losing what the store holds), and it records
    the request line of every HTTP request that passes (``requests``: "PUT /bucket/key")."""

    def __init__(self, target: int) -> None:
        self.target, self.up, self.port = target, True, 0
        self.requests: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.conns: set[asyncio.StreamWriter] = set()
        ready = threading.Event()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sniff: bool) -> None:
            try:
                while self.up and (data := await reader.read(65536)):
                    if sniff:
                        self.requests += [m.decode() for m in re.findall(rb"(?m)^(?:GET|PUT|POST|HEAD|DELETE) \S+", data)]
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not self.up:
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            self.conns.update((writer, up_writer))
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

        async def start() -> None:
            srv = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()), daemon=True).start()
        ready.wait(10)

    def cut(self) -> None:
        def close() -> None:
            self.up = False
            for w in self.conns:
                w.transport.abort()

        self.loop.call_soon_threadsafe(close)

    def restore(self) -> None:
        self.up = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with a bucket ``data``: the process, and the environment that reaches it."""
    port = _free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
    s3_client(env).create_bucket(Bucket="data")
    return proc, env


def s3_client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture(scope="session")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with a bucket; yields the environment that reaches it."""
    proc, env = start_s3()
    yield env
    proc.terminate()
    proc.wait(10)


# -- running bin/fetch -------------------------------------------------------------------------
def fetch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_"))}
    env.update(HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("HTTP_PROXY", None)
    env.pop("http_proxy", None)
    env.update(extra)
    return env


def run_fetch(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``bin/fetch`` as a user would; returns the finished process (output captured)."""
    cmd = [PYTHON, str(FETCH), "--no-progress", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or fetch_env(), timeout=timeout, cwd=ROOT)


def start_fetch(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [PYTHON, str(FETCH), "--no-progress", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or fetch_env(), cwd=ROOT)


# -- reading MDS -------------------------------------------------------------------------------
def read_mds(root: Path) -> list[dict[str, Any]]:
    """All rows of an MDS dataset (merged index), with ``jpg`` left as raw bytes."""
    import orjson
    from streaming.base.format import reader_from_json

    index = orjson.loads((root / "index.json").read_bytes())
    rows: list[dict[str, Any]] = []
    for info in index["shards"]:
        shard = reader_from_json(str(root), None, info)
        for i in range(shard.samples):
            data = shard.get_sample_data(i)
            sample = shard.decode_sample(data)
            rows.append(sample)
    return rows


def jpeg_bytes(value: Any) -> bytes:
    """The stored JPEG as bytes whether streaming decoded it to a PIL image or not."""
    if isinstance(value, bytes):
        return value
    return Path(value.filename).read_bytes() if getattr(value, "filename", "") else _reencode(value)


def _reencode(im: Image.Image) -> bytes:
    fp = getattr(im, "fp", None)
    if fp is not None and hasattr(fp, "getvalue"):
        return fp.getvalue()
    raise AssertionError("cannot recover the stored JPEG bytes")
