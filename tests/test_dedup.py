"""Content dedup while downloading (--dedup exact|near): planted duplicates within a unit, across
units and across two datasets sharing an index; the first in plan order wins whichever download
finishes first; a killed run resumes to the uninterrupted run's result."""

from __future__ import annotations

import asyncio
import io
import random
import sqlite3
import time
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from tests.conftest import LoopbackServer, make_image, read_mds, run_fetch, start_fetch
from tests.test_fetch_urls import stats_of, write_list
from tests.test_reliability import _done_units, _kill_when, _validate_shards

NET = ("--allow-private-networks", "--workers", "1", "--unit-size", "5")

# five units of five rows; each number is an image (byte-identical wherever it repeats)
PLAN = [0, 1, 2, 1, 3] + [4, 0, 5, 6, 2] + [7, 8, 3, 9, 10] + [11, 5, 5, 0, 1] + [7, 11, 4, 6, 8]


def _serve(server: LoopbackServer, prefix: str, plan: list[int], first_delay: float) -> list[dict[str, str]]:
    """Row j at ``<prefix>/<j>.jpg`` serves image ``plan[j]``; an image's first row answers after
    ``first_delay`` s, its copies at once (so later copies finish first)."""
    images = {n: make_image(300 + 40 * (n % 5), 280 + 90 * (n % 3), seed=1000 + n) for n in set(plan)}
    first = {n: plan.index(n) for n in set(plan)}

    def handler(j: int) -> object:
        async def answer(request: web.Request) -> web.Response:
            if first[plan[j]] == j:
                await asyncio.sleep(first_delay)
            return web.Response(body=images[plan[j]], content_type="image/jpeg")

        return answer

    for j in range(len(plan)):
        server.routes[f"{prefix}/{j}.jpg"] = handler(j)  # type: ignore[assignment]
    return [{"url": server.url(f"{prefix}/{j}.jpg"), "caption": f"r{j}"} for j in range(len(plan))]


def _captions(out: Path) -> list[str]:
    return sorted(r["caption"] for r in read_mds(out / "mds"))


def _firsts(plan: list[int]) -> list[str]:
    return sorted(f"r{plan.index(n)}" for n in set(plan))


def test_the_first_in_plan_order_wins_within_and_across_units(tmp_path: Path, server: LoopbackServer) -> None:
    listing = write_list(tmp_path / "a.jsonl", _serve(server, "/a", PLAN, first_delay=0.4))
    out = tmp_path / "a"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--dedup", "exact", "--hashes", "sha256", *NET)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert sorted(r["caption"] for r in rows) == _firsts(PLAN)  # the delayed first copies, not the quick later ones
    assert len({r["sha256"] for r in rows}) == len(rows) == 12
    stats = stats_of(out)
    assert stats["kept"] == 12 and stats["rejected"] == {"duplicate_content": len(PLAN) - 12}
    assert "duplicate_content" in proc.stderr  # the summary names the reason
    _validate_shards(out / "mds")  # shards written again without their duplicates are whole
    db = sqlite3.connect(out / "manifest.sqlite")
    per_unit = [orjson_loads(c) for (c,) in db.execute("SELECT counts FROM units ORDER BY ord")]
    assert [u.get("duplicate_content", 0) for u in per_unit] == [1, 2, 1, 4, 5]
    index = sqlite3.connect(out / "dedup.sqlite")
    assert index.execute("SELECT COUNT(*) FROM exact").fetchone()[0] == 12

    again = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--dedup", "exact", "--hashes", "sha256", *NET)
    assert again.returncode == 0 and "nothing to do" in again.stderr and _captions(out) == _firsts(PLAN)
    plain = tmp_path / "plain"
    assert run_fetch("--dataset", "urls", "--urls", listing, "--out", plain, *NET).returncode == 0
    assert len(_captions(plain)) == len(PLAN)  # off by default
    changed = run_fetch("--dataset", "urls", "--urls", listing, "--out", plain, "--dedup", "exact", *NET)
    assert changed.returncode == 2 and "dedup: None → 'exact'" in changed.stderr, changed.stderr


