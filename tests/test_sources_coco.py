"""COCO 2014 val from a base-URL mirror on the loopback server: ranged zip reads, captions, resume."""

from __future__ import annotations

from pathlib import Path

import orjson
from conftest import fetch_env, make_image, read_mds, run_fetch
from fakehub import ServedFile, file_handler, make_zip


def build() -> tuple[bytes, bytes, dict[str, list[str]]]:
    members, images, annotations, kept = [], [], [], {}
    for i in range(7):
        image_id = 42 + i * 7
        name = f"COCO_val2014_{image_id:012d}.jpg"
        small = i == 5
        members.append((f"val2014/{name}", make_image(200 if small else 320, 150 if small else 300, seed=i)))
        images.append({"id": image_id, "file_name": name, "width": 320, "height": 300})
        if i == 6:
            continue  # no caption
        caps = [f"A photo number {i}, caption {j}." for j in range(5 if i else 6)]
        annotations += [{"id": 1000 * i + j, "image_id": image_id, "caption": c} for j, c in enumerate(caps)]
        kept[name] = caps  # small ones too: an FID reference keeps every image
    images_zip = make_zip(members, compress=False)
    captions = orjson.dumps({"info": {}, "images": images, "annotations": annotations})
    big = b"x" * (2 << 20)  # instances_*.json: must never be fetched
    train = {
        "images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}],
        "annotations": [{"id": 1, "image_id": 9, "caption": "a train caption"}],
    }
    anno_zip = make_zip(
        [
            ("annotations/instances_val2014.json", big),
            ("annotations/captions_val2014.json", captions),
            ("annotations/captions_train2014.json", orjson.dumps(train)),
        ],
        compress=False,
    )
    return images_zip, anno_zip, kept


def test_coco_val_captions_and_zip_resume(server, tmp_path: Path) -> None:
    images_zip, anno_zip, kept = build()
    cut = len(images_zip) // 2
    images = ServedFile(images_zip, cut_at=cut)
    server.routes["/mirror/zips/val2014.zip"] = file_handler(images)  # type: ignore[assignment]
    server.routes["/mirror/annotations/annotations_trainval2014.zip"] = file_handler(ServedFile(anno_zip))  # type: ignore[assignment]
    out = tmp_path / "coco2014"
    proc = run_fetch(
        "--allow-private-networks", "--dataset", "coco", "--out", out, "--coco-base-url", server.url("/mirror"), env=fetch_env()
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v[0] for k, v in kept.items()}
    assert {r["key"]: r["captions"] for r in rows} == kept
    assert {r["key"]: r["image_id"] for r in rows} == {k: int(k[-16:-4]) for k in kept}
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["rejected"] == {"no_caption": 1} and stats["kept"] == len(rows), stats
    assert stats["settings"]["min_size"] == 0

    # the broken ranged read resumed from the byte where it broke
    ranges = [h.get("Range", "") for p, h in server.requests if p == "/mirror/zips/val2014.zip"]
    assert any(r.startswith(f"bytes={cut}-") for r in ranges), ranges
    # only the captions member of the annotations zip was read
    anno_bytes = 0
    for p, h in server.requests:
        if p == "/mirror/annotations/annotations_trainval2014.zip":
            a, _, b = h["Range"].removeprefix("bytes=").partition("-")
            anno_bytes += (int(b) - int(a) + 1) if a and b else 1
    assert anno_bytes < (1 << 20), anno_bytes
    assert not list(out.rglob("*.zip")) and not list(out.rglob("*.part"))

    # the unit is numbered by its year
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "coco",
        "--out",
        out,
        "--coco-base-url",
        server.url("/mirror"),
        "--ids",
        "2014",
        env=fetch_env(),
    )
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr


def test_coco_wrong_mirror_is_a_usage_error(server, tmp_path: Path) -> None:
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "coco",
        "--out",
        tmp_path / "c",
        "--coco-base-url",
        server.url("/nowhere"),
        env=fetch_env(),
    )
    assert proc.returncode == 2, proc.stderr
    assert "/nowhere/zips/val2014.zip" in proc.stderr and "Traceback" not in proc.stderr


def test_coco_both_splits_in_one_run_and_min_size_still_applies(server, tmp_path: Path) -> None:
    images_zip, anno_zip, kept = build()
    train_zip = make_zip([("train2014/COCO_train2014_000000000009.jpg", make_image(640, 480, seed=9))], compress=False)
    server.routes["/mirror/zips/val2014.zip"] = file_handler(ServedFile(images_zip))  # type: ignore[assignment]
    server.routes["/mirror/zips/train2014.zip"] = file_handler(ServedFile(train_zip))  # type: ignore[assignment]
    server.routes["/mirror/annotations/annotations_trainval2014.zip"] = file_handler(ServedFile(anno_zip))  # type: ignore[assignment]
    out = tmp_path / "both"
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "coco",
        "--out",
        out,
        "--coco-base-url",
        server.url("/mirror"),
        "--split",
        "train",
        "val",
        "--min-size",
        "256",
        env=fetch_env(),
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    expected = {k: v[0] for k, v in kept.items() if "000000000077" not in k}  # the 200x150 one: --min-size 256
    assert {r["key"]: r["caption"] for r in rows} == {**expected, "COCO_train2014_000000000009.jpg": "a train caption"}
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["rejected"] == {"no_caption": 1, "too_small": 1} and stats["settings"]["split"] == "val+train", stats


def test_split_lists_are_normalised() -> None:
    import pytest

    from fastfetch.errors import UsageError
    from fastfetch.sources.archive_source import splits_of

    def splits(*given: str) -> tuple[str, ...]:
        return splits_of(given or None, ("val", "train"), ("val",), "coco")

    assert splits() == ("val",)
    assert splits("train", "val") == splits("val,train") == splits("train,,val", "train") == ("val", "train")
    for bad, shown in ((("",), "''"), (("test",), "test")):
        with pytest.raises(UsageError, match=f"--split {shown}: --dataset coco has splits val, train"):
            splits(*bad)
