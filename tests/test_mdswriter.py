"""fastfetch's MDS writer produces the very files streaming's MDSWriter produces."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from streaming import MDSWriter as StreamingWriter
from streaming import StreamingDataset

from fastfetch.mds import BASE_COLUMNS
from fastfetch.mdswriter import MDSWriter
from tests.conftest import make_image

COLUMNS = {**BASE_COLUMNS, "url": "str", "score": "float64", "captions": "json", "n": "int64"}


def _samples(n: int) -> list[dict]:
    images = [make_image(300 + 20 * i, 280, seed=i) for i in range(5)]
    return [
        {
            "jpg": images[i % 5],
            "caption": f"caption {i} ünïcode",
            "width": 300 + i,
            "height": 280,
            "original_width": 900,
            "original_height": 840,
            "key": f"{i:06d}",
            "url": f"http://example.com/{i}.jpg",
            "score": math.nan if i % 7 == 0 else i / 3,
            "captions": ["a", {"b": i}],
            "n": -i,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("background", [False, True])  # shards written by the caller; by the writer's thread
@pytest.mark.parametrize("size_limit", [1 << 26, 40_000])  # one shard; many shards
def test_byte_identical_to_streaming(tmp_path: Path, size_limit: int, background: bool) -> None:
    samples = _samples(60)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    writer = MDSWriter(str(ours), COLUMNS, hashes=["sha1", "xxh64"], size_limit=size_limit, background=background)
    with StreamingWriter(out=str(theirs), columns=COLUMNS, hashes=["sha1", "xxh64"], size_limit=size_limit) as reference:
        for sample in samples:
            writer.write(sample)
            reference.write(sample)
    writer.finish()
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names and len(names) >= 2
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name

    ds = StreamingDataset(local=str(ours), shuffle=False, batch_size=1)
    assert [ds[i]["key"] for i in range(len(ds))] == [s["key"] for s in samples]
    assert ds[3]["captions"] == ["a", {"b": 3}] and ds[3]["n"] == -3 and ds[5]["caption"] == "caption 5 ünïcode"


def test_a_body_in_pieces_is_stored_as_its_bytes(tmp_path: Path) -> None:
    samples = _samples(12)
    joined, pieces = MDSWriter(str(tmp_path / "joined"), COLUMNS), MDSWriter(str(tmp_path / "pieces"), COLUMNS)
    for sample in samples:
        joined.write(sample)
        jpg = memoryview(sample["jpg"])
        pieces.write({**sample, "jpg": (jpg[:100], bytes(jpg[100:1000]), jpg[1000:])})
    joined.finish()
    pieces.finish()
    for name in sorted(p.name for p in (tmp_path / "joined").iterdir()):
        assert (tmp_path / "pieces" / name).read_bytes() == (tmp_path / "joined" / name).read_bytes(), name


def test_a_tuple_in_a_json_column_is_json_not_pieces(tmp_path: Path) -> None:
    writer = MDSWriter(str(tmp_path), COLUMNS)
    writer.write({**_samples(1)[0], "captions": ("a", "b")})
    writer.finish()
    assert StreamingDataset(local=str(tmp_path), shuffle=False, batch_size=1)[0]["captions"] == ["a", "b"]


def test_unsupported_encoding_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not supported"):
        MDSWriter(str(tmp_path), {"x": "pkl"})


def test_a_shard_the_thread_cannot_write_fails_the_writer(tmp_path: Path) -> None:
    """A full disk in the writer's thread reaches the caller (at the next shard or at finish),
    never a silently missing shard."""
    writer = MDSWriter(str(tmp_path / "w"), COLUMNS, size_limit=40_000, background=True)
    (tmp_path / "w").rmdir()  # the folder is gone: the first shard's write fails
    samples = iter(_samples(60))
    with pytest.raises(FileNotFoundError):
        for sample in samples:
            writer.write(sample)
    (tmp_path / "w").mkdir()  # later shards could be written again: the writer stays failed all the same
    for call in (lambda: writer.write(next(samples)), writer.finish):
        with pytest.raises(FileNotFoundError):
            call()
    assert not (tmp_path / "w" / "index.json").exists()


@pytest.mark.parametrize("background", [False, True])
def test_dropped_samples_leave_the_same_files_as_never_writing_them(tmp_path: Path, background: bool) -> None:
    """--dedup drops samples after they were written: the shards holding them are written again,
    byte for byte what streaming writes for the samples kept, shard for shard; a shard left
    empty goes."""
    samples = _samples(40)
    ours = MDSWriter(str(tmp_path / "ours"), COLUMNS, hashes=["xxh64"], size_limit=40_000, background=background)
    for sample in samples:
        ours.write(sample)
    ours.flush()  # as a unit waiting for its turn: everything on disk first
    per_shard = [s["samples"] for s in ours.shards]
    assert len(per_shard) >= 4 and per_shard[1] >= 2
    first_of = [sum(per_shard[:i]) for i in range(len(per_shard))]
    emptied = set(range(first_of[1], first_of[1] + per_shard[1]))  # all of the second shard
    drop = {0, first_of[2], first_of[3] - 1, first_of[3] + 1, len(samples) - 1} | emptied  # shards' first and last samples
    ours.finish(drop)

    ds = StreamingDataset(local=str(tmp_path / "ours"), shuffle=False, batch_size=1)
    assert [ds[i]["key"] for i in range(len(ds))] == [s["key"] for i, s in enumerate(samples) if i not in drop]
    assert "shard.00001.mds" not in {p.name for p in (tmp_path / "ours").iterdir()}
    for shard in ours.shards:  # each rewritten shard: streaming's file for its kept samples
        index = int(shard["raw_data"]["basename"].split(".")[1])
        kept = [s for i, s in enumerate(samples) if first_of[index] <= i < first_of[index] + per_shard[index] and i not in drop]
        alone = tmp_path / f"ref{index}"
        with StreamingWriter(out=str(alone), columns=COLUMNS, hashes=["xxh64"], size_limit=40_000) as reference:
            for s in kept:
                reference.write(s)
        theirs = (alone / "shard.00000.mds").read_bytes()
        assert (tmp_path / "ours" / shard["raw_data"]["basename"]).read_bytes() == theirs
        assert shard["samples"] == len(kept) and shard["raw_data"]["bytes"] == len(theirs)