def test_two_datasets_sharing_an_index(tmp_path: Path, server: LoopbackServer) -> None:
    """B keeps only what A (listed with the same --dedup-index) did not keep; a dataset rebuilt
    from scratch under the same --out takes its own entries back, never another's."""
    shared = tmp_path / "shared" / "index.sqlite"
    plan_a, plan_b = [0, 1, 2, 3], [12, 0, 13, 3, 12]
    a = write_list(tmp_path / "a.jsonl", _serve(server, "/a", plan_a, first_delay=0))
    b = write_list(tmp_path / "b.jsonl", _serve(server, "/b", [n if n >= 12 else n for n in plan_b], first_delay=0))
    server.routes.update({f"/b/{j}.jpg": server.routes[f"/a/{plan_a.index(n)}.jpg"] for j, n in enumerate(plan_b) if n < 12})
    dedup = ("--dedup", "exact", "--dedup-index", shared, *NET)

    assert run_fetch("--dataset", "urls", "--urls", a, "--out", tmp_path / "A", *dedup).returncode == 0
    proc = run_fetch("--dataset", "urls", "--urls", b, "--out", tmp_path / "B", *dedup)
    assert proc.returncode == 0, proc.stderr
    assert _captions(tmp_path / "B") == ["r0", "r2"]  # 12 and 13: A kept 0 and 3, and 12 repeats in B
    assert stats_of(tmp_path / "B")["rejected"] == {"duplicate_content": 3}
    assert not (tmp_path / "B" / "dedup.sqlite").exists()

    alone = run_fetch("--dataset", "urls", "--urls", b, "--out", tmp_path / "B2", "--dedup", "exact", *NET)
    assert alone.returncode == 0 and _captions(tmp_path / "B2") == ["r0", "r1", "r2", "r3"]  # its own index only

    import shutil

    shutil.rmtree(tmp_path / "A")  # rebuilt from scratch: A's old entries are not "kept before"
    assert run_fetch("--dataset", "urls", "--urls", a, "--out", tmp_path / "A", *dedup).returncode == 0
    assert _captions(tmp_path / "A") == ["r0", "r1", "r2", "r3"]
    db = sqlite3.connect(shared)
    places = dict(db.execute("SELECT place, COUNT(*) FROM exact JOIN owners USING (owner) GROUP BY place").fetchall())
    assert places == {str((tmp_path / "A").resolve()): 4, str((tmp_path / "B").resolve()): 2}

    replaced = tmp_path / "replaced.sqlite"
    assert (
        run_fetch(
            "--dataset", "urls", "--urls", a, "--out", tmp_path / "R", *dedup[:2], "--dedup-index", replaced, *NET
        ).returncode
        == 0
    )
    replaced.unlink()
    for bad, says in (
        (("--dedup-index", shared), "add --dedup exact"),
        (("--dedup", "exact", "--num-nodes", "2", "--node-rank", "0"), "one machine"),
        (("--dedup", "exact", "--dedup-index", tmp_path), "cannot be used as a dedup index"),
        (("--dedup", "exact", "--dedup-index", tmp_path / "A" / "manifest.sqlite"), "tables of something else"),
        (("--dedup", "near", "--dedup-index", shared), "one of --dedup exact"),
        (("--dedup", "exact", "--dedup-index", "s3://bucket/index.sqlite"), "a path, not a URL"),
        (("--dedup", "exact", "--dedup-index", ""), "needs a file name"),
        (("--dedup", "exact", "--dedup-index", tmp_path / "bad" / "mds" / "i.sqlite"), "inside the dataset's MDS folder"),
    ):
        proc = run_fetch("--dataset", "urls", "--urls", a, "--out", tmp_path / "bad", *bad, "--allow-private-networks")
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_fetch("--dataset", "urls", "--urls", a, "--out", tmp_path / "R", *dedup[:2], "--dedup-index", replaced, *NET)
    assert proc.returncode == 2 and "deleted or replaced" in proc.stderr, proc.stderr  # not silently a new, empty index


def test_runs_sharing_an_index_at_once_never_both_keep_an_image(tmp_path: Path, server: LoopbackServer) -> None:
    """A unit's kept images enter the index in the transaction that judged them: two datasets
    of the same images, run at the same time, split them between them."""
    images = [make_image(300 + i % 7 * 10, 300 + i % 5 * 10, seed=5000 + i) for i in range(24)]

    def on_tick(body: bytes) -> object:
        async def answer(request: web.Request) -> web.Response:  # answers on 0.2 s ticks: units of both runs finish together
            await asyncio.sleep(0.2 - time.time() % 0.2)
            return web.Response(body=body, content_type="image/jpeg")

        return answer

    procs = []
    for name in "AB":
        for i, body in enumerate(images):
            server.routes[f"/{name}/{i}.jpg"] = on_tick(body)  # type: ignore[assignment]
        rows = [{"url": server.url(f"/{name}/{i}.jpg"), "caption": f"{name}{i}"} for i in range(24)]
        args = ("--urls", write_list(tmp_path / f"{name}.jsonl", rows), "--out", tmp_path / name, "--hashes", "sha256")
        procs.append(start_fetch("--dataset", "urls", *args, "--dedup", "exact", "--dedup-index", tmp_path / "i.sqlite", *NET))
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    kept = [{r["sha256"] for r in read_mds(tmp_path / name / "mds")} for name in "AB"]
    assert not kept[0] & kept[1] and len(kept[0] | kept[1]) == 24


