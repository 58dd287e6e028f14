"""Hugging Face Hub addresses, tokens and listings via huggingface_hub; the bytes go through us.

huggingface_hub decides the endpoint (``HF_ENDPOINT``), the token (``HF_TOKEN`` or the cached
``huggingface-cli login``) and the URL layout, so a mirror or a token works exactly as it does
for the hub's own tools; the downloads themselves use our session (resumable, bounded, streamed
into archives) rather than hf_hub_download's cache of whole files.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from fastfetch import __version__
from fastfetch.sources.base import UsageError

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


def file_url(repo: str, path: str, revision: str = DEFAULT_REVISION) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, path, repo_type="dataset", revision=revision)


def headers() -> dict[str, str]:
    """Request headers with the user's token (HF_TOKEN or the cached login) when there is one."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(library_name="fastfetch", library_version=__version__)


def access_error(repo: str, status: int | None = None) -> UsageError:
    """The message for a gated or private dataset that this user cannot read yet."""
    what = f"HTTP {status}: " if status else ""
    return UsageError(
        f"{what}no access to the Hugging Face dataset {repo}. Open {dataset_page(repo)}, log in and "
        "accept its conditions, then run `huggingface-cli login` (or set HF_TOKEN to a token with read "
        "access) and rerun this command"
    )


async def list_files(repo: str, folder: str = "", pattern: str | None = None, revision: str = DEFAULT_REVISION) -> list[HubFile]:
    """Files under ``folder`` of a dataset repo (recursively) whose name matches ``pattern``.

    A 401/403 (gated, private) becomes a UsageError naming the dataset page and how to log in,
    so a run without access fails before it plans anything.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    def _list() -> list[HubFile]:
        api = HfApi(library_name="fastfetch", library_version=__version__)
        found = []
        for entry in api.list_repo_tree(repo, path_in_repo=folder or None, repo_type="dataset", revision=revision, recursive=True):
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
