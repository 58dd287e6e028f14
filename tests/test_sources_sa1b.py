"""SA-1B through a links file on the loopback server, captions from the fake hub's tar.gz."""

from __future__ import annotations

from pathlib import Path

import orjson
from conftest import fetch_env, make_image, read_mds, run_fetch
from fakehub import FakeHub, ServedFile, file_handler, make_tar

CAPTION_REPO = "PixArt-alpha/SAM-LLaVA-Captions10M"


def sa1b_tar(n: int) -> tuple[bytes, dict[str, str], list[tuple[str, str]]]:
    """sa_N.jpg + sa_N.json pairs: 4 captioned, 1 too small, 1 without a caption."""
    members: list[tuple[str, bytes]] = []
    captions: dict[str, str] = {}
    planted: list[tuple[str, str]] = []
    for i in range(6):
        image_id = n * 1000 + i + 1
        key = f"sa_{image_id}"
        small = i == 4
        members.append((f"{key}.jpg", make_image(200 if small else 320, 180 if small else 300, seed=image_id)))
        members.append(
            (f"{key}.json", orjson.dumps({"image": {"image_id": image_id}, "annotations": [{"segmentation": "x" * 5000}]}))
        )
        if i != 5:
            text = f"The image shows scene {image_id} with a lot of detail."
            planted.append((key, text))
            if not small:
                captions[key] = text
    return make_tar(members), captions, planted


def test_sa1b_links_captions_selection(server, tmp_path: Path) -> None:
    hub = FakeHub(server)
    all_captions: dict[str, str] = {}
    planted: list[tuple[str, str]] = []
    lines = ["file_name\tcdn_link"]
    for n in range(3):
        data, caps, plant = sa1b_tar(n)
        all_captions.update(caps)
        planted += plant
        server.routes[f"/sa1b/sa_{n:06d}.tar"] = file_handler(ServedFile(data))  # type: ignore[assignment]
        lines.append(f"sa_{n:06d}.tar\t{server.url(f'/sa1b/sa_{n:06d}.tar')}?Policy=abc&Signature=xyz")
    hub.add(
        CAPTION_REPO,
        "SA1B_caption.tar.gz",
        make_tar([(f"SA1B_caption/{k}.txt", v.encode()) for k, v in planted] + [("SA1B_caption/readme.md", b"x")], gz=True),
    )
    env = fetch_env(HF_ENDPOINT=hub.endpoint)
    out = tmp_path / "sa1b"

    # no links file: exit 2 with the download page
    proc = run_fetch("--allow-private-networks", "--dataset", "sa1b", "--out", out, env=env)
    assert proc.returncode == 2
    assert "https://ai.meta.com/datasets/segment-anything-downloads/" in proc.stderr

    # the default --links: segment_anything_links.txt in --out; --subset small = sa_000000
    out.mkdir(parents=True, exist_ok=True)
    (out / "segment_anything_links.txt").write_text("\n".join(lines) + "\n")
    proc = run_fetch("--allow-private-networks", "--dataset", "sa1b", "--out", out, "--subset", "small", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v for k, v in all_captions.items() if int(k[3:]) < 1000}
    assert all(r["image_id"] == int(r["key"][3:]) for r in rows)
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["rejected"] == {"no_caption": 1, "too_small": 1} and stats["kept"] == len(rows), stats

    # --ids 2 with an explicit --links (fresh signatures: same units, nothing redone)
    links = tmp_path / "links.txt"
    links.write_text("\n".join(line.replace("Signature=xyz", "Signature=new") for line in lines) + "\n")
    proc = run_fetch("--allow-private-networks", "--dataset", "sa1b", "--out", out, "--links", links, "--ids", "0", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v for k, v in all_captions.items() if int(k[3:]) // 1000 in (0, 2)}
    assert server.hits["/sa1b/sa_000000.tar"] == 1 and server.hits["/sa1b/sa_000001.tar"] == 0
    assert server.hits[hub.resolve_path(CAPTION_REPO, "SA1B_caption.tar.gz")] == 1, "captions downloaded twice"

    # an expired link (403 from the CDN): the unit fails with a message saying where to get fresh links
    async def expired(request):  # type: ignore[no-untyped-def]
        from aiohttp import web

        return web.Response(status=403, text="Request has expired")

    server.routes["/sa1b/sa_000001.tar"] = expired  # type: ignore[assignment]
    proc = run_fetch("--allow-private-networks", "--dataset", "sa1b", "--out", out, "--links", links, "--ids", "1", env=env)
    assert proc.returncode == 1, proc.stderr
    failed = orjson.loads((out / "stats.json").read_bytes())["failed_units"]
    assert "https://ai.meta.com/datasets/segment-anything-downloads/" in failed["sa_000001"], failed
