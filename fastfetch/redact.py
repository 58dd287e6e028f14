"""Keep secrets out of everything we print or store (logs, stats.json, the manifest).

Signed URLs (SA-1B's CDN links, S3 presigned URLs) carry credentials in their query string,
and tokens from the environment can end up in library exception messages; every error text
that leaves a run passes through ``redact``.
"""

from __future__ import annotations

import os
import re

_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY", "S3_SECRET_KEY")
_URL_QUERY = re.compile(r"(https?://[^\s?#'\"<>]+)\?[^\s'\"<>]*")
_BEARER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?\s*bearer\s+)[^\s'\",}]+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str) -> str:
    """``text`` with query strings, bearer tokens and known secret values replaced."""
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _BEARER.sub(r"\1<redacted>", text)
    text = _HF_TOKEN.sub("<redacted>", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "<redacted>")
    return text
