"""One answer to "is this path remote?" for the fetch and the encoder alike."""

from __future__ import annotations

import pytest

from fastfetch.storage import is_remote


@pytest.mark.parametrize(
    ("path", "remote"),
    [
        ("s3://bucket/prefix", True),
        ("gs://b/p", True),
        ("hf://datasets/org/repo", True),
        ("dbfs:/Volumes/x", True),
        ("https://example.com/data", True),  # Streaming reads it; the fetch refuses to write there (storage.check)
        ("http://127.0.0.1:8000/x", True),
        ("data/run:1", False),  # a colon inside a local name is no scheme
        ("/tmp/out", False),
        ("relative/out", False),
        ("file:///tmp/out", False),
    ],
)
def test_is_remote(path: str, remote: bool) -> None:
    assert is_remote(path) is remote


def test_a_web_server_is_no_output(tmp_path) -> None:
    from tests.conftest import run_fetch

    proc = run_fetch("--dataset", "demo", "--out", "https://example.com/data", "--local-cache", tmp_path)
    assert proc.returncode == 2 and "not to a web server" in proc.stderr, proc.stderr
