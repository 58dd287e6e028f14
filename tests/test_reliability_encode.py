"""encode/run.py killed (SIGKILL to torchrun and every rank) at random moments, then rerun:
it converges to exactly the dataset an uninterrupted run writes (issue 6)."""

from __future__ import annotations

import random
import subprocess
import time

import pytest

import tests.encode_models as em
from encode import writer

ARGS = ("--chunk-rows", "2", "--batch-size", "2", "--latent-mode", "sample")


@pytest.mark.slow
def test_sigkill_at_random_moments_converges(tmp_path) -> None:
    data, keys = em.image_mds(37)
    reference = str(tmp_path / "reference")
    started = time.monotonic()
    done = em.run_encode(data, reference, *ARGS, nproc=2)
    whole = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    expected = {r["key"]: r for r in em.read_rows(reference)}
    assert sorted(expected) == sorted(keys)

    out = str(tmp_path / "killed")
    rng = random.Random(3)
    kills = 0
    finished: list[set[str]] = []  # finished chunks after each kill: kept, and more of them each time
    while kills < 6:
        before = len(writer.chunk_dirs(out))
        proc = subprocess.Popen(
            em.run_cmd(data, out, *ARGS, nproc=2),
            env=em.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if kills % 2:  # as soon as this run has finished a chunk of its own: mid-chunk, the models loaded
            deadline = time.monotonic() + whole * 2
            while len(writer.chunk_dirs(out)) <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        else:  # within a whole run's duration: start-up, model loading, mid-chunk, merge
            time.sleep(rng.uniform(0.15, 0.75) * whole)
        if proc.poll() is not None:
            assert proc.returncode == 0
            break
        em.kill_tree(proc.pid)
        proc.wait()
        kills += 1
        finished.append(set(writer.chunk_dirs(out)))
    assert kills >= 5
    assert all(a <= b for a, b in zip(finished, finished[1:])), "a finished chunk was redone or lost"
    assert len({len(f) for f in finished}) >= 3, [len(f) for f in finished]  # the work progressed
    final = em.run_encode(data, out, *ARGS, nproc=2)
    assert final.returncode == 0, final.stderr
    rows = em.read_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(keys)  # one row per input, none twice
    for r in rows:  # seeded per key, batch-independent: the same bytes as the uninterrupted run
        ref = expected[r["key"]]
        assert r["caption"] == ref["caption"]
        for column in ("caption_latents", "latents_64", "latents_128"):
            assert r[column] == ref[column], (r["key"], column)
