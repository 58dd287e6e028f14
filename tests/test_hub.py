"""fastfetch.hub's URLs and tokens agree with huggingface_hub's own functions.

hub.py builds them from huggingface_hub.constants to keep requests & co. off the start-up
path; these tests hold it to the library's answers for the same settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants, hf_hub_url
from huggingface_hub.utils import build_hf_headers

from fastfetch import hub


@pytest.mark.parametrize(
    ("repo", "path", "revision"),
    [
        ("PixArt-alpha/SAM-LLaVA-Captions10M", "SA1B_caption.tar.gz", "main"),
        ("poloclub/diffusiondb", "images/part-000001.zip", "refs/pr/3"),
        ("org/name", "dir with space/ünïcode#?.json", "v1.0"),
    ],
)
def test_file_urls_are_the_libraries(repo: str, path: str, revision: str) -> None:
    assert hub.file_url(repo, path, revision) == hf_hub_url(repo, path, repo_type="dataset", revision=revision)


@pytest.mark.parametrize(
    ("env", "file", "disabled"),
    [
        ({}, None, False),  # no token anywhere
        ({"HF_TOKEN": "hf_env"}, "hf_file\n", False),  # the environment wins over the file
        ({"HF_TOKEN": "  \n"}, "hf_file\n", False),  # a blank variable falls through to the file
        ({"HUGGING_FACE_HUB_TOKEN": "hf_old"}, None, False),  # the legacy variable
        ({}, " hf_file\r\n", False),  # the cached login, cleaned
        ({"HF_TOKEN": "hf_env"}, "hf_file", True),  # HF_HUB_DISABLE_IMPLICIT_TOKEN: nothing is sent
    ],
)
def test_tokens_are_the_libraries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], file: str | None, disabled: bool
) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    token_path = tmp_path / "token"
    if file is not None:
        token_path.write_text(file)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_path))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", disabled)
    expected = build_hf_headers().get("authorization")
    assert hub.headers().get("authorization") == expected
    assert (expected is None) == (hub.token() is None)
