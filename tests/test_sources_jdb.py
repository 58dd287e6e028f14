"""JourneyDB through a gated fake hub: the login message, prompts joined by file name, splits, --ids."""

from __future__ import annotations

from pathlib import Path

import orjson
from conftest import fetch_env, make_image, read_mds, run_fetch
from fakehub import FakeHub, make_tar

REPO = "JourneyDB/JourneyDB"
TOKEN = "hf_fake_token_for_tests"


def build(hub: FakeHub, split: str, units: int, anno: str) -> dict[str, str]:
    """Image tgz units (4 prompted, 1 too small, 1 without an annotation) and the annotation tgz."""
    kept: dict[str, str] = {}
    records = []
    for n in range(units):
        members = []
        for i in range(6):
            name = f"{split[0]}{n:03d}{i:02d}abcdef"
            small = i == 4
            members.append((f"{n:03d}/{name}.jpg", make_image(100 if small else 300, 90 if small else 260, seed=n * 10 + i)))
            if i != 5:
                prompt = f"a midjourney picture {split} {n} {i} --ar 16:9"
                records.append({"img_path": f"./{n:03d}/{name}.jpg", "prompt": prompt, "Task2": {"Caption": "x"}})
                if not small:
                    kept[name] = prompt
        hub.add(REPO, f"data/{split}/imgs/{n:03d}.tgz", make_tar(members, gz=True))
    jsonl = b"\n".join(orjson.dumps(r) for r in records) + b"\n"
    hub.add(REPO, anno, make_tar([(anno.rsplit("/", 1)[-1].removesuffix(".tgz"), jsonl)], gz=True))
    return kept


def test_jdb_gated_prompts_splits(server, tmp_path: Path) -> None:
    hub = FakeHub(server)
    train = build(hub, "train", 3, "data/train/train_anno_realease_repath.jsonl.tgz")
    valid = build(hub, "valid", 1, "data/valid/valid_anno_repath.jsonl.tgz")
    hub.gate(REPO, TOKEN)

    # no token: exit 2 naming the dataset page and how to log in; wrong token: the same
    for env in (fetch_env(HF_ENDPOINT=hub.endpoint), fetch_env(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_wrong")):
        proc = run_fetch("--allow-private-networks", "--dataset", "jdb", "--out", tmp_path / "denied", env=env)
        assert proc.returncode == 2, proc.stderr
        assert f"{hub.endpoint}/datasets/{REPO}" in proc.stderr and "huggingface-cli login" in proc.stderr
        assert "HF_TOKEN" in proc.stderr

    env = fetch_env(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN)
    out = tmp_path / "jdb"
    proc = run_fetch("--allow-private-networks", "--dataset", "jdb", "--out", out, "--ids", "0", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v for k, v in train.items() if k[1:4] in ("000", "001")}
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["rejected"] == {"no_caption": 2, "too_small": 2} and stats["kept"] == len(rows), stats
    assert server.hits[hub.resolve_path(REPO, "data/train/imgs/002.tgz")] == 0

    # another split into the same --out is refused; into its own --out it works
    proc = run_fetch("--allow-private-networks", "--dataset", "jdb", "--out", out, "--split", "valid", env=env)
    assert proc.returncode == 2 and "split" in proc.stderr
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "jdb",
        "--out",
        tmp_path / "valid",
        "--split",
        "valid",
        "--subset",
        "small",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert {r["key"]: r["caption"] for r in read_mds(tmp_path / "valid" / "mds")} == valid

    # both splits in one run, as the seed prepares them: unit ids carry the split
    both = tmp_path / "both"
    args = ("--allow-private-networks", "--dataset", "jdb", "--out", both, "--split", "train", "valid", "--keep-archives")
    proc = run_fetch(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert {r["key"]: r["caption"] for r in read_mds(both / "mds")} == {**train, **valid}
    kept = sorted(p.name for p in (both / "_archives" / "jdb").glob("*.tgz") if "anno" not in p.name)
    assert kept == ["000.tgz", "001.tgz", "002.tgz", "valid-000.tgz"]  # train's and valid's 000.tgz apart
    assert sorted(p.name for p in (both / "mds").iterdir() if p.is_dir()) == ["train-000", "train-001", "train-002", "valid-000"]
    stats = orjson.loads((both / "stats.json").read_bytes())
    assert stats["settings"]["split"] == "train+valid" and stats["units"]["done"] == 4, stats