def test_an_edited_list_is_judged_against_its_new_plan(tmp_path: Path, server: LoopbackServer) -> None:
    """The first unit gains a copy of an image a far unit kept before the list was edited, and
    that unit loses it: the copy is kept, because a changed unit leaves the index before any
    unit is judged (the whole plan is recorded first)."""
    plan = list(range(80))
    x = make_image(333, 333, seed=4242)
    rows = _serve(server, "/e", plan, first_delay=0.05)
    server.routes["/e/x-old.jpg"] = server.routes["/e/x-new.jpg"] = x
    rows[78] = {"url": server.url("/e/x-old.jpg"), "caption": "X, last unit"}
    args = ("--dataset", "urls", "--dedup", "exact", "--allow-private-networks", "--workers", "1", "--unit-size", "2")
    out = tmp_path / "o"
    assert run_fetch(*args, "--urls", write_list(tmp_path / "l1.jsonl", rows), "--out", out).returncode == 0
    edited = [dict(r) for r in rows]
    edited[0] = {"url": server.url("/e/x-new.jpg"), "caption": "X, first unit"}
    for row in edited[2:36]:
        row["caption"] += " (edited)"
    edited[78] = {"url": server.url("/e/0.jpg"), "caption": "no longer X"}
    proc = run_fetch(*args, "--urls", write_list(tmp_path / "l2.jsonl", edited), "--out", out)
    assert proc.returncode == 0, proc.stderr
    captions = _captions(out)
    assert "X, first unit" in captions and "X, last unit" not in captions


def test_a_moved_dataset_keeps_its_entries_and_an_edit_reopens_what_it_dropped(tmp_path: Path, server: LoopbackServer) -> None:
    """The index knows a dataset by the id its manifest keeps, not by its folder: moved, it
    resumes as itself. An edited unit that had kept an image reopens the units that dropped
    their copies of it: one of them keeps it now."""
    import shutil

    plan = [0, 1, 2, 3] + [4, 0, 5, 6] + [7, 8, 9, 10]
    rows = _serve(server, "/m", plan, first_delay=0)
    args = ("--dataset", "urls", "--dedup", "exact", "--allow-private-networks", "--workers", "1", "--unit-size", "4")
    assert run_fetch(*args, "--urls", write_list(tmp_path / "l1.jsonl", rows), "--out", tmp_path / "a").returncode == 0
    assert "r5" not in _captions(tmp_path / "a")  # unit 1's copy of image 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    server.routes["/m/new.jpg"] = make_image(290, 310, seed=99)
    edited = [dict(r) for r in rows]
    edited[0] = {"url": server.url("/m/new.jpg"), "caption": "image 0 replaced"}
    proc = run_fetch(*args, "--urls", write_list(tmp_path / "l2.jsonl", edited), "--out", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    fresh = tmp_path / "fresh"
    assert run_fetch(*args, "--urls", tmp_path / "l2.jsonl", "--out", fresh).returncode == 0
    assert _captions(tmp_path / "b") == _captions(fresh) and "r5" in _captions(fresh)
    assert stats_of(tmp_path / "b")["rejected"] == stats_of(fresh)["rejected"] == {}


def test_a_waiting_scheduler_wakes_for_a_release_made_before_it_first_ran() -> None:
    from fastfetch.dedup import JudgeOrder

    async def main() -> None:
        order = JudgeOrder()
        first, second = order.take(), order.take()
        woken = asyncio.create_task(order.moved())  # its event is the one current now
        order.release(first)
        await asyncio.wait_for(woken, 5)
        await asyncio.wait_for(order.turn(second), 5)

    asyncio.run(main())


def orjson_loads(text: str) -> dict:
    import orjson

    return orjson.loads(text)


@pytest.mark.slow
def test_a_killed_deduplicating_run_resumes_to_the_same_result(tmp_path: Path, server: LoopbackServer) -> None:
    rng = random.Random(3)
    plan = [rng.randrange(30) for _ in range(80)]  # 16 units, copies everywhere
    listing = write_list(tmp_path / "l.jsonl", _serve(server, "/k", plan, first_delay=0.3))
    args = ("--dataset", "urls", "--urls", listing, "--dedup", "exact", "--concurrency", "4", *NET)
    clean = tmp_path / "clean"
    assert run_fetch(*args, "--out", clean).returncode == 0
    assert _captions(clean) == _firsts(plan)

    out = tmp_path / "killed"
    kills = 0
    for _ in range(4):
        before = _done_units(out)
        proc = start_fetch(*args, "--out", out)
        if _kill_when(proc, lambda: _done_units(out) > before, 60, every=0.01):
            time.sleep(rng.uniform(0.0, 0.5))
            proc.kill()
            proc.wait()
            kills += 1
    assert kills >= 3 and _done_units(out) < 16
    final = run_fetch(*args, "--out", out)
    assert final.returncode == 0, final.stderr
    assert _captions(out) == _captions(clean)
    assert stats_of(out)["rejected"] == stats_of(clean)["rejected"] == {"duplicate_content": len(plan) - len(set(plan))}
    index = sqlite3.connect(out / "dedup.sqlite")
    assert index.execute("SELECT COUNT(*) FROM exact").fetchone()[0] == len(set(plan))
    _validate_shards(out / "mds")


def _photo(seed: int) -> Image.Image:
    """A picture with detail at every scale (a perceptual hash needs more than a smooth blob)."""
    rng = random.Random(seed)
    im = Image.new("RGB", (480, 400))
    for size in (16, 8, 4):
        layer = Image.new("RGB", (size, size))
        layer.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size * size)])
        im = Image.blend(im, layer.resize(im.size, Image.Resampling.BICUBIC), 0.5)
    return im


