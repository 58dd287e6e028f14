"""Hugging Face Hub addresses, tokens and listings via huggingface_hub; the bytes go through us.

huggingface_hub decides the endpoint (``HF_ENDPOINT``), the token (``HF_TOKEN`` or the cached
``huggingface-cli login``) and the URL layout, so a mirror or a token works exactly as it does
for the hub's own tools; the downloads themselves use our session (resumable, bounded, streamed
into archives) rather than hf_hub_download's cache of whole files.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fastfetch import __version__
from fastfetch.errors import UsageError
from fastfetch.http import Fetcher, Refused

DEFAULT_REVISION = "main"


@dataclass(frozen=True, slots=True)
class HubFile:
    """A file of a dataset repository: its path and what identifies its version."""

    path: str
    size: int
    oid: str  # the LFS sha256 when stored in LFS, else the git blob id


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def dataset_page(repo: str) -> str:
    return f"{endpoint()}/datasets/{repo}"


# URLs and tokens come from huggingface_hub's constants module (~10 ms to import) rather than
# from ``hf_hub_url`` and ``build_hf_headers``: those bring requests and the rest of
# huggingface_hub.utils (~100 ms) onto the start-up path of every run that downloads a side
# file such as a caption archive, while the resize workers wait for their first image. The
# rules are the library's own: the same URL template and repo-type prefix, and the same token
# lookup order (``tests/test_hub.py`` checks both against the library's functions).
def file_url(repo: str, path: str, revision: str = DEFAULT_REVISION) -> str:
    """The ``resolve`` URL of a file of a dataset repo (what ``hf_hub_url`` returns)."""
    from huggingface_hub import constants

    repo_id = constants.REPO_TYPES_URL_PREFIXES["dataset"] + repo
    return constants.HUGGINGFACE_CO_URL_TEMPLATE.format(repo_id=repo_id, revision=quote(revision, safe=""), filename=quote(path))


def token() -> str | None:
    """The user's token: HF_TOKEN, then HUGGING_FACE_HUB_TOKEN, then the file ``huggingface-cli
    login`` saved (HF_TOKEN_PATH, default ``$HF_HOME/token``); None when there is none or when
    HF_HUB_DISABLE_IMPLICIT_TOKEN is set. (huggingface_hub also reads Google Colab's secrets
    vault, which only a notebook's own kernel can reach, never a command like this one.)"""
    from huggingface_hub import constants

    if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN:
        return None
    found = _clean(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if found is None:
        try:
            found = _clean(Path(constants.HF_TOKEN_PATH).read_text())
        except FileNotFoundError:
            pass
    return found


def _clean(value: str | None) -> str | None:
    return (value.replace("\r", "").replace("\n", "").strip() or None) if value is not None else None


def headers() -> dict[str, str]:
    """Request headers with the user's token when there is one (the user agent is the session's)."""
    found = token()
    return {"authorization": f"Bearer {found}"} if found else {}


def access_error(repo: str, status: int | None = None) -> UsageError:
    """The message for a gated or private dataset that this user cannot read yet."""
    what = f"HTTP {status}: " if status else ""
    return UsageError(
        f"{what}no access to the Hugging Face dataset {repo}. Open {dataset_page(repo)}, log in and "
        "accept its conditions, then run `huggingface-cli login` (or set HF_TOKEN to a token with read "
        "access) and rerun this command"
    )


async def list_files(
    guard: Fetcher, repo: str, folder: str = "", pattern: str | None = None, revision: str = DEFAULT_REVISION
) -> list[HubFile]:
    """Files under ``folder`` of a dataset repo (recursively) whose name matches ``pattern``.

    huggingface_hub makes the listing request itself, so the run's guard checks the endpoint
    first (``Fetcher.check``). A 401/403 (gated, private) becomes a UsageError naming the
    dataset page and how to log in, so a run without access fails before it plans anything.
    """
    try:
        await guard.check(endpoint())
    except Refused as exc:
        raise UsageError(
            f"the Hugging Face endpoint {endpoint()} is refused ({exc.reason.replace('_', ' ')}); "
            "pass --allow-private-networks to use a mirror inside your own network"
        ) from exc

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    def _list() -> list[HubFile]:
        api = HfApi(library_name="fastfetch", library_version=__version__)
        found = []
        for entry in api.list_repo_tree(
            repo, path_in_repo=folder or None, repo_type="dataset", revision=revision, recursive=True
        ):
            if not isinstance(entry, RepoFile):
                continue  # a folder
            name = entry.path.rsplit("/", 1)[-1]
            if pattern is None or re.fullmatch(pattern, name):
                lfs = getattr(entry, "lfs", None)
                found.append(HubFile(entry.path, int(entry.size), lfs.sha256 if lfs else entry.blob_id))
        return sorted(found, key=lambda f: f.path)

    try:
        return await asyncio.to_thread(_list)
    except (HfHubHTTPError, RepositoryNotFoundError) as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403) or "GatedRepo" in type(exc).__name__:
            raise access_error(repo, status) from exc
        raise UsageError(f"cannot list {folder or '/'} of the Hugging Face dataset {repo} ({dataset_page(repo)}): {exc}") from exc
    except Exception as exc:  # offline mode, connection refused, DNS: nothing to plan with
        raise UsageError(
            f"cannot reach the Hugging Face Hub at {endpoint()} to list {repo} ({type(exc).__name__}: {exc}); "
            "check the network, HF_ENDPOINT and that HF_HUB_OFFLINE is not set"
        ) from exc
