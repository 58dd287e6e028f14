"""The resize processes behind the event loop: answers matched to requests, and what a worker's
death costs (only the image it was on)."""

from __future__ import annotations

import asyncio
import collections
import os
import signal

import pytest

from fastfetch.body import body_bytes
from fastfetch.imaging import Processed, ResizeConfig, process
from fastfetch.resize_pool import ResizePool, _Results
from fastfetch.resize_worker import RESULT
from tests.conftest import make_image


def test_results_match_their_requests_across_workers() -> None:
    sizes = [(300 + 37 * i, 280 + 23 * i) for i in range(24)]
    bodies = [make_image(*s, seed=i) for i, s in enumerate(sizes)] + [b"not an image", b""]

    def in_pieces(body: bytes, i: int) -> bytes | tuple:  # every other body as received chunks
        view = memoryview(body)
        return body if i % 2 else (view[:7], bytes(view[7 : 7 + 5 * i]), view[7 + 5 * i :])

    async def run() -> list:
        pool = ResizePool(ResizeConfig(), 2)
        try:
            return await asyncio.gather(*(pool.process(in_pieces(b, i)) for i, b in enumerate(bodies)))
        finally:
            pool.close()

    got = [r._replace(data=None if r.data is None else body_bytes(r.data)) for r in asyncio.run(run())]
    assert got == [process(b, ResizeConfig()) for b in bodies]


def test_a_burst_of_tasks_at_the_start_is_shared_between_the_workers() -> None:
    """The first archive chunk's images arrive before the workers' sockets are on the loop:
    they must still go to both workers, not all to the one that looks idle."""
    jpeg = make_image(400, 300)

    async def run() -> tuple[list[int], list]:
        pool = ResizePool(ResizeConfig(), 2)
        try:
            tasks = [asyncio.ensure_future(pool.process(jpeg)) for _ in range(16)]
            await asyncio.sleep(0)  # every task has picked its worker
            loads = [w.load for w in pool._workers]
            return loads, await asyncio.gather(*tasks)
        finally:
            pool.close()

    loads, results = asyncio.run(run())
    assert loads == [8, 8]
    assert all(r.reason is None and (r.width, r.height) == (400, 300) for r in results)


def test_result_frames_are_parsed_whatever_sizes_the_reads_come_in() -> None:
    """Frames as a worker writes them, received in reads of 1 byte, 5 bytes and all at once."""
    jpeg = make_image(64, 48)
    digest = b"e3b0c442" * 8 + b",d41d8cd98f00b204e9800998ecf8427e"
    frames = [
        (b"", 600, 400, 900, 600, jpeg, digest),
        (b"too_small", 0, 0, 100, 80, None, b""),
        (b"", 512, 512, 512, 512, b"", b""),
        (b"", 300, 300, 300, 300, None, digest),  # the original kept, with its digests
    ]
    stream = b"".join(
        RESULT.pack(len(reason), w, h, ow, oh, -1 if data is None else len(data), len(dig)) + reason + dig + (data or b"")
        for reason, w, h, ow, oh, data, dig in frames
    )
    expected = [
        Processed(None, jpeg, 600, 400, 900, 600, digest.decode()),
        Processed("too_small", None, 0, 0, 100, 80),
        Processed(None, b"", 512, 512, 512, 512),
        Processed(None, None, 300, 300, 300, 300, digest.decode()),
    ]

    async def receive(read_size: int) -> list[Processed]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in frames]
        worker = type("W", (), {"pending": collections.deque((f, b"") for f in futures), "answered": 0})()
        protocol = _Results(worker, lambda w: None)  # type: ignore[arg-type]
        pos = 0
        while pos < len(stream):
            buffer = protocol.get_buffer(-1)
            n = min(read_size, len(buffer), len(stream) - pos)
            buffer[:n] = stream[pos : pos + n]
            protocol.buffer_updated(n)
            pos += n
        return [f.result() for f in futures]

    for read_size in (1, 5, len(stream)):
        got = asyncio.run(receive(read_size))
        assert [r._replace(data=None if r.data is None else body_bytes(r.data)) for r in got] == expected


def test_a_killed_worker_costs_at_most_the_image_it_was_on() -> None:
    """Killed while six images wait in its queue (each takes it ~0.1 s): exactly the one it was
    on is lost, the five queued behind it go to its successor and come back resized."""
    jpeg = make_image(900, 700)
    big = make_image(2400, 2000, "PNG")  # no reduced-scale decode: real work for the worker

    async def run() -> tuple[list, object, int]:
        pool = ResizePool(ResizeConfig(), 1)
        try:
            assert (await pool.process(jpeg)).reason is None  # the worker is up and has answered
            worker = pool._workers[0]
            tasks = [asyncio.create_task(pool.process(big)) for _ in range(6)]
            while len(worker.pending) < 6:
                await asyncio.sleep(0.005)
            os.kill(worker.process.pid, signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            assert pool._workers[0] is not worker  # replaced
            return results, await pool.process(jpeg), worker.answered
        finally:
            pool.close()

    results, after, answered = asyncio.run(run())
    reasons = [r.reason for r in results]
    assert answered == 1, "the kill landed after the worker had finished an image of the queue"
    assert reasons.count("decode_error") == 1 and reasons.count(None) == 5, reasons
    assert reasons[0] == "decode_error"  # the one it was on: the first in its queue
    assert all((r.width, r.height) == (614, 512) for r in results if r.reason is None)
    assert after.reason is None and (after.width, after.height) == (658, 512)


def test_workers_stop_cleanly_when_descriptors_are_numbered_past_1024() -> None:
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # a long run's open files

    async def run() -> object:
        pool = ResizePool(ResizeConfig(), 2)
        try:
            return await pool.process(make_image(600, 400))
        finally:
            pool.close()  # waits for the workers on a descriptor numbered past 1024

    try:
        assert asyncio.run(run()).reason is None
    finally:
        for fd in held:
            os.close(fd)


def test_workers_run_this_package_whatever_folder_the_user_is_in(tmp_path, monkeypatch) -> None:
    """A ``fastfetch`` folder in the current directory (another checkout, an older version) must
    not be what the workers import: they run the package of the process that started them."""
    impostor = tmp_path / "fastfetch"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    (impostor / "resize_worker.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    jpeg = make_image(700, 600)

    async def run() -> Processed:
        pool = ResizePool(ResizeConfig(), 1)
        try:
            return await asyncio.wait_for(pool.process(jpeg), 30)
        finally:
            pool.close()

    got = asyncio.run(run())
    assert got._replace(data=body_bytes(got.data)) == process(jpeg, ResizeConfig())


def test_workers_that_cannot_start_fail_the_work_with_a_message_instead_of_respawning_forever(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "PIL"  # a Pillow that cannot be imported, first on the workers' path
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('this Pillow is broken')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    async def run() -> BaseException:
        pool = ResizePool(ResizeConfig(), 1)
        try:
            with pytest.raises(RuntimeError) as info:
                await asyncio.wait_for(pool.process(make_image(300, 300)), 60)
            with pytest.raises(RuntimeError):  # and every later image, at once
                await pool.process(make_image(300, 300))
            return info.value
        finally:
            pool.close()

    message = str(asyncio.run(run()))
    assert "exit at start (3 in a row, last exit status 1" in message and "import PIL.Image" in message