def _shirt(colour: str) -> Image.Image:
    from PIL import ImageDraw

    im = Image.new("RGB", (400, 400), "white")
    outline = [(100, 80), (300, 80), (360, 160), (300, 180), (300, 360), (100, 360), (100, 180), (40, 160)]
    ImageDraw.Draw(im).polygon(outline, fill=colour)
    return im


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_near_duplicates(tmp_path: Path, server: LoopbackServer) -> None:
    """Re-encoded, resized and slightly cropped copies are near duplicates of the image kept
    before them; a byte-identical copy is an exact one; distinct pictures are all kept."""
    bases = [_photo(s) for s in range(4)]
    bodies = [_jpeg(im) for im in bases]
    for im in bases[:2]:
        w, h = im.size
        bodies += [
            _jpeg(im, 60),
            _jpeg(im.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BICUBIC)),
            _jpeg(im.crop((5, 4, w - 5, h - 4))),
        ]
    bodies.append(bodies[0])
    bodies += [_jpeg(Image.new("RGB", (300, 300), colour)) for colour in ("white", "red")]  # too plain for a phash: bytes only
    bodies += [_jpeg(_shirt(colour)) for colour in ("red", "blue")]  # one shape, two colours: two images
    for j, body in enumerate(bodies):
        server.routes[f"/n/{j}.jpg"] = body
    listing = write_list(
        tmp_path / "l.jsonl", [{"url": server.url(f"/n/{j}.jpg"), "caption": f"r{j}"} for j in range(len(bodies))]
    )
    out = tmp_path / "o"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--dedup", "near", *NET)
    assert proc.returncode == 0, proc.stderr
    assert _captions(out) == ["r0", "r1", "r11", "r12", "r13", "r14", "r2", "r3"]
    assert stats_of(out)["rejected"] == {"near_duplicate": 6, "duplicate_content": 1}
    exact = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "e", "--dedup", "exact", *NET)
    assert exact.returncode == 0 and len(_captions(tmp_path / "e")) == len(bodies) - 1  # exact: only the same bytes


def test_the_near_search_finds_what_comparing_every_code_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HammingIndex`` (tables by 16-bit substring, plus recent codes compared in full) answers
    exactly as the exhaustive comparison, at and around the radius."""
    import numpy as np

    from fastfetch import nearsearch

    monkeypatch.setattr(nearsearch, "FOLD_AT", 700)  # codes both in the tables and recent
    rng = random.Random(11)
    stored = [rng.getrandbits(64) for _ in range(2000)]
    stored += [s ^ (0xFFFF << 16 * (i % 4)) for i, s in enumerate(stored[:50])]  # far in one substring only
    index = nearsearch.HammingIndex(10)
    for i in range(0, len(stored), 300):
        index.add(np.array(stored[i : i + 300], dtype=np.uint64))
        index.near(stored[i])  # a question folds what was added (at 700 codes or more)
    assert len(index) == len(stored) and len(index._tabled) >= 1400 and index._recent_n
    queries = [rng.getrandbits(64) for _ in range(200)]
    for k in range(0, 16):  # a stored code with k bits flipped, spread over the substrings or in one
        for s in rng.sample(stored, 12):
            spread = s ^ sum(1 << b for b in rng.sample(range(64), k))
            packed = s ^ ((1 << k) - 1) << rng.choice([0, 16, 32, 48 - max(k - 16, 0)])
            queries += [spread, packed & (2**64 - 1)]
    expected = [min((q ^ s).bit_count() for s in stored) <= 10 for q in queries]
    assert [index.near(q) for q in queries] == expected
    assert 0 < sum(expected) < len(queries)
